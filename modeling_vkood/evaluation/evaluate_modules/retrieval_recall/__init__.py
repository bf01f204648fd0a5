"""`evaluate` module folder: load with `evaluate.load(modeling_vkood.evaluation.metric_path("retrieval_recall"))`."""
