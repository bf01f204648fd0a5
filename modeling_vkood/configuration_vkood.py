"""VK-OOD configuration (Hub remote code: imports only transformers, huggingface_hub and the standard library)."""

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

OOD_GRADIENT_MODES = ("last_iterate", "implicit", "unrolled")
OOD_SCORES = ("log_likelihood", "gem")
CLASSIFIER_HEADS = ("mlp", "gated_product", "meter")
BACKBONES = ("vision_model", "text_model")
# Rows a token-type table may hold; text, image and knowledge are required, a second image (NLVR2) optional.
TOKEN_TYPES = ("text", "image", "second_image", "knowledge")
RETRIEVAL_SCORES = ("itm", "rank_output")

# One checkpoint serves every Auto class of modeling_vkood.py: the Hub copies these files and `from_pretrained(...,
# trust_remote_code=True)` resolves the class named here. NLVR2 has no dedicated transformers Auto class, so it uses
# the nearest one (sentence classification given images). The heads in files of their own (retrieval_vkood.py,
# generation_vkood.py) are added by their own checkpoints, which ship those files (`custom_object_save`).
VKOOD_AUTO_MAP = {
    "AutoConfig": "configuration_vkood.VKOODConfig",
    "AutoModel": "modeling_vkood.VKOODModel",
    "AutoModelForVisualQuestionAnswering": "modeling_vkood.VKOODForQuestionAnswering",
    "AutoModelForSequenceClassification": "modeling_vkood.VKOODForImagesAndTextClassification",
    "AutoProcessor": "processing_vkood.VKOODProcessor",
}
# The generative head's entry, preset only in configs that hold a `decoder_config` (only its checkpoints ship the file).
GENERATION_AUTO_MAP = {"AutoModelForImageTextToText": "generation_vkood.VKOODForConditionalGeneration"}


@strict
class ImplicitOODConfig(PreTrainedConfig):
    r"""
    Inference settings of VK-OOD's implicit OOD layer (`VKOODConfig.ood_config`). The defaults are the layer that the
    knowledge-VQA study (benchmarks/README.md) measured to keep the facts that fit the image; the paper's layer is
    `ImplicitOODConfig(score="gem")` (tau is then calibrated from the scores at the start of training).

    Args:
        projection_dim: width d' of the shared projection in which the mixture is fitted.
        num_components: K, the Gaussian components fitted to each image's tokens.
        max_iter, tol: EM fixed-point budget and relative-change tolerance.
        convergence_check_every: EM iterations between the host's reads of whether every example has converged, to
            stop early (each read is a host synchronisation; converged examples are frozen on the device either
            way). 0: never read, always run `max_iter` iterations: no synchronisation at all, as CUDA graphs and
            `torch.compile(fullgraph=True)` need. The implicit gradient's adjoint solve follows it too.
        variance_floor: added to every variance in the M step (scikit-learn's `reg_covar`). The projected points are
            standardised per vector (coordinates of unit mean square), so the floor also bounds the squared
            Mahalanobis distance by 4 d' / floor and keeps the scores of far items finite enough to have a gradient.
        gradient: "last_iterate" (paper), "implicit" (implicit function theorem) or "unrolled" (reference).
        temperature, threshold: gate = sigmoid((score - tau) / temperature), tau initialised to `threshold`, learnt.
        hard_gate: at inference, gate in {0, 1} (score > tau) instead of the soft sigmoid.
        use_gate: False keeps every knowledge item with gate 1 (the "OOD layer off" ablation; scores still computed).
        score: how an item is scored under the image's mixture: "log_likelihood" (the mixture density with weights
            and log-determinants, relative to the mean log-likelihood of the image's own tokens: 0 for an item as
            likely as they are) or "gem" (the paper: the weight-free GEM energy of Morteza & Li, standardised; it has
            no natural zero, so training calibrates tau first). Both are on the scale sqrt(d'/2), so one threshold
            serves every projection width.
    """

    model_type = "vkood_ood"

    projection_dim: int = 64
    num_components: int = 4
    max_iter: int = 50
    tol: float = 1e-4
    convergence_check_every: int = 5
    variance_floor: float = 0.1
    gradient: str = "last_iterate"
    temperature: float = 1.0
    threshold: float = -3.0
    hard_gate: bool = False
    use_gate: bool = True
    score: str = "log_likelihood"

    def validate_architecture(self):
        """Fail at construction, with the field name, instead of deep inside a forward pass."""
        super().validate_architecture()
        for name in ("projection_dim", "num_components", "max_iter"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ImplicitOODConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("tol", "variance_floor", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ImplicitOODConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.convergence_check_every < 0:
            raise ValueError(
                f"ImplicitOODConfig.convergence_check_every must be >= 0, got {self.convergence_check_every}"
            )
        if self.gradient not in OOD_GRADIENT_MODES:
            raise ValueError(f"ImplicitOODConfig.gradient must be one of {OOD_GRADIENT_MODES}, got {self.gradient!r}")
        if self.score not in OOD_SCORES:
            raise ValueError(f"ImplicitOODConfig.score must be one of {OOD_SCORES}, got {self.score!r}")


# Checkpoints saved before `ood_config` existed hold the layer's settings as flat fields (only those that differed
# from the defaults of then, whose score was "gem"): `VKOODConfig.from_dict` converts them. Their training-only
# fields (now training arguments) are dropped.
LEGACY_OOD_FIELDS = {
    "ood_projection_dim": "projection_dim",
    "ood_num_components": "num_components",
    "ood_max_iter": "max_iter",
    "ood_tol": "tol",
    "ood_convergence_check_every": "convergence_check_every",
    "ood_variance_floor": "variance_floor",
    "ood_gradient": "gradient",
    "ood_temperature": "temperature",
    "ood_threshold": "threshold",
    "ood_hard_gate": "hard_gate",
    "use_ood_gate": "use_gate",
    "ood_score": "score",
}
LEGACY_OOD_DEFAULTS = {"score": "gem"}
LEGACY_TRAINING_FIELDS = (
    "ood_calibration_quantile",
    "ood_alignment_weight",
    "ood_alignment",
    "ood_alignment_temperature",
    "ood_cross_image_weight",
)


def convert_legacy_config(config_dict: dict) -> dict:
    """A config dict saved with flat `ood_*` fields, with them gathered into `ood_config` (a copy; others as given)."""
    if "ood_config" in config_dict:
        return config_dict
    converted = {key: value for key, value in config_dict.items() if key not in LEGACY_TRAINING_FIELDS}
    ood = dict(LEGACY_OOD_DEFAULTS)
    for old, new in LEGACY_OOD_FIELDS.items():
        if old in converted:
            ood[new] = converted.pop(old)
    converted["ood_config"] = ood
    return converted


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
        max_knowledge_items: knowledge items kept per example (M), the one cap on the item count: the processor,
            the training collators and the dataset builders of `train.py` read it; knowledge_max_length: tokens per
            item (Lk).
        knowledge_encoder_layers: how many of the text encoder's blocks a knowledge item goes through before it is
            mean-pooled (None, or more than the encoder has: all). Items are short sentences ("cat is a type of
            animal") and there are 16 per question: through a few blocks they cost a fraction of the step
            (benchmarks/knowledge_cost.py) while the question still goes through all of them. BERT-family encoders
            (embeddings + a block list).
        ood_config: the implicit OOD layer (`ImplicitOODConfig`, dict or instance; default: its defaults).
        projection_dim, k_test: retrieval ITC embedding width and ITM re-ranking depth.
        classifier_dropout: dropout before task classifiers.
        classifier_head: the VQA / NLVR2 classifier over the pooled [text ; image] of each fused pair: "mlp" (the
            paper: Linear-LayerNorm-GELU-Dropout-Linear of width 2H per pair), "meter" (METER's released heads:
            Linear to 2H, LayerNorm, GELU, Linear, no dropout; converted METER checkpoints use it) or
            "gated_product" (a GeGLU layer over [text ; image ; text * image], which learns answers that hinge on
            matching a word of the question with the image, such as negated yes/no questions, much faster).
        token_types: the rows of the token-type table, in order, added to the fused streams: "text", "image",
            "knowledge" and optionally "second_image" (NLVR2's second image gets its own row, as in METER).
        num_images: images per example of `VKOODForImagesAndTextClassification` (NLVR2: 2; SNLI-VE: 1).
        interpolate_pos_encoding: let the vision tower take any image size by resizing its position table
            (bicubic, as METER resizes its checkpoints); False: only the tower's own `image_size`.
        retrieval_score: how the retrieval head scores a fused pair: "itm" (ITM logit margin) or "rank_output"
            (METER's fine-tuned retrieval score, a linear map of the pooled output).
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
        "ood_config": SubConfigSpec(config_class=ImplicitOODConfig),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    decoder_config: dict | PreTrainedConfig | None = None
    ood_config: dict | PreTrainedConfig | None = None
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
    token_types: list[str] = field(default_factory=lambda: ["text", "image", "knowledge"])
    num_images: int = 2
    interpolate_pos_encoding: bool = False
    retrieval_score: str = "itm"
    max_knowledge_items: int = 16
    knowledge_max_length: int = 32
    knowledge_encoder_layers: int | None = None
    projection_dim: int = 256
    k_test: int = 128
    pretrained_backbones: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PreTrainedConfig.from_dict`, converting a checkpoint saved with flat `ood_*` fields first."""
        return super().from_dict(convert_legacy_config(config_dict), **kwargs)

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
            "projection_dim",
            "k_test",
            "num_images",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"VKOODConfig.{name} must be positive, got {getattr(self, name)}")
        if self.knowledge_encoder_layers is not None and self.knowledge_encoder_layers < 1:
            raise ValueError(
                f"VKOODConfig.knowledge_encoder_layers must be None or positive, got {self.knowledge_encoder_layers}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"VKOODConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.classifier_head not in CLASSIFIER_HEADS:
            raise ValueError(
                f"VKOODConfig.classifier_head must be one of {CLASSIFIER_HEADS}, got {self.classifier_head!r}"
            )
        if self.retrieval_score not in RETRIEVAL_SCORES:
            raise ValueError(
                f"VKOODConfig.retrieval_score must be one of {RETRIEVAL_SCORES}, got {self.retrieval_score!r}"
            )
        types = list(self.token_types)
        if (
            len(set(types)) != len(types)
            or not set(types) <= set(TOKEN_TYPES)
            or not {"text", "image", "knowledge"} <= set(types)
        ):
            raise ValueError(
                f"VKOODConfig.token_types must name each row once, among {TOKEN_TYPES}, with text, image and "
                f"knowledge; got {types}"
            )
        unknown = sorted(set(self.pretrained_backbones) - set(BACKBONES))
        if unknown:
            raise ValueError(f"VKOODConfig.pretrained_backbones: {unknown} are not among {BACKBONES}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"VKOODConfig.{name} must be in [0, 1), got {getattr(self, name)}")


__all__ = ["ImplicitOODConfig", "VKOODConfig"]
