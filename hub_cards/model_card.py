"""Model cards for trained VK-OOD checkpoints: Hub metadata with a model-index of the measured results."""

from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
# Trainer bookkeeping that is not a result of the model.
_NOT_RESULTS = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")
TASKS = {
    # task: (model-index task type, title, Auto class, pipeline tag); the usage snippet of each is in the template
    "vqa": (
        "visual-question-answering",
        "visual question answering",
        "AutoModelForVisualQuestionAnswering",
        "visual-question-answering",
    ),
    "nlvr2": (
        "visual-reasoning",
        "visual reasoning over image pairs (NLVR2)",
        "AutoModelForSequenceClassification",
        None,
    ),
    "retrieval": ("image-text-retrieval", "image-text retrieval", "AutoModelForZeroShotImageClassification", None),
    "generative_vqa": (
        "visual-question-answering",
        "visual question answering with generated answers",
        "AutoModelForImageTextToText",
        "visual-question-answering",
    ),
    "blip_vqa": (
        "visual-question-answering",
        "visual question answering with BLIP (VK-OOD-BLIP: answers generated or ranked over an answer list)",
        "AutoModelForVisualQuestionAnswering",
        "visual-question-answering",
    ),
}


SCORE_MEANINGS = {
    "gem": "its standardised GEM score",
    "log_likelihood": "its log-density under the image's mixture relative to the image's own tokens "
    "(0: as likely as they are)",
}


@dataclass
class ModelDescription:
    """What the card says about one trained model; `results` are the Trainer's final metrics (eval_* keys)."""

    model_name: str
    task: str
    dataset_name: str
    eval_split: str
    vision_backbone: str
    text_backbone: str
    knowledge_source: str
    finetuning: str
    weights_form: str
    command: str
    results: dict[str, float]
    hyperparameters: dict[str, object] = field(default_factory=dict)
    dataset_id: str | None = None
    base_models: list[str] = field(default_factory=list)
    license: str = "apache-2.0"
    plots: list[str] = field(default_factory=list)
    repo_id: str | None = None
    # The VQA snippets' question and knowledge: one of the run's own examples where it has one.
    example_question: str = "what shape is in the image?"
    example_knowledge: list[str] = field(default_factory=lambda: ["a circle is a shape"])
    # Whether the processor retrieves knowledge itself when none is passed (False where the dataset draws each
    # question's facts, as knowledge-VQA does: a user passes them), and what the OOD scores are.
    retrieves_knowledge: bool = True
    ood_score: str = "log_likelihood"


def reported_results(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation metrics worth a row and a model-index entry: eval_* keys except loss and timing."""
    return {k: float(v) for k, v in metrics.items() if k.startswith("eval_") and k not in _NOT_RESULTS}


def ood_diagnostics(metrics: dict[str, float]) -> dict[str, float]:
    """The OOD layer's diagnostics, rows of the results table but not benchmark results (no model-index entry): the
    fraction of items its gate keeps; on a dataset that labels its items, the AUROC of fitting against not-fitting
    items and the kept fraction of each."""
    return {k: float(v) for k, v in metrics.items() if k.startswith("ood_")}


def model_card(description: ModelDescription) -> ModelCard:
    """Render the card; every reported metric also goes into the YAML model-index (none for training-only runs)."""
    if description.task not in TASKS:
        raise ValueError(f"unknown task {description.task!r}; choose one of {sorted(TASKS)}")
    task_type, title, auto_class, pipeline_tag = TASKS[description.task]
    results = reported_results(description.results)
    dataset_type = description.dataset_id or description.dataset_name
    eval_results = [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset_type,
            dataset_name=description.dataset_name,
            dataset_split=description.eval_split,
            metric_type=name.removeprefix("eval_"),
            metric_name=name.removeprefix("eval_"),
            metric_value=value,
        )
        for name, value in results.items()
    ]
    card_data = ModelCardData(
        model_name=description.model_name,
        license=description.license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["vkood", "vision-language", "knowledge", "out-of-distribution", "custom_code"],
        datasets=[description.dataset_id] if description.dataset_id else None,
        base_model=description.base_models or None,
        eval_results=eval_results or None,  # a training-only run has no model-index
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        description=description,
        results={**results, **ood_diagnostics(description.results)},
        task_title=title,
        auto_class=auto_class,
        score_meaning=SCORE_MEANINGS[description.ood_score],
        model_id=description.repo_id or "path/to/this/folder",
    )
