"""Oracle outputs of METER's OWN model code on tiny random models, for testing a METER -> vkood checkpoint converter.

METER's files are read, verbatim, from ../shared/refdata/meter (MIT; see its README.refdata.md) and imported from
there: nothing of them is copied here. They were written for pytorch_lightning 1.3.2, transformers 4.6 and torch 1.7,
so this script first installs a few named shims (each says which 2021 API it stands in for), then, for one task:

1. writes a tiny OpenAI-CLIP TorchScript archive (the file `clip_model.build_model` loads) and a tiny RoBERTa folder;
2. builds `METERTransformerSS(config)` with a tiny config in METER's own `config()` layout, perturbs every floating
   tensor of its state dict (seeded) so that no weight sits at its initial value, and saves it as a Lightning-1.3-style
   checkpoint `meter_TASK.ckpt` (whose pickle references `pytorch_lightning` classes, as the released files do);
3. runs METER's own `infer` and heads, as `objectives.py` applies them, on seeded inputs -> `outputs_S.safetensors`;
4. builds a fresh model at a second image size that loads the checkpoint through METER's own `test_only` path
   (which resizes the position embedding with METER's `adapt_position_encoding`) -> `outputs_S2.safetensors`.

Run it in its own process (the shims live in `sys.modules` for the rest of the process):

    python -m tests.utils.meter_oracle --task nlvr2 --out DIR [--image_size 32] [--second_image_size 48] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tests.utils.paths import REFDATA

METER_ROOT = REFDATA / "meter" if REFDATA is not None else None
TASK_LOSSES = {  # `loss_names` of config.py's named configs (task_mlm_itm_*, task_finetune_*)
    "pretrain": {"itm": 1, "mlm": 1},
    "vqa": {"vqa": 1},
    "nlvr2": {"nlvr2": 1},
    "snli": {"snli": 1},
    "irtr": {"itm": 0.5, "irtr": 1},
}
BATCH, MAX_TEXT_LEN, TEXT_LENGTHS = 3, 40, (40, 17, 5)
HIDDEN, VISION_WIDTH, PATCH, CLIP_FILE_LAYERS = 64, 64, 16, 3
ROBERTA = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
VQA_LABELS = 7
BOS, PAD, EOS = 0, 1, 2  # RoBERTa's <s>, <pad>, </s>
# Keys that the released checkpoints hold but today's modules do not (METER loads with strict=False, so they are
# skipped): transformers 4.6 saved RobertaEmbeddings.position_ids as a persistent buffer, and METER's CLIP class had a
# `token_embedding` until commit f4f0934 (after the checkpoints were released). The oracle checkpoint holds them too.
LEGACY_KEYS = ("text_transformer.embeddings.position_ids", "vit_model.token_embedding.weight")


# ------------------------------------------------------------------------------------------------------------- shims


class AttributeDict(dict):
    """Stands in for pytorch_lightning 1.3 `utilities.parsing.AttributeDict` (the type of `LightningModule.hparams`)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as error:
            raise AttributeError(key) from error

    def __setattr__(self, key, value):
        self[key] = value


class LightningModule(nn.Module):
    """Stands in for pytorch_lightning 1.3 `LightningModule`: an nn.Module whose `save_hyperparameters()` (no
    arguments) stores the caller's `__init__` arguments as `self.hparams` (METER reads `self.hparams.config`)."""

    def save_hyperparameters(self) -> None:
        frame = inspect.getargvalues(inspect.currentframe().f_back)
        self._hparams_name = "kwargs"  # what Lightning 1.3 records when save_hyperparameters() gets no argument
        self.hparams = AttributeDict({name: frame.locals[name] for name in frame.args if name != "self"})


class ModelCheckpoint:
    """Stands in for pytorch_lightning 1.3 `callbacks.ModelCheckpoint`; 1.3 keys callback states by this class."""


class _Metric:
    """Stands in for METER's `gadgets/my_metrics.py` metrics (Lightning `Metric`s; training-time logging only, and
    their states are not persistent, so they add nothing to the state dict)."""


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


def _absent(what: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"{what} is a stand-in of the METER oracle; inference never calls it")

    return call


def install_shims() -> None:
    """Make `meter/modules/meter_module.py` importable and runnable under today's packages."""
    if str(METER_ROOT) not in sys.path:
        sys.path.insert(0, str(METER_ROOT))

    # pytorch_lightning 1.3 (not installed): the three names METER's model and a 1.3 checkpoint use. The classes keep
    # their Lightning module paths, so that a checkpoint pickled here references `pytorch_lightning.*` like a real one.
    AttributeDict.__module__ = "pytorch_lightning.utilities.parsing"
    LightningModule.__module__ = "pytorch_lightning.core.lightning"
    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    _module("pytorch_lightning", LightningModule=LightningModule, __version__="1.3.2")
    _module("pytorch_lightning.core")
    _module("pytorch_lightning.core.lightning", LightningModule=LightningModule)
    _module("pytorch_lightning.utilities")
    _module("pytorch_lightning.utilities.parsing", AttributeDict=AttributeDict)
    _module("pytorch_lightning.callbacks", ModelCheckpoint=ModelCheckpoint)
    _module("pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=ModelCheckpoint)

    # transformers 4.6 names that transformers 5 moved (to pytorch_utils) or removed; bert_model.py imports them from
    # modeling_utils, meter_utils.py imports AdamW from transformers.optimization.
    import transformers.modeling_utils
    import transformers.optimization
    import transformers.pytorch_utils

    shims = {
        "apply_chunking_to_forward": transformers.pytorch_utils.apply_chunking_to_forward,  # BertCrossLayer's FFN
        "prune_linear_layer": transformers.pytorch_utils.prune_linear_layer,  # head pruning, never called
        "find_pruneable_heads_and_indices": _absent("find_pruneable_heads_and_indices"),  # removed; never called
    }
    for name, value in shims.items():
        if not hasattr(transformers.modeling_utils, name):
            setattr(transformers.modeling_utils, name, value)
    if not hasattr(transformers.optimization, "AdamW"):
        transformers.optimization.AdamW = torch.optim.AdamW  # removed in transformers 5; only set_schedule uses it

    # METER modules that refdata does not carry (meter_module / objectives / meter_utils import them): Swin (needs timm;
    # the CLIP path never calls it), distributed gather (retrieval recall only) and the training metrics.
    import meter.modules  # noqa: F401  (namespace package of the refdata folder)

    _module("meter.modules.swin_transformer")
    _module("meter.modules.swin_helpers", swin_adapt_position_encoding=_absent("swin_adapt_position_encoding"))
    _module("meter.modules.dist_utils", all_gather=_absent("all_gather"))
    _module("meter.gadgets")
    _module("meter.gadgets.my_metrics", Accuracy=_Metric, VQAScore=_Metric, Scalar=_Metric)

    # torch 1.7's torch.load unpickled anything; torch >= 2.6 loads weights only unless the classes are allowed.
    # METER's own test_only branch calls torch.load(load_path) on a checkpoint keyed by the Lightning class above.
    torch.serialization.add_safe_globals([ModelCheckpoint])

    # transformers 4.6 `file_utils.add_code_sample_docstrings(tokenizer_class=...)`: transformers 5 renamed the
    # argument, and bert_model.py's unused BertModel / Bert*For* classes are decorated with it at import time. The
    # decorator only writes docstrings: it is a no-op while METER's modules are imported, and is restored afterwards.
    import transformers.file_utils

    original = transformers.file_utils.add_code_sample_docstrings
    transformers.file_utils.add_code_sample_docstrings = lambda *docstrings, **kwargs: lambda function: function
    try:
        importlib.import_module("meter.modules.meter_module")
    finally:
        transformers.file_utils.add_code_sample_docstrings = original


def _extended_attention_mask_4_6(self, attention_mask, input_shape, device):
    """transformers 4.6 `ModuleUtilsMixin.get_extended_attention_mask` (encoder case; removed in transformers 5):
    (batch, seq) 1/0 mask -> additive (batch, 1, 1, seq) mask of 0 / -10000 in the model's dtype."""
    extended = attention_mask[:, None, None, :] if attention_mask.dim() == 2 else attention_mask[:, None, :, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * -10000.0


def adapt_text_transformer(model: nn.Module) -> None:
    """Give METER's `text_transformer` (a transformers-5 RobertaModel) the 4.6 behaviour `infer()` relies on.

    - `infer` calls `self.text_transformer.get_extended_attention_mask(masks, shape, device)`, gone in transformers 5:
      bound per instance to the 4.6 implementation above;
    - `infer` runs `layer(text_embeds, extend_text_masks)[0]`: a 4.6 RobertaLayer returned a tuple, a 5.x one returns
      the tensor (so `[0]` would silently take the first batch row): a forward hook wraps the output in a tuple;
    - eager attention (softmax(QK^T * d^-0.5 + mask) V, the 4.6 computation) instead of the SDPA default; the
      attention mask is the additive 4D mask above, as in 4.6.
    The layers' weights and their arithmetic are transformers' own. (The hook makes the instance's own
    `RobertaModel.forward` unusable, whose encoder loop expects tensors: only METER's `infer` loop runs it here.)
    """
    text = model.text_transformer
    text.set_attn_implementation("eager")
    text.get_extended_attention_mask = types.MethodType(_extended_attention_mask_4_6, text)
    for layer in text.encoder.layer:
        layer.register_forward_hook(lambda module, args, output: (output,) if torch.is_tensor(output) else output)


# ---------------------------------------------------------------------------------------------------- tiny backbones


def save_tiny_clip(path: Path, image_size: int, generator: torch.Generator) -> Path:
    """A TorchScript archive with OpenAI CLIP's state-dict layout (the format `clip_model.build_model` reads): a
    ViT of width 64 (METER gives it 64 // 64 = 1 head), patch 16, 3 vision blocks (METER builds layers - 1 = 2 of
    them), and the small text tower whose keys build_model reads for its sizes. build_model's non-TorchScript
    fallback cannot run (it reads an unbound `jit`), so the file must be a TorchScript archive, like OpenAI's."""
    width, text_width, embed_dim, context, vocab = VISION_WIDTH, 64, 32, 8, 16
    grid = image_size // PATCH
    shapes: dict[str, tuple[int, ...]] = {
        "positional_embedding": (context, text_width),
        "text_projection": (text_width, embed_dim),
        "logit_scale": (),
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (grid * grid + 1, width),
        "visual.proj": (width, embed_dim),
        "visual.conv1.weight": (width, 3, PATCH, PATCH),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
        "visual.ln_post.weight": (width,),
        "visual.ln_post.bias": (width,),
        "token_embedding.weight": (vocab, text_width),
        "ln_final.weight": (text_width,),
        "ln_final.bias": (text_width,),
    }
    for prefix, layers, w in (("visual.transformer", CLIP_FILE_LAYERS, width), ("transformer", 1, text_width)):
        for index in range(layers):
            block = f"{prefix}.resblocks.{index}"
            shapes.update(
                {
                    f"{block}.attn.in_proj_weight": (3 * w, w),
                    f"{block}.attn.in_proj_bias": (3 * w,),
                    f"{block}.attn.out_proj.weight": (w, w),
                    f"{block}.attn.out_proj.bias": (w,),
                    f"{block}.ln_1.weight": (w,),
                    f"{block}.ln_1.bias": (w,),
                    f"{block}.mlp.c_fc.weight": (4 * w, w),
                    f"{block}.mlp.c_fc.bias": (4 * w,),
                    f"{block}.mlp.c_proj.weight": (w, 4 * w),
                    f"{block}.mlp.c_proj.bias": (w,),
                    f"{block}.ln_2.weight": (w,),
                    f"{block}.ln_2.bias": (w,),
                }
            )
    root = nn.Module()
    for key, shape in shapes.items():
        *path_parts, leaf = key.split(".")
        owner = root
        for part in path_parts:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        value = torch.randn(shape, generator=generator) * 0.05
        if leaf == "weight" and path_parts[-1].startswith("ln"):
            value = value + 1.0
        owner.register_parameter(leaf, nn.Parameter(value))
    torch.jit.save(torch.jit.script(root), str(path))
    return path


def save_tiny_roberta(folder: Path, generator: torch.Generator) -> Path:
    """A 2-layer RobertaModel of width 64 laid out as FacebookAI/roberta-base (type_vocab_size 1, pad 1, LayerNorm eps
    1e-5, with pooler); weights only, METER's model code never loads the tokenizer."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        **ROBERTA,
        max_position_embeddings=64,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = RobertaModel(config, add_pooling_layer=True)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.05, generator=generator)
    model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------------ config, model


def meter_config_keys() -> list[str]:
    """The names `config()` of METER's config.py assigns (read with ast: no sacred needed)."""
    tree = ast.parse((METER_ROOT / "meter" / "config.py").read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "config")
    return [target.id for node in function.body if isinstance(node, ast.Assign) for target in node.targets]


def tiny_config(task: str, image_size: int, clip_path: Path, roberta_path: Path, vqa_labels: int = VQA_LABELS) -> dict:
    """METER's `config()` dict (every key it defines, same order) with tiny sizes; CLIP-16 + RoBERTa as released."""
    loss_names = dict.fromkeys(["itm", "mlm", "mpp", "vqa", "vcr", "vcr_qar", "nlvr2", "irtr", "contras", "snli"], 0)
    loss_names.update(TASK_LOSSES[task])
    config = {
        "exp_name": f"tiny_{task}",
        "seed": 0,
        "datasets": [],
        "loss_names": loss_names,
        "batch_size": BATCH,
        "train_transform_keys": ["clip"],
        "val_transform_keys": ["clip"],
        "image_size": image_size,
        "patch_size": PATCH,
        "draw_false_image": 0,
        "image_only": False,
        "resolution_before": 224,  # Swin only; the CLIP configs keep the default
        "vqav2_label_size": vqa_labels,
        "max_text_len": MAX_TEXT_LEN,
        "tokenizer": str(roberta_path),
        "vocab_size": ROBERTA["vocab_size"],
        "whole_word_masking": False,
        "mlm_prob": 0.15,
        "draw_false_text": 0,
        "num_top_layer": 2,
        "input_image_embed_size": VISION_WIDTH,
        "input_text_embed_size": ROBERTA["hidden_size"],
        "vit": str(clip_path),
        "hidden_size": HIDDEN,
        "num_heads": 2,
        "num_layers": 2,
        "mlp_ratio": 4,  # co-attention layers' FFN: hidden_size * mlp_ratio = 256
        "drop_rate": 0.1,
        "optim_type": "adamw",
        "learning_rate": 1e-5,
        "weight_decay": 0.01,
        "decay_power": 1,
        "max_epoch": 10,
        "max_steps": None,
        "warmup_steps": 0.1,
        "end_lr": 0,
        "lr_mult_head": 5,
        "lr_mult_cross_modal": 5,
        "get_recall_metric": False,
        "resume_from": None,
        "fast_dev_run": False,
        "val_check_interval": 1.0,
        "test_only": False,
        "data_root": "",
        "log_dir": "result",
        "per_gpu_batchsize": BATCH,
        "num_gpus": 1,
        "num_nodes": 1,
        "load_path": "",
        "num_workers": 0,
        "precision": 32,
    }
    expected = meter_config_keys()
    assert list(config) == expected, f"config keys differ from METER's config(): {expected}"
    return config


def build_meter(config: dict) -> nn.Module:
    """METER's own `METERTransformerSS(config)`, in eval mode, with the text encoder adapted as documented above."""
    from meter.modules.meter_module import METERTransformerSS

    model = METERTransformerSS(config)
    adapt_text_transformer(model)
    return model.eval()


@torch.no_grad()
def perturb(model: nn.Module, generator: torch.Generator) -> None:
    """Move every floating tensor of the state dict off its initial value, in place (so that tensors METER ties,
    like `rank_output` = a view of `itm_score.fc` rows 1:, stay tied): + 0.02 N(0, 1) for matrices, + 0.1 N(0, 1) for
    vectors (LayerNorm weights become 1 + noise, zero biases nonzero, NLVR2's copied token-type rows 1 and 2 differ)."""
    state = model.state_dict()
    before = {key: tensor.clone() for key, tensor in state.items() if tensor.is_floating_point()}
    for key in before:
        scale = 0.02 if state[key].dim() >= 2 else 0.1
        state[key].add_(scale * torch.randn(state[key].shape, generator=generator))
    unchanged = [key for key, tensor in before.items() if (tensor == state[key]).any()]
    assert not unchanged, f"still (partly) at their initial values: {unchanged}"


# ------------------------------------------------------------------------------------------------------ inputs, runs


def make_texts(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa-layout ids: <s> ... </s> then <pad>, per-row lengths TEXT_LENGTHS; masks 1 for real tokens."""
    ids = torch.full((BATCH, MAX_TEXT_LEN), PAD, dtype=torch.long)
    masks = torch.zeros((BATCH, MAX_TEXT_LEN), dtype=torch.long)
    for row, length in enumerate(TEXT_LENGTHS):
        ids[row, 0], ids[row, length - 1] = BOS, EOS
        ids[row, 1 : length - 1] = torch.randint(4, ROBERTA["vocab_size"], (length - 2,), generator=generator)
        masks[row, :length] = 1
    return ids, masks


def run_meter(model: nn.Module, task: str, texts: dict, images: dict) -> dict[str, torch.Tensor]:
    """METER's own `infer` and heads, as objectives.py applies them (images go in as a list: infer takes [0])."""
    batch = dict(texts, text_labels=torch.full_like(texts["text_ids"], -100))
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if task == "nlvr2":  # compute_nlvr2: image_0 with token type 1, image_1 with token type 2
            batch.update(image_0=[images["image"]], image_1=[images["image_1"]])
            passes = [model.infer(batch, image_token_type_idx=index) for index in (1, 2)]
            for suffix, result in zip(("_0", "_1"), passes):
                outputs.update({f"{name}{suffix}": result[name] for name in ("cls_feats", "text_feats", "image_feats")})
            cls_pair = torch.cat([passes[0]["cls_feats"], passes[1]["cls_feats"]], dim=-1)
            outputs["nlvr2_logits"] = model.nlvr2_classifier(cls_pair)
            return outputs
        batch["image"] = [images["image"]]
        result = model.infer(batch)
        outputs.update({name: result[name] for name in ("cls_feats", "text_feats", "image_feats")})
        cls_feats = result["cls_feats"]
        if task == "pretrain":
            outputs["itm_logits"] = model.itm_score(cls_feats)
            outputs["mlm_logits"] = model.mlm_score(result["text_feats"])
        elif task == "vqa":
            outputs["vqa_logits"] = model.vqa_classifier(cls_feats)
        elif task == "snli":
            outputs["snli_logits"] = model.snli_classifier(cls_feats)
        elif task == "irtr":
            outputs["rank_scores"] = model.rank_output(cls_feats)[:, 0]
            outputs["itm_logits"] = model.itm_score(cls_feats)
    return outputs


def lightning_checkpoint(model: nn.Module, config: dict, generator: torch.Generator) -> dict:
    """The dict pytorch_lightning 1.3.2 `dump_checkpoint` writes for METER (run.py's ModelCheckpoint monitors
    val/the_metric), with the released files' legacy keys added to the state dict."""
    state_dict = OrderedDict(model.state_dict())
    max_positions = model.text_transformer.config.max_position_embeddings
    state_dict[LEGACY_KEYS[0]] = torch.arange(max_positions).expand((1, -1))
    clip_tokens = torch.jit.load(config["vit"], map_location="cpu").state_dict()["token_embedding.weight"]
    state_dict[LEGACY_KEYS[1]] = clip_tokens + 0.02 * torch.randn(clip_tokens.shape, generator=generator)
    return {
        "epoch": 9,
        "global_step": 1234,
        "pytorch-lightning_version": "1.3.2",
        "state_dict": state_dict,
        "callbacks": {
            ModelCheckpoint: {
                "monitor": "val/the_metric",
                "best_model_score": torch.tensor(0.75),
                "best_model_path": "result/tiny/version_0/checkpoints/epoch=9-step=1233.ckpt",
                "current_score": torch.tensor(0.75),
                "dirpath": "result/tiny/version_0/checkpoints",
            }
        },
        "optimizer_states": [],
        "lr_schedulers": [],
        # Lightning 1.3: save_hyperparameters() without arguments names them "kwargs", and dump_checkpoint stores
        # `dict(model.hparams)`, a plain dict (the class object key of "callbacks" is what references Lightning).
        "hparams_name": model._hparams_name,
        "hyper_parameters": dict(model.hparams),
    }


def check_loaded(model: nn.Module, checkpoint_path: Path, image_size: int) -> None:
    """METER's test_only branch really loaded the checkpoint: every tensor equals the file's (the position embedding
    equals METER's adapt_position_encoding of it), none is missing."""
    from meter.modules.clip_model import adapt_position_encoding

    saved = torch.load(checkpoint_path, map_location="cpu")["state_dict"]
    saved = adapt_position_encoding(dict(saved), after=image_size, patch_size=PATCH)
    own = model.state_dict()
    assert set(own) <= set(saved), f"not in the checkpoint: {sorted(set(own) - set(saved))}"
    for key, value in own.items():
        assert torch.equal(value, saved[key]), f"{key} was not loaded by METER's test_only path"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=sorted(TASK_LOSSES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--second_image_size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vqa_labels", type=int, default=VQA_LABELS, help="outputs of the VQA classifier")
    args = parser.parse_args(argv)
    if METER_ROOT is None or not (METER_ROOT / "meter" / "modules" / "meter_module.py").is_file():
        raise SystemExit("METER's code is absent: expected ../shared/refdata/meter (see tests/utils/paths.py)")
    for size in (args.image_size, args.second_image_size):
        if size % PATCH:
            raise SystemExit(f"image sizes must be multiples of the patch size {PATCH}, got {size}")
    if args.image_size == args.second_image_size:
        raise SystemExit("--second_image_size must differ from --image_size")

    install_shims()
    torch.manual_seed(args.seed)  # METER's constructors draw their initial weights from the global generator
    generator = torch.Generator().manual_seed(args.seed)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    clip_path = save_tiny_clip(out / "tiny_clip16.pt", args.image_size, generator)
    roberta_path = save_tiny_roberta(out / "tiny_roberta", generator)
    assert "swin" not in str(clip_path) and "roberta" in str(roberta_path)  # METER picks its towers by these names

    config = tiny_config(args.task, args.image_size, clip_path, roberta_path, args.vqa_labels)
    model = build_meter(config)
    perturb(model, generator)
    checkpoint_path = out / f"meter_{args.task}.ckpt"
    torch.save(lightning_checkpoint(model, config, generator), checkpoint_path)

    texts = dict(zip(("text_ids", "text_masks"), make_texts(generator)))
    image_names = ("image", "image_1") if args.task == "nlvr2" else ("image",)
    images = {
        name: torch.randn((BATCH, 3, args.image_size, args.image_size), generator=generator) for name in image_names
    }
    second = {
        name: torch.randn((BATCH, 3, args.second_image_size, args.second_image_size), generator=generator)
        for name in image_names
    }
    inputs = {**texts, **images, **{f"{name}_S2": image for name, image in second.items()}}
    save_file(inputs, out / "inputs.safetensors")
    outputs = run_meter(model, args.task, texts, images)
    save_file({k: v.contiguous() for k, v in outputs.items()}, out / f"outputs_{args.image_size}.safetensors")

    second_config = dict(config, image_size=args.second_image_size, load_path=str(checkpoint_path), test_only=True)
    second_model = build_meter(second_config)
    check_loaded(second_model, checkpoint_path, args.second_image_size)
    second_outputs = run_meter(second_model, args.task, texts, second)
    save_file(
        {k: v.contiguous() for k, v in second_outputs.items()}, out / f"outputs_{args.second_image_size}.safetensors"
    )

    record = {
        "task": args.task,
        "seed": args.seed,
        "image_size": args.image_size,
        "second_image_size": args.second_image_size,
        "checkpoint": str(checkpoint_path),
        "tiny_roberta": str(roberta_path),
        "tiny_clip": str(clip_path),
        "config": config,
        "second_config": second_config,
        "inputs": {name: list(tensor.shape) for name, tensor in inputs.items()},
        "outputs": {
            f"outputs_{size}.safetensors": {name: list(tensor.shape) for name, tensor in result.items()}
            for size, result in ((args.image_size, outputs), (args.second_image_size, second_outputs))
        },
        "legacy_checkpoint_keys": list(LEGACY_KEYS),
        "state_dict": {key: list(tensor.shape) for key, tensor in model.state_dict().items()},
        "meter_commit": "f4f09345b26ee21add0a756d06598e3c04726345",
    }
    (out / "oracle.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
