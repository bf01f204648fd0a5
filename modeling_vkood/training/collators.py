"""Batch collators for the Trainer: dataset rows -> VKOODProcessor tensors + labels, one class per task.

Image columns arrive undecoded (`datasets.Image(decode=False)`: {"path", "bytes"}) so that a `PixelCache` can keep
the pixel values of every image it has seen: VQA asks several questions about each image, and a small dataset is
seen many epochs, so decoding and resizing each image once saves most of the CPU time of data loading.
"""

import hashlib
import re
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence

import datasets
import torch

from modeling_vkood.evaluation import normalize_answer


class PixelCache:
    """Pixel values per image through the processor, memoised for at most `capacity` images (LRU; 0 = off).

    An image is keyed by its file path, or by the SHA-1 of its bytes when it is embedded. With dataloader workers
    each worker holds its own cache (use `dataloader_persistent_workers` to keep it across epochs).
    """

    def __init__(self, processor, capacity: int = 0):
        if capacity < 0:
            raise ValueError(f"PixelCache capacity must be >= 0, got {capacity}")
        self.processor = processor
        self.capacity = capacity
        self._decoder = datasets.Image()
        self._cache: OrderedDict = OrderedDict()

    @staticmethod
    def _key(image):
        if not isinstance(image, Mapping):
            return None  # an already decoded image: nothing stable to key it by
        if image.get("bytes") is not None:
            return hashlib.sha1(image["bytes"]).hexdigest()
        return image.get("path")

    def _decode(self, image):
        return self._decoder.decode_example(image) if isinstance(image, Mapping) else image

    def __call__(self, images: Sequence) -> torch.Tensor:
        """(N, C, H, W) pixel values of `images` (undecoded dataset cells or PIL images), in order."""
        keys = [self._key(image) for image in images] if self.capacity else [None] * len(images)
        missing = [i for i, key in enumerate(keys) if key is None or key not in self._cache]
        fresh = {}
        if missing:
            pixels = self.processor(images=[self._decode(images[i]) for i in missing])["pixel_values"]
            fresh = dict(zip(missing, pixels))
        rows = []
        for index, key in enumerate(keys):
            if index in fresh:
                rows.append(fresh[index])
                if key is not None:
                    self._cache[key] = fresh[index]
            else:
                rows.append(self._cache[key])
                self._cache.move_to_end(key)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return torch.stack(rows)


def soft_score_labels(label_ids: Sequence[Sequence[int]], label_scores: Sequence[Sequence[float]], num_labels: int):
    """Dense (B, num_labels) VQA targets from the sparse (answer id, soft score) lists of each row."""
    counts = torch.tensor([len(ids) for ids in label_ids], dtype=torch.long)
    if any(len(ids) != len(scores) for ids, scores in zip(label_ids, label_scores)):
        raise ValueError("label_ids and label_scores differ in length in a row")
    ids = torch.tensor([i for row in label_ids for i in row], dtype=torch.long)
    scores = torch.tensor([s for row in label_scores for s in row], dtype=torch.float32)
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_labels):
        raise ValueError(f"a label id is outside the answer vocabulary of {num_labels}")
    rows = torch.repeat_interleave(torch.arange(len(label_ids)), counts)
    return torch.zeros(len(label_ids), num_labels).index_put_((rows, ids), scores)


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z0-9]+", text.lower()))


def states_answer(item_text: str, answers: Sequence[str]) -> bool:
    """Whether a knowledge item's text contains one of the answers as whole words (pseudo-relevance)."""
    words = _words(item_text)
    for answer in answers:
        target = _words(answer)
        if target and any(words[i : i + len(target)] == target for i in range(len(words) - len(target) + 1)):
            return True
    return False


class VQACollator:
    """VQA rows (image, question, knowledge, label_ids, label_scores) -> model inputs with dense soft-score labels.

    `knowledge_relevance=True`: the batch also holds `knowledge_relevance` (B, M), 1 for the items whose text states
    one of the row's answers: the pseudo-relevance labels of retrieval-augmented VQA, from the training answers only
    (the OOD alignment's positives and gate forcing's selection).
    """

    def __init__(self, processor, num_labels: int, pixels: PixelCache, knowledge_relevance: bool = False):
        self.processor, self.num_labels, self.pixels = processor, num_labels, pixels
        self.knowledge_relevance = knowledge_relevance

    def __call__(self, rows: list[dict]) -> dict:
        batch = dict(self.processor(text=[r["question"] for r in rows], knowledge=[r["knowledge"] for r in rows]))
        batch["pixel_values"] = self.pixels([r["image"] for r in rows])
        batch["labels"] = soft_score_labels(
            [r["label_ids"] for r in rows], [r["label_scores"] for r in rows], self.num_labels
        )
        if self.knowledge_relevance and "knowledge_mask" in batch:
            batch["knowledge_relevance"] = knowledge_relevance(self.processor, rows, batch["knowledge_mask"])
        return batch


def knowledge_relevance(processor, rows: list[dict], knowledge_mask: torch.Tensor) -> torch.Tensor:
    """(B, M) 1 for the encoded item slots whose text states one of the row's answers (`states_answer`)."""
    relevance = torch.zeros(knowledge_mask.shape, dtype=torch.float32)
    # the sentences of the encoded slots, in slot order (the processor's cut of each row's items)
    sentences = processor.knowledge_sentences([r["knowledge"] for r in rows])
    for row, (r, texts) in enumerate(zip(rows, sentences)):
        for position, text in enumerate(texts):
            relevance[row, position] = float(states_answer(text, r["answers"]))
    return relevance


def answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """BLIP's VQA training targets of one question: each distinct human answer (normalised as the official metric
    normalises it, so the texts are those the answer list and the metric hold) with the share of the annotators who
    gave it as its weight (BLIP's `vqa_dataset`: `answer_weight[answer] += 1 / len(answers)`)."""
    normalised = [text for text in map(normalize_answer, answers) if text] or list(answers)  # "a" normalises to ""
    counts = Counter(normalised)
    return list(counts), [count / len(normalised) for count in counts.values()]


class BlipVQACollator:
    """VQA rows -> inputs of `VKOODBlipForQuestionAnswering`, with BLIP's VQA training targets: every distinct human
    answer of a question, weighted by its share of the annotators (`answer_weights`), as `decoder_input_ids` /
    `labels` (B, A, T) and `answer_weights` (B, A) (`VKOODBlipProcessor.answer_targets`). `with_targets=False` leaves
    them out (the inputs of `generate` and `rank_answers`; rows to predict may have no answers).
    `knowledge_relevance=True` adds the relevance labels as `VQACollator` does."""

    def __init__(
        self,
        processor,
        pixels: PixelCache,
        max_answer_length: int = 32,
        knowledge_relevance: bool = False,
        with_targets: bool = True,
    ):
        self.processor, self.pixels, self.max_answer_length = processor, pixels, max_answer_length
        self.knowledge_relevance, self.with_targets = knowledge_relevance, with_targets

    def __call__(self, rows: list[dict]) -> dict:
        batch = dict(self.processor(text=[r["question"] for r in rows], knowledge=[r["knowledge"] for r in rows]))
        batch["pixel_values"] = self.pixels([r["image"] for r in rows])
        if self.with_targets:
            texts, weights = zip(*(answer_weights(r["answers"]) for r in rows))
            batch.update(self.processor.answer_targets(list(texts), list(weights), self.max_answer_length))
        if self.knowledge_relevance and "knowledge_mask" in batch:
            batch["knowledge_relevance"] = knowledge_relevance(self.processor, rows, batch["knowledge_mask"])
        return batch


def most_frequent_answer(answers: Sequence[str]) -> str:
    """The answer given most often (the first of them on a tie): VQA's `multiple_choice_answer`, the text target of
    the generative head."""
    counts = Counter(answers)
    return max(counts, key=lambda answer: (counts[answer], -answers.index(answer)))


ANSWER_MARKER = " answer:"  # what separates the question from the answer in the teacher's texts
QUESTION_ANSWER_TEMPLATE = "question: {question}" + ANSWER_MARKER + " {answer}"
# WordPiece decoding puts a space before the colons ("question : ... answer : ..."): accepted.
_QUESTION_ANSWER = re.compile(r"^\s*question\s*:\s*(?P<question>.+?)\s+answer\s*:\s*(?P<answer>.+?)\s*$", re.DOTALL)


def question_answer_text(question: str, answer: str) -> str:
    """The SelTDA teacher's target text for one labelled question."""
    return QUESTION_ANSWER_TEMPLATE.format(question=question.strip(), answer=answer.strip())


def parse_question_answer(text: str) -> tuple[str, str] | None:
    """(question, answer) of a text the teacher generated, or None when it does not have the template's form."""
    match = _QUESTION_ANSWER.match(text)
    return None if match is None else (match["question"], match["answer"])


class GenerativeVQACollator:
    """VQA rows -> inputs of `VKOODForConditionalGeneration` with its decoder targets.

    `target="answer"`: the question (and its knowledge) in, the most frequent human answer as the text to generate.
    `target="question_answer"`: the SelTDA teacher: an empty prompt and no knowledge in, "question: Q answer: A" out,
    so that it learns to write question-answer pairs for an image alone. `with_targets=False` leaves the targets out
    (the inputs of `generate`).
    """

    def __init__(
        self,
        processor,
        pixels: PixelCache,
        target: str = "answer",
        max_answer_length: int = 32,
        with_targets: bool = True,
    ):
        if target not in ("answer", "question_answer"):
            raise ValueError(f"target must be 'answer' or 'question_answer', got {target!r}")
        self.processor, self.pixels, self.target = processor, pixels, target
        self.max_answer_length, self.with_targets = max_answer_length, with_targets

    def __call__(self, rows: list[dict]) -> dict:
        if self.target == "answer":
            inputs = {"text": [r["question"] for r in rows], "knowledge": [r["knowledge"] for r in rows]}
        else:
            inputs = {"text": [""] * len(rows), "knowledge": []}
        if self.with_targets:  # only then are answers read: rows to predict (a test split) have none
            inputs.update(answers=self.targets(rows), max_answer_length=self.max_answer_length)
        batch = dict(self.processor(**inputs))
        batch["pixel_values"] = self.pixels([r["image"] for r in rows])
        return batch

    def targets(self, rows: list[dict]) -> list[str]:
        """The decoder's target text of each row, from its most frequent human answer."""
        if self.target == "answer":
            return [most_frequent_answer(r["answers"]) for r in rows]
        return [question_answer_text(r["question"], most_frequent_answer(r["answers"])) for r in rows]


class NLVR2Collator:
    """NLVR2 rows (image_0, image_1, sentence, knowledge, label) -> pixel pairs (B, 2, C, H, W) and class labels."""

    def __init__(self, processor, pixels: PixelCache):
        self.processor, self.pixels = processor, pixels

    def __call__(self, rows: list[dict]) -> dict:
        batch = dict(self.processor(text=[r["sentence"] for r in rows], knowledge=[r["knowledge"] for r in rows]))
        pairs = self.pixels([image for r in rows for image in (r["image_0"], r["image_1"])])
        batch["pixel_values"] = pairs.view(len(rows), 2, *pairs.shape[1:])
        batch["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        return batch


class RetrievalCollator:
    """Retrieval rows (one image, its captions) -> one caption per image for ITC/ITM training: the row's caption
    when it has one (`data.one_row_per_caption` gives a training split one row per pair), else one drawn at random.

    Knowledge is retrieved for the chosen caption itself: the dataset's `knowledge` column is per image, merged over
    all its captions, so using it for one caption would leak the other captions of the same image into the text.
    """

    def __init__(self, processor, pixels: PixelCache, knowledge_base, max_knowledge_items: int):
        self.processor, self.pixels = processor, pixels
        self.knowledge_base, self.max_knowledge_items = knowledge_base, max_knowledge_items

    def __call__(self, rows: list[dict]) -> dict:
        counts = torch.tensor([len(r["captions"]) for r in rows], dtype=torch.float64)
        if (counts == 0).any():
            raise ValueError(f"image_id {rows[int((counts == 0).nonzero()[0])]['image_id']} has no caption")
        choice = (torch.rand(len(rows), dtype=torch.float64) * counts).long().tolist()
        texts = [r["captions"][c] for r, c in zip(rows, choice)]
        knowledge = self.knowledge_base.retrieve_batch(texts, max_items=self.max_knowledge_items)
        batch = dict(self.processor(text=texts, knowledge=knowledge))
        batch["pixel_values"] = self.pixels([r["image"] for r in rows])
        batch["image_ids"] = torch.tensor([r["image_id"] for r in rows], dtype=torch.long)
        batch["return_loss"] = True  # the training loss, as transformers' CLIP training batches ask for it
        return batch
