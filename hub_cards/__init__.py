"""Model and dataset card templates and the code that renders them."""
