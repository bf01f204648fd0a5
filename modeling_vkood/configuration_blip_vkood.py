"""VK-OOD-BLIP configuration (Hub remote code: imports only transformers and its flat siblings).

`VKOODBlipConfig` is transformers' `BlipConfig` (vision, text encoder and decoder sub-configs, unchanged, so that a
`Salesforce/blip-vqa-*` config.json reads as one) plus what VK-OOD adds: the OOD layer's settings, the knowledge caps
the processor shares, and BLIP's answer-ranking inference (an answer list and its depth).
"""

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import BlipConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_vkood import ImplicitOODConfig
from .pipeline_vkood import VQA_PIPELINE

INFERENCE_MODES = ("generate", "rank")
BLIP_BACKBONES = ("vision_model", "text_encoder", "text_decoder")
# The Auto classes a VK-OOD-BLIP checkpoint answers to (`save_pretrained` writes them, with these files).
VKOOD_BLIP_AUTO_MAP = {
    "AutoConfig": "configuration_blip_vkood.VKOODBlipConfig",
    "AutoModelForVisualQuestionAnswering": "modeling_blip_vkood.VKOODBlipForQuestionAnswering",
}


@strict
class VKOODBlipConfig(BlipConfig):
    r"""
    Configuration of `VKOODBlipForQuestionAnswering`: BLIP's VQA model (vision encoder, question encoder, answer
    decoder; `vision_config` / `text_config` as in `BlipConfig`) with knowledge items that enter the question
    encoder's cross-attention, gated by VK-OOD's implicit OOD layer.

    Args:
        ood_config: the implicit OOD layer (`ImplicitOODConfig`, dict or instance; default: its defaults). It scores
            the items against BLIP's image tokens, in the vision width.
        max_knowledge_items: knowledge items kept per question (M), the cap the processor reads.
        knowledge_max_length: tokens per item (Lk), special tokens included.
        inference: how the VQA pipeline answers by default: "generate" (the decoder's generated text, as
            transformers' `BlipForQuestionAnswering.generate`) or "rank" (BLIP's rank inference: the decoder's
            likelihood of each candidate of `answer_list`, top `k_test` by their first token re-ranked by the whole
            answer, as BLIP's VQAv2 evaluation).
        answer_list: the candidate answers of rank inference (BLIP's VQAv2 list has 3,128); None: none shipped, the
            caller passes a list.
        k_test: candidates re-ranked by their full likelihood (BLIP: 128).
        pretrained_backbones: the BLIP modules that hold pretrained weights, the ones LoRA adapts (default all three:
            the model is loaded from a BLIP checkpoint); [] for a model built from a config and trained from scratch.
    """

    model_type = "vkood_blip"
    sub_configs_defaults = {
        **BlipConfig.sub_configs_defaults,
        "ood_config": SubConfigSpec(config_class=ImplicitOODConfig),
    }

    ood_config: dict | ImplicitOODConfig | None = None
    max_knowledge_items: int = 16
    knowledge_max_length: int = 32
    inference: str = "generate"
    answer_list: list[str] | None = None
    k_test: int = 128
    pretrained_backbones: list[str] = field(default_factory=lambda: list(BLIP_BACKBONES))
    custom_pipelines: dict = field(default_factory=lambda: dict(VQA_PIPELINE))

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**VKOOD_BLIP_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    def validate_architecture(self):
        """Fail at construction, with the field name, instead of deep inside a forward pass."""
        super().validate_architecture()
        for name in ("max_knowledge_items", "knowledge_max_length", "k_test"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VKOODBlipConfig.{name} must be positive, got {getattr(self, name)}")
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"VKOODBlipConfig.inference must be one of {INFERENCE_MODES}, got {self.inference!r}")
        unknown = sorted(set(self.pretrained_backbones) - set(BLIP_BACKBONES))
        if unknown:
            raise ValueError(f"VKOODBlipConfig.pretrained_backbones: {unknown} are not among {BLIP_BACKBONES}")
        if self.answer_list is not None and not all(isinstance(answer, str) for answer in self.answer_list):
            raise ValueError("VKOODBlipConfig.answer_list must be a list of strings")


VKOODBlipConfig.register_for_auto_class("AutoConfig")

__all__ = ["VKOODBlipConfig"]
