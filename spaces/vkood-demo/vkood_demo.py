"""The demo's model logic, without any Gradio: load a VK-OOD checkpoint, check what the user gave, run the model's
own public pieces (the VQA pipeline with `return_knowledge=True`, the processor, the task heads) and describe the
knowledge the OOD layer scored. `app.py` only lays these functions out on a page, so they are tested directly.

Everything goes through `trust_remote_code=True` (the code shipped in the checkpoint), as for a Hub user without
the vkood package: the Space installs only torch, transformers, gradio and matplotlib.
"""

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageOps
import torch
from matplotlib.figure import Figure
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    pipeline,
)

# Task of each VK-OOD head class (config.architectures) and the Auto class that loads it.
TASKS = {
    "VKOODForQuestionAnswering": "vqa",
    "VKOODForImagesAndTextClassification": "nlvr2",
    "VKOODForImageTextRetrieval": "retrieval",
}
TASK_TITLES = {
    "vqa": "visual question answering",
    "nlvr2": "NLVR2 (two images, one sentence: true or false)",
    "retrieval": "image-text retrieval",
}
AUTO_CLASSES = {"nlvr2": AutoModelForSequenceClassification, "retrieval": AutoModelForZeroShotImageClassification}

MAX_PIXELS = 64_000_000  # 8000 x 8000: larger uploads are refused before their pixels are decoded
TOP_ANSWERS = 5
ABLATED_ITEMS = 3  # "answer without this item" for the items with the highest gates
KEPT_ABOVE = 0.5  # the pipeline's rule: an item is kept when its gate exceeds 0.5
NOT_RERANKED = -100.0  # `rank_gallery`'s score of the candidates outside a query's top k_test (as in ALBEF)

# How the items the model reads are chosen; retrieval uses the checkpoint's own knowledge source (as in training).
RETRIEVED_AND_TYPED, TYPED_ONLY, NO_KNOWLEDGE = "retrieved + typed", "typed only", "none"
KNOWLEDGE_MODES = (RETRIEVED_AND_TYPED, TYPED_ONLY, NO_KNOWLEDGE)


class DemoInputError(ValueError):
    """A problem with the user's input or model choice, worded to be shown as it is on the page."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its task ("vqa", "nlvr2" or "retrieval"), model, processor and (VQA) pipeline."""

    name: str
    task: str
    model: torch.nn.Module
    processor: object
    vqa: object = None

    @property
    def threshold(self) -> float:
        """tau: the OOD layer's gate threshold on the item scores."""
        return float(self.model.vkood.ood.threshold.item())

    @property
    def max_items(self) -> int:
        """How many knowledge items the model reads per example (the processor's cut, as in training)."""
        return self.processor.max_knowledge_items


def load_checkpoint(name: str) -> Checkpoint:
    """Load a VK-OOD checkpoint (a local folder or a Hub id) with its shipped code; DemoInputError if impossible."""
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError) as error:
        where = (
            "a local folder" if Path(name).exists() else "neither a local folder nor a Hub model this machine can get"
        )
        raise DemoInputError(f"cannot load a checkpoint from {name!r}: it is {where} ({first_line(error)})") from error
    task = next((TASKS[a] for a in config.architectures or () if a in TASKS), None)
    if config.model_type != "vkood" or task is None:
        raise DemoInputError(
            f"{name!r} is not a VK-OOD task checkpoint (model_type {config.model_type!r}, architectures "
            f"{config.architectures}); the demo serves VKOODForQuestionAnswering, VKOODForImagesAndTextClassification "
            "and VKOODForImageTextRetrieval checkpoints"
        )
    if task == "vqa":
        if "visual-question-answering" not in (getattr(config, "custom_pipelines", None) or {}):
            raise DemoInputError(f"{name!r} is a VQA checkpoint without its pipeline (pipeline_vkood.py)")
        vqa = pipeline("visual-question-answering", model=name, trust_remote_code=True)
        return Checkpoint(name, task, vqa.model.eval(), vqa.processor, vqa)
    model = AUTO_CLASSES[task].from_pretrained(name, trust_remote_code=True).eval()
    return Checkpoint(name, task, model, AutoProcessor.from_pretrained(name, trust_remote_code=True))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------------ inputs
def open_image(path, what: str = "the image") -> PIL.Image.Image:
    """The uploaded file as a decoded PIL image (EXIF orientation applied), or a DemoInputError that says why not:
    nothing uploaded, not an image, damaged data, or more than MAX_PIXELS pixels (checked before decoding)."""
    if path is None or str(path) == "":
        raise DemoInputError(f"Upload {what} first.")
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # refused below with its size
            image = PIL.Image.open(path)
    except PIL.Image.DecompressionBombError as error:
        raise DemoInputError(
            f"{what.capitalize()} ({name}) is too large: {error} This demo takes images up to "
            f"{MAX_PIXELS / 1e6:.0f} megapixels; downscale it first."
        ) from error
    except (OSError, ValueError) as error:  # PIL.UnidentifiedImageError is an OSError
        raise DemoInputError(
            f"{what.capitalize()} ({name}) is not an image file that can be read; upload a PNG, JPEG, WebP, GIF "
            "or BMP file."
        ) from error
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise DemoInputError(
            f"{what.capitalize()} ({name}) is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); "
            f"this demo takes images up to {MAX_PIXELS / 1e6:.0f} megapixels: downscale it first."
        )
    try:
        image.load()  # Pillow decodes lazily: a truncated or damaged file fails here, not at open
        return PIL.ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise DemoInputError(f"{what.capitalize()} ({name}) is damaged: {first_line(error)}.") from error


def require_text(text, what: str) -> str:
    """The stripped text, or a DemoInputError asking for it."""
    text = (text or "").strip()
    if not text:
        raise DemoInputError(f"Type {what} first.")
    return text


def typed_lines(text) -> list[str]:
    """Non-empty stripped lines of a text box (one knowledge item or caption per line)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


@dataclass
class KnowledgeChoice:
    """The items the model reads (with where each came from) and those beyond its `max_items` slots."""

    texts: list[str]
    sources: list[str]
    left_out: list[str] = field(default_factory=list)


def choose_knowledge(checkpoint: Checkpoint, text: str, typed: str, mode: str) -> KnowledgeChoice:
    """Typed items first, then (mode RETRIEVED_AND_TYPED) what the checkpoint's processor retrieves for `text`,
    duplicates dropped, cut to the model's slots as the processor cuts. With nothing typed this is exactly the
    knowledge the pipeline and the training collator give the model."""
    if mode not in KNOWLEDGE_MODES:
        raise DemoInputError(f"Choose the knowledge among {', '.join(KNOWLEDGE_MODES)}.")
    if mode == NO_KNOWLEDGE:
        return KnowledgeChoice([], [])
    candidates = [(item, "typed") for item in typed_lines(typed)]
    if mode == RETRIEVED_AND_TYPED and checkpoint.processor.has_knowledge_source:
        (retrieved,) = checkpoint.processor.retrieve_knowledge([text])
        candidates += [(item.text, "retrieved") for item in retrieved]
    seen, unique = set(), []
    for item, source in candidates:
        if item not in seen:
            seen.add(item)
            unique.append((item, source))
    read, beyond = unique[: checkpoint.max_items], unique[checkpoint.max_items :]
    return KnowledgeChoice([item for item, _ in read], [source for _, source in read], [item for item, _ in beyond])


# ------------------------------------------------------------------------------------------------ VQA
@dataclass
class VQAResult:
    """Top answers, the knowledge items with their OOD score and gate, and the per-item ablations."""

    image: PIL.Image.Image
    answers: list[dict]  # {"answer", "score"}
    knowledge: list[dict]  # {"text", "source", "score", "gate", "kept"}
    threshold: float
    left_out: list[str]
    ablations: list[dict]  # {"removed", "answer", "score", "top_answer_score"}


def answer_question(checkpoint: Checkpoint, image_path, question, typed: str = "", mode: str = RETRIEVED_AND_TYPED):
    """Answer `question` about the uploaded image with the checkpoint's pipeline (`return_knowledge=True`), then
    ask again without each of the ABLATED_ITEMS items of highest gate."""
    if checkpoint.task != "vqa":
        raise DemoInputError(wrong_task(checkpoint, "vqa"))
    image = open_image(image_path)
    question = require_text(question, "a question")
    choice = choose_knowledge(checkpoint, question, typed, mode)
    found = checkpoint.vqa(
        image=image, question=question, knowledge=choice.texts, top_k=TOP_ANSWERS, return_knowledge=True
    )
    knowledge = [{**entry, "source": source} for entry, source in zip(found["knowledge"], choice.sources)]
    top_answer = found["answers"][0]["answer"]
    ranked = sorted(range(len(knowledge)), key=lambda m: (-knowledge[m]["gate"], -knowledge[m]["score"]))
    ablated = ranked[:ABLATED_ITEMS]
    every_answer = len(checkpoint.model.config.id2label)
    without = (
        checkpoint.vqa(
            [
                {"image": image, "question": question, "knowledge": choice.texts[:m] + choice.texts[m + 1 :]}
                for m in ablated
            ],
            top_k=every_answer,
        )
        if ablated
        else []
    )
    ablations = [
        {
            "removed": choice.texts[m],
            "answer": answers[0]["answer"],
            "score": answers[0]["score"],
            "top_answer_score": next(a["score"] for a in answers if a["answer"] == top_answer),
        }
        for m, answers in zip(ablated, without)
    ]
    return VQAResult(image, found["answers"], knowledge, checkpoint.threshold, choice.left_out, ablations)


def score_plot(knowledge: list[dict], threshold: float, title: str = "OOD score of each knowledge item") -> Figure:
    """One row per item: a dot at its OOD score (green: kept by the gate, grey: gated out) on a stem from the
    threshold tau (dashed line), so an item's side of tau and its distance to it read at a glance."""
    figure = Figure(figsize=(7.5, 1.2 + 0.42 * max(len(knowledge), 1)), layout="constrained")
    axes = figure.add_subplot()
    axes.axvline(threshold, color="black", linestyle="--", label=f"tau = {threshold:.3g}")
    if knowledge:
        rows = list(range(len(knowledge)))
        scores = [item["score"] for item in knowledge]
        colours = ["tab:green" if item["kept"] else "tab:gray" for item in knowledge]
        axes.hlines(rows, threshold, scores, colors=colours, linewidth=2)
        for state, colour in (("kept", "tab:green"), ("gated out", "tab:gray")):
            chosen = [m for m in rows if colours[m] == colour]
            axes.scatter([scores[m] for m in chosen], chosen, color=colour, s=60, zorder=3, label=state)
        axes.set_yticks(rows, [shorten(item["text"], 48) for item in knowledge])
        axes.set_ylim(len(knowledge) - 0.5, -0.5)
    else:
        axes.set_yticks([])
        axes.text(0.5, 0.5, "no knowledge items", transform=axes.transAxes, ha="center", va="center")
    axes.set_xlabel("OOD score under the image's Gaussian mixture")
    axes.set_title(title)
    axes.legend(loc="best", fontsize="small")
    return figure


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ------------------------------------------------------------------------------------------------ NLVR2
@dataclass
class PairResult:
    """NLVR2: the probability of each label and, per knowledge item, its score and gate under each image."""

    images: tuple[PIL.Image.Image, PIL.Image.Image]
    labels: list[dict]  # {"label", "probability"}, most probable first
    knowledge: list[dict]  # {"text", "source", "score": [left, right], "gate": [left, right], "kept": [left, right]}
    threshold: float
    left_out: list[str]


def judge_pair(
    checkpoint: Checkpoint, left_path, right_path, sentence, typed: str = "", mode: str = RETRIEVED_AND_TYPED
):
    """Is `sentence` true of the two images? The processor encodes the pair (B, 2, C, H, W), the NLVR2 head judges."""
    if checkpoint.task != "nlvr2":
        raise DemoInputError(wrong_task(checkpoint, "nlvr2"))
    images = (open_image(left_path, "the left image"), open_image(right_path, "the right image"))
    sentence = require_text(sentence, "a sentence")
    choice = choose_knowledge(checkpoint, sentence, typed, mode)
    inputs = checkpoint.processor(images=[list(images)], text=[sentence], knowledge=[choice.texts])
    with torch.no_grad():
        outputs = checkpoint.model(**inputs)
    probabilities = outputs.logits.float().softmax(-1)[0]
    id2label = checkpoint.model.config.id2label
    labels = sorted(
        ({"label": id2label[i], "probability": p} for i, p in enumerate(probabilities.tolist())),
        key=lambda entry: -entry["probability"],
    )
    count = len(choice.texts)
    scores = outputs.ood_scores[0, :, :count].float().t().tolist()  # (M, 2): per item, under each image
    gates = outputs.ood_gate[0, :, :count].float().t().tolist()
    knowledge = [
        {"text": text, "source": source, "score": score, "gate": gate, "kept": [g > KEPT_ABOVE for g in gate]}
        for text, source, score, gate in zip(choice.texts, choice.sources, scores, gates)
    ]
    return PairResult(images, labels, knowledge, checkpoint.threshold, choice.left_out)


# ------------------------------------------------------------------------------------------------ retrieval
@dataclass
class RankingResult:
    """Captions ranked for one image: two-stage score (ITM margin + ITC on the top k_test, else None) and ITC."""

    image: PIL.Image.Image
    ranking: list[dict]  # {"caption", "score", "similarity"}, best first
    k_test: int


def rank_captions(checkpoint: Checkpoint, image_path, captions_text):
    """Rank the typed captions (one per line) for the image with the model's `rank_gallery`: ITC similarity for
    every caption, the fused ITM head re-scoring the top `k_test`. Each caption gets its retrieved knowledge."""
    if checkpoint.task != "retrieval":
        raise DemoInputError(wrong_task(checkpoint, "retrieval"))
    image = open_image(image_path)
    captions = typed_lines(captions_text)
    if not captions:
        raise DemoInputError("Type at least one caption (one per line).")
    model, processor = checkpoint.model, checkpoint.processor
    gallery_images = model.encode_gallery_images(processor(images=[image])["pixel_values"])
    gallery_texts = model.encode_gallery_texts(**processor(text=captions))
    image_to_text, _ = model.rank_gallery(gallery_images, gallery_texts)
    similarity = (gallery_images["embeds"] @ gallery_texts["embeds"].t())[0].tolist()
    rows = [
        {"caption": caption, "score": None if score == NOT_RERANKED else score, "similarity": similarity[i]}
        for i, (caption, score) in enumerate(zip(captions, image_to_text[0].tolist()))
    ]
    rows.sort(key=lambda row: (row["score"] is None, -(row["score"] or 0.0), -row["similarity"]))
    return RankingResult(image, rows, min(model.config.k_test, len(captions)))


def wrong_task(checkpoint: Checkpoint, task: str) -> str:
    return (
        f"The loaded checkpoint ({checkpoint.name}) is a {TASK_TITLES[checkpoint.task]} model, not a "
        f"{TASK_TITLES[task]} one: start the demo with --model naming a {task} checkpoint."
    )
