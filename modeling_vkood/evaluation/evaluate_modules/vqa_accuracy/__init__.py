"""`evaluate` module folder: load with `evaluate.load(modeling_vkood.evaluation.metric_path("vqa_accuracy"))`."""
