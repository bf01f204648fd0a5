"""`evaluate` module folder: load with `evaluate.load(modeling_vkood.evaluation.metric_path("nlvr2_accuracy"))`."""
