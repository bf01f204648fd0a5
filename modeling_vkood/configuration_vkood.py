"""VK-OOD configuration (Hub remote code: imports only transformers, huggingface_hub and the standard library)."""

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

OOD_GRADIENT_MODES = ("last_iterate", "implicit", "unrolled")
CLASSIFIER_HEADS = ("mlp", "gated_product")
BACKBONES = ("vision_model", "text_model")
OOD_SCORES = ("gem", "log_likelihood")
OOD_ALIGNMENTS = ("mean_direction", "contrastive", "gate")
# The alignments trained on `knowledge_relevance` (the items that state the training answer).
RELEVANCE_ALIGNMENTS = ("contrastive", "gate")

# One checkpoint serves every Auto class: the Hub copies these files and `from_pretrained(..., trust_remote_code=True)`
# resolves the class named here. NLVR2 and retrieval have no dedicated transformers Auto class, so they use the
# nearest ones (sentence classification given images; CLIP-family image-text matching).
VKOOD_AUTO_MAP = {
    "AutoConfig": "configuration_vkood.VKOODConfig",
    "AutoModel": "modeling_vkood.VKOODModel",
    "AutoModelForVisualQuestionAnswering": "modeling_vkood.VKOODForQuestionAnswering",
    "AutoModelForSequenceClassification": "modeling_vkood.VKOODForImagesAndTextClassification",
    "AutoModelForZeroShotImageClassification": "modeling_vkood.VKOODForImageTextRetrieval",
    "AutoProcessor": "processing_vkood.VKOODProcessor",
}
# The generative head's entry, preset only in configs that hold a `decoder_config` (only its checkpoints ship the file).
GENERATION_AUTO_MAP = {"AutoModelForImageTextToText": "generation_vkood.VKOODForConditionalGeneration"}


@strict
class VKOODConfig(PreTrainedConfig):
    r"""
    Configuration of a VK-OOD model: a vision encoder and a text encoder (any Hugging Face backbones, given as
    sub-configs), METER-style co-attention fusion over [text ; knowledge] and image tokens, and the implicit
    differentiable OOD layer that gates knowledge items by how well they fit the image.

    Defaults follow the paper: CLIP-ViT-B/16 vision tower, RoBERTa-base text encoder, 6 fusion layers of width 768.

    Args:
        vision_config / text_config: backbone configs (dict or `PreTrainedConfig`; `model_type` picks the class).
        hidden_size, num_fusion_layers, num_attention_heads, intermediate_size: fusion transformer sizes.
        max_knowledge_items: knowledge items kept per example (M); knowledge_max_length: tokens per item (Lk).
        ood_projection_dim: width d' of the shared projection in which the mixture is fitted.
        ood_num_components: K, the Gaussian components fitted to each image's tokens.
        ood_max_iter, ood_tol: EM fixed-point budget and relative-change tolerance.
        ood_convergence_check_every: how many EM iterations pass between the host's reads of whether every example
            has converged, to stop early (each read is a host synchronisation; converged examples are frozen on the
            device either way). 0: never read, always run `ood_max_iter` iterations: no synchronisation at all, as
            CUDA graphs and `torch.compile(fullgraph=True)` need. The implicit gradient's adjoint solve follows it too.
        ood_variance_floor: added to every variance in the M step (scikit-learn's `reg_covar`). The projected points
            are standardised per vector (coordinates of unit mean square, on a sphere of radius sqrt(d')), so the
            floor also bounds the squared Mahalanobis distance by 4 d' / floor: 0.1 keeps scores of far items in the
            tens instead of the thousands, where every gate and its gradient would be 0.
        ood_gradient: "last_iterate" (paper), "implicit" (implicit function theorem) or "unrolled" (reference).
        ood_temperature, ood_threshold: gate = sigmoid((score - tau) / temperature), tau initialised to the threshold
            and learnt; scores are standardised so that one threshold works for any d'.
        ood_calibration_quantile: if set, tau is re-initialised to this quantile of the items' scores before
            training (`ImplicitOODLayer.calibrate_threshold`, which the vkood Trainer calls on the examples of the
            first optimizer step, gathered over all processes), so the knowledge path starts open: knowledge encoded
            by a text model starts far from the image tokens, and with every gate at 0 no gradient would ever reach
            it. Done once: the flag is saved with the weights. None keeps `ood_threshold`.
        ood_hard_gate: at inference, gate in {0, 1} (score > tau) instead of the soft sigmoid.
        use_ood_gate: False keeps every knowledge item with gate 1 (the "OOD layer off" ablation).
        ood_score: how an item is scored under the image's mixture: "gem" (the paper: the weight-free GEM energy of
            Morteza & Li, standardised) or "log_likelihood" (the mixture density with weights and log-determinants,
            relative to the mean log-likelihood of the image's own tokens, on the same scale).
        ood_alignment_weight: weight of the optional cross-modal alignment loss (VQA and NLVR2 heads); 0 disables it.
        ood_alignment: which alignment loss: "mean_direction" pulls every projected knowledge item towards the
            image's mean direction on the hypersphere (whether it fits the image or not); "contrastive" is an
            InfoNCE on the OOD scores over each question's candidates: the items that state the training answer
            (`knowledge_relevance`) must outscore the others; "gate" adds to it a class-balanced binary cross-entropy
            of the gate against the same relevance, on detached scores: the InfoNCE orders the scores, the BCE
            places tau (VQA head; both need `knowledge_relevance` in the batch, e.g. `VQACollator(answer_relevance=True)`).
        ood_alignment_temperature: divides the scores in the contrastive alignment's logits.
        ood_cross_image_weight: weight, within the "contrastive" and "gate" alignments, of their cross-image term: an
            InfoNCE over the batch's images, in which each item that states a training answer must score higher
            under its own image's mixture than under the other rows' images'. The candidates of one question differ
            only in their concept; the other images add negatives that differ in what they show (on knowledge-VQA
            it made every seed's layer tell the shapes apart). 0 disables it.
        projection_dim, k_test: retrieval ITC embedding width and ITM re-ranking depth.
        classifier_dropout: dropout before task classifiers.
        classifier_head: the VQA / NLVR2 classifier over the pooled [text ; image] of each fused pair: "mlp" (METER,
            the paper) or "gated_product" (a GeGLU layer over [text ; image ; text * image], which learns answers that
            hinge on matching a word of the question with the image, such as negated yes/no questions, much faster).
        pretrained_backbones: the backbones (of "vision_model", "text_model") whose weights came from a pretrained
            checkpoint; the others were trained from scratch. A run continuing from this checkpoint adapts the first
            with LoRA and trains the others in full.
        decoder_config: the text decoder of `VKOODForConditionalGeneration` (any causal LM config that supports
            cross-attention, e.g. BERT with `is_decoder=True, add_cross_attention=True`); None for the other heads.
            Its `bos_token_id` / `eos_token_id` / `pad_token_id` are the decoder's start, end and padding tokens.
    """

    model_type = "vkood"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={"patch_size": 16, "image_size": 224, "hidden_size": 768, "projection_dim": 512},
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="roberta"),
        "decoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    decoder_config: dict | PreTrainedConfig | None = None
    hidden_size: int = 768
    num_fusion_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    classifier_dropout: float = 0.1
    classifier_head: str = "mlp"
    max_knowledge_items: int = 16
    knowledge_max_length: int = 32
    ood_projection_dim: int = 64
    ood_num_components: int = 4
    ood_max_iter: int = 50
    ood_tol: float = 1e-4
    ood_convergence_check_every: int = 5
    ood_variance_floor: float = 0.1
    ood_gradient: str = "last_iterate"
    ood_temperature: float = 1.0
    ood_threshold: float = -3.0
    ood_calibration_quantile: float | None = 0.1
    ood_hard_gate: bool = False
    use_ood_gate: bool = True
    ood_score: str = "gem"
    ood_alignment_weight: float = 0.0
    ood_alignment: str = "mean_direction"
    ood_alignment_temperature: float = 1.0
    ood_cross_image_weight: float = 0.0
    projection_dim: int = 256
    k_test: int = 128
    pretrained_backbones: list[str] = field(default_factory=list)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        preset = dict(VKOOD_AUTO_MAP)
        if self.decoder_config is not None:
            # A causal decoder that reads the fused states through cross-attention, whatever the given config said.
            self.decoder_config.is_decoder = True
            self.decoder_config.add_cross_attention = True
            preset.update(GENERATION_AUTO_MAP)
        preset.update(getattr(self, "auto_map", None) or {})
        self.auto_map = preset

    def validate_architecture(self):
        """Fail at construction, with the field name, instead of deep inside a forward pass."""
        super().validate_architecture()
        positive = (
            "hidden_size",
            "num_fusion_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_knowledge_items",
            "knowledge_max_length",
            "ood_projection_dim",
            "ood_num_components",
            "ood_max_iter",
            "projection_dim",
            "k_test",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"VKOODConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("ood_tol", "ood_variance_floor", "ood_temperature", "ood_alignment_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"VKOODConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"VKOODConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.ood_gradient not in OOD_GRADIENT_MODES:
            raise ValueError(f"VKOODConfig.ood_gradient must be one of {OOD_GRADIENT_MODES}, got {self.ood_gradient!r}")
        if self.ood_score not in OOD_SCORES:
            raise ValueError(f"VKOODConfig.ood_score must be one of {OOD_SCORES}, got {self.ood_score!r}")
        if self.ood_alignment not in OOD_ALIGNMENTS:
            raise ValueError(f"VKOODConfig.ood_alignment must be one of {OOD_ALIGNMENTS}, got {self.ood_alignment!r}")
        if self.classifier_head not in CLASSIFIER_HEADS:
            raise ValueError(
                f"VKOODConfig.classifier_head must be one of {CLASSIFIER_HEADS}, got {self.classifier_head!r}"
            )
        if self.ood_calibration_quantile is not None and not 0.0 <= self.ood_calibration_quantile <= 1.0:
            raise ValueError(
                f"VKOODConfig.ood_calibration_quantile must be in [0, 1], got {self.ood_calibration_quantile}"
            )
        if self.ood_convergence_check_every < 0:
            raise ValueError(
                f"VKOODConfig.ood_convergence_check_every must be >= 0, got {self.ood_convergence_check_every}"
            )
        if self.ood_alignment_weight < 0:
            raise ValueError(f"VKOODConfig.ood_alignment_weight must be >= 0, got {self.ood_alignment_weight}")
        if self.ood_cross_image_weight < 0:
            raise ValueError(f"VKOODConfig.ood_cross_image_weight must be >= 0, got {self.ood_cross_image_weight}")
        if self.ood_cross_image_weight > 0 and self.ood_alignment not in RELEVANCE_ALIGNMENTS:
            raise ValueError(
                f"VKOODConfig.ood_cross_image_weight needs an ood_alignment among {RELEVANCE_ALIGNMENTS} "
                f"(its positives are the relevant items), got {self.ood_alignment!r}"
            )
        unknown = sorted(set(self.pretrained_backbones) - set(BACKBONES))
        if unknown:
            raise ValueError(f"VKOODConfig.pretrained_backbones: {unknown} are not among {BACKBONES}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"VKOODConfig.{name} must be in [0, 1), got {getattr(self, name)}")


__all__ = ["VKOODConfig"]
