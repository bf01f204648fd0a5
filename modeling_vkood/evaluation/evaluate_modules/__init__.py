"""`evaluate` module folders (each holds a script named like the folder); load them with `evaluate.load(path)`."""
