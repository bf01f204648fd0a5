"""Multimodal Adaptive Distillation (MAD; Wang et al., "Multimodal Adaptive Distillation for Leveraging Unimodal
Encoders for Vision-Language Tasks", formerly CLIP-TD): the pretrained unimodal encoders teach the cross-modal
model, token by token, with a per-example choice of which tokens and how much.

- Teacher: the pretrained backbones as they were before fine-tuning, with their projections to the fusion width as
  initialised (a fixed random linear map of the pretrained features: the targets do not move) (`UnimodalTeacher`).
  Under LoRA they cost no extra weights: the same PeftModel with its adapters disabled (PEFT's `disable_adapter()`,
  which also routes every `modules_to_save` module to its untouched original). Under full fine-tuning: a frozen
  copy of the initial backbones and projections, kept by the trainer (never saved with the model, so a resumed run
  distils from the same initial encoders).
- Student: the cross-modal model's last fused states at the same tokens: the question tokens of the text stream and
  the image tokens of the image stream.
- Which tokens: per example, the teacher's most salient tokens, those whose teacher feature agrees most with the
  example's mean teacher feature (softmax of cosine / `temperature`), the top `token_fraction` of the real tokens.
- How much: the teacher's confidence in that choice, 1 - (entropy of the salience distribution) / log(tokens):
  1 when one token stands out, 0 when all tokens are alike. The unimodal encoders have no task head, so the
  teacher's zero-shot answer confidence of the paper is not available here; this is its token-level stand-in.
- Distance: 1 - cosine between student and teacher token (scale-free: the fused states and the projected teacher
  features live at different norms).

A backbone trained from scratch (the embedded default's vision encoder) has no pretrained teacher: that side is
not distilled. A model without any pretrained backbone is refused (`UnimodalTeacher` raises). VQA heads only.
"""

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

DISTILLED_SIDES = ("text_model", "vision_model")
PROJECTIONS = {"text_model": "text_projection", "vision_model": "image_projection"}


def token_distillation_loss(student, teacher, mask, token_fraction: float, temperature: float):
    """MAD's loss of one modality, averaged over the batch: sum_b c_b * mean_{t in S_b} (1 - cos(s_bt, t_bt)) / B.

    `student`, `teacher` (B, T, D); `mask` (B, T), 1 for real tokens. S_b: the ceil(`token_fraction` * n_b) real
    tokens of example b with the highest teacher salience; c_b the teacher's confidence (module docstring). Both
    come from the teacher alone (no gradient); an example without real tokens contributes 0.
    """
    mask = mask.bool()
    teacher = teacher.detach().float()
    with torch.no_grad():
        count = mask.sum(-1)
        unit = F.normalize(teacher, dim=-1)
        mean = F.normalize((unit * mask.unsqueeze(-1)).sum(1), dim=-1)
        logits = (unit @ mean.unsqueeze(-1)).squeeze(-1) / temperature
        logits = logits.masked_fill(~mask, float("-inf"))
        salience = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without real tokens: all -inf -> 0
        entropy = -(salience * salience.clamp_min(1e-30).log()).sum(-1)
        confidence = torch.where(count > 1, 1 - entropy / count.clamp_min(2).log(), count.to(entropy.dtype))
        keep = torch.ceil(token_fraction * count).clamp_min(1)
        rank = logits.argsort(-1, descending=True).argsort(-1)  # 0 for the most salient token
        selected = (rank < keep.unsqueeze(-1)) & mask
    distance = 1 - F.cosine_similarity(student.float(), teacher, dim=-1)
    per_example = (distance * selected).sum(-1) / keep
    return (confidence * per_example).sum() / mask.shape[0]


def _base_vkood(model):
    """The VKOODModel inside a task model, a PeftModel or their DDP/accelerate wrappers' unwrapped module."""
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    return model.base_model


@contextmanager
def _modules_swapped(owner: nn.Module, replacements: dict[str, nn.Module]):
    """`owner`'s child modules temporarily replaced by `replacements` (name -> module), restored on exit."""
    originals = {name: getattr(owner, name) for name in replacements}
    try:
        for name, module in replacements.items():
            setattr(owner, name, module)
        yield
    finally:
        for name, module in originals.items():
            setattr(owner, name, module)


class UnimodalTeacher:
    """The pretrained encoders of `model` as they were before fine-tuning; `tokens(model, batch)` gives their tokens.

    Build it from the model to train *before* training starts (and before a checkpoint is loaded): with full
    fine-tuning it copies the initial backbones and projections. `sides`: the pretrained backbones distilled
    ("text_model", "vision_model"), from `config.pretrained_backbones`.
    """

    def __init__(self, model: nn.Module):
        base = _base_vkood(model)
        self.sides = tuple(side for side in DISTILLED_SIDES if side in base.config.pretrained_backbones)
        if not self.sides:
            raise ValueError(
                "MAD (--mad_weight > 0) distils pretrained unimodal encoders, and this model has none "
                "(config.pretrained_backbones is empty: both backbones are trained from scratch). Give a pretrained "
                "--text_model or --vision_model, or set --mad_weight 0"
            )
        self.lora = isinstance(model, PeftModel)
        self.frozen = None
        if not self.lora:
            names = [*self.sides, *(PROJECTIONS[side] for side in self.sides)]
            self.frozen = {name: copy.deepcopy(getattr(base, name)).requires_grad_(False).eval() for name in names}

    def to(self, device):
        for module in (self.frozen or {}).values():
            module.to(device)
        return self

    @contextmanager
    def _initial_encoders(self, model):
        if self.lora:
            with model.disable_adapter():
                yield
        else:
            with _modules_swapped(_base_vkood(model), self.frozen):
                yield

    @torch.no_grad()
    def tokens(self, model, batch) -> dict[str, torch.Tensor]:
        """{"text_model": (B, L, H) question tokens, "vision_model": (B, N, H) image tokens} of the distilled
        sides, at the fusion width, in eval mode (no dropout). `model`: the unwrapped PeftModel or task model."""
        base = _base_vkood(model)
        was_training = base.training
        base.eval()
        try:
            with self._initial_encoders(model):
                tokens = {}
                if "text_model" in self.sides:
                    tokens["text_model"] = base.encode_text(batch["input_ids"], batch.get("attention_mask"))
                if "vision_model" in self.sides:
                    tokens["vision_model"] = base.encode_image(batch["pixel_values"])
        finally:
            base.train(was_training)
        return tokens


class MultimodalAdaptiveDistillation:
    """MAD's extra loss term for a training batch: `weight` * sum over the distilled sides of
    `token_distillation_loss` between the student's fused tokens and the teacher's tokens."""

    needs_hidden_states = True

    def __init__(self, teacher: UnimodalTeacher, weight: float, temperature: float = 0.05, token_fraction: float = 0.5):
        if not 0 < token_fraction <= 1:
            raise ValueError(f"--mad_token_fraction must be in (0, 1], got {token_fraction}")
        if temperature <= 0:
            raise ValueError(f"--mad_temperature must be positive, got {temperature}")
        self.teacher, self.weight, self.temperature, self.token_fraction = teacher, weight, temperature, token_fraction

    def student_tokens(self, outputs, batch) -> dict[str, torch.Tensor]:
        """The last fused states at the distilled tokens (the forward ran with `output_hidden_states=True`)."""
        length = batch["input_ids"].shape[1]
        student = {"text_model": outputs.text_hidden_states[-1][:, :length]}
        student["vision_model"] = outputs.image_hidden_states[-1]
        return {side: student[side] for side in self.teacher.sides}

    def __call__(self, model, outputs, batch, unwrapped) -> torch.Tensor:
        """`outputs` of the student's forward on `batch` (with hidden states); `unwrapped` the model without its
        DDP / accelerate wrapper (the PeftModel under LoRA), which the teacher runs."""
        teacher = self.teacher.tokens(unwrapped, batch)
        student = self.student_tokens(outputs, batch)
        masks = {"text_model": batch.get("attention_mask", torch.ones_like(batch["input_ids"]))}
        total = 0.0
        for side, tokens in student.items():
            mask = masks.get(side, torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device))
            total = total + token_distillation_loss(tokens, teacher[side], mask, self.token_fraction, self.temperature)
        return self.weight * total
