"""Modality-augmented self-distillation (MASD; McKinzie et al., "On Robustness in Multimodal Learning", ICCV 2023):
the model on an input with a modality removed is trained to predict what it predicts on the full input.

Each training example gets one modality augmentation, drawn uniformly from `augmentations` with the torch RNG
(the Trainer seeds it and restores it on resume):
- "image": the image is missing; its pixels become 0 in the normalised space (the normaliser's mean colour);
- "question": the question is missing; only its first token ([CLS] / <s>) stays attended;
- "shorten": the question is shortened; each of its other tokens is dropped with probability 1/2;
- "knowledge": the knowledge is missing; every item is masked out.
The loss is Hinton's distillation term on the answer distribution: T^2 * KL(softmax(full / T) || softmax(aug / T)),
the full-input logits detached (the model is its own teacher), averaged over the batch: a batch mean like the
heads' losses, so gradient accumulation and the number of processes never rescale it. Classification heads (VQA,
NLVR2).
"""

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("image", "question", "shorten", "knowledge")
# The inputs of the augmented pass: no labels (no task loss, hence no alignment loss either); the relevance labels
# stay where the batch has them, so that a gate-forcing schedule (gate_forcing.py) gates both passes alike.
STUDENT_INPUTS = (
    "pixel_values",
    "input_ids",
    "attention_mask",
    "knowledge_input_ids",
    "knowledge_attention_mask",
    "knowledge_mask",
    "knowledge_relevance",
)


def _per_example(flags, tensor):
    """`flags` (B,) broadcast against `tensor` (B, ...)."""
    return flags.view(-1, *([1] * (tensor.dim() - 1)))


def check_augmentations(augmentations):
    unknown = sorted(set(augmentations) - set(AUGMENTATIONS))
    if unknown or not augmentations:
        raise ValueError(f"--masd_augmentations: choose among {AUGMENTATIONS}, got {list(augmentations)}")


def augment_modalities(batch: dict, augmentations=AUGMENTATIONS, generator=None) -> dict:
    """A copy of the model inputs of `batch` with one augmentation per example (module docstring), vectorised."""
    check_augmentations(augmentations)
    inputs = {key: batch[key] for key in STUDENT_INPUTS if batch.get(key) is not None}
    device = inputs["input_ids"].device
    size = inputs["input_ids"].shape[0]
    choice = torch.randint(len(augmentations), (size,), generator=generator, device="cpu").to(device)
    chosen = {name: choice == index for index, name in enumerate(augmentations)}
    none = torch.zeros(size, dtype=torch.bool, device=device)
    pixels = inputs["pixel_values"]
    inputs["pixel_values"] = pixels.masked_fill(_per_example(chosen.get("image", none), pixels), 0.0)
    attention = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    first = torch.zeros_like(attention, dtype=torch.bool)
    first[:, 0] = True
    halves = torch.rand(attention.shape, generator=generator, device="cpu").to(device) < 0.5
    drop = (_per_example(chosen.get("question", none), attention) & ~first) | (
        _per_example(chosen.get("shorten", none), attention) & halves & ~first
    )
    inputs["attention_mask"] = attention.masked_fill(drop, 0)
    removed = chosen.get("knowledge", none)
    for key in ("knowledge_mask", "knowledge_attention_mask", "knowledge_relevance"):
        if key in inputs:
            inputs[key] = inputs[key].masked_fill(_per_example(removed, inputs[key]), 0)
    return inputs


def self_distillation_loss(student_logits, teacher_logits, temperature: float = 1.0):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean; the teacher is detached. 0 iff the two
    give the same distribution (logits equal up to a per-row constant)."""
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return temperature**2 * kl.mean()


class ModalityAugmentedSelfDistillation:
    """MASD's extra loss term for a training batch: `weight` * `self_distillation_loss` between the model's logits on
    `augment_modalities(batch)` and its (detached) logits on the full batch."""

    def __init__(self, weight: float, temperature: float = 1.0, augmentations=AUGMENTATIONS):
        if temperature <= 0:
            raise ValueError(f"--masd_temperature must be positive, got {temperature}")
        check_augmentations(augmentations)
        self.weight, self.temperature, self.augmentations = weight, temperature, tuple(augmentations)

    needs_hidden_states = False

    def __call__(self, model, outputs, batch, unwrapped=None) -> torch.Tensor:
        """`outputs` of `model`'s forward on `batch`; the augmented pass runs through `model` itself (under DDP the
        wrapped model, so that its gradients are synchronised with the rest)."""
        augmented = model(**augment_modalities(batch, self.augmentations))
        return self.weight * self_distillation_loss(augmented.logits, outputs.logits, self.temperature)
