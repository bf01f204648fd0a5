"""Convert a METER checkpoint (github zdou0830/METER, MIT; or the VK-OOD authors' METER-layout VQAv2 checkpoint) into
a vkood folder: safetensors, config, processor, remote code and a model card.

    python -m modeling_vkood.convert_meter --checkpoint meter_clip16_288_roberta_vqa.ckpt --output_dir meter-vqa \
        [--vqa_annotations data/vqav2] [--image_size 576] [--task nlvr2] [--push_to_hub USER/meter-vqa]

The task comes from the checkpoint's heads (pretrain, vqa, nlvr2, snli, irtr), every size from the state dict's shapes
and the saved hyper-parameters, so the released base models and tiny test checkpoints convert alike. `--task` builds
another task's model from a pre-training checkpoint, as METER starts its fine-tuning: its head starts anew, and for
NLVR2 the second image's token type starts as a copy of the image's (METER's rule). The Lightning
file is read without Lightning and without running its pickled code. Weights outside METER's modules (modules other
projects added) are named and dropped with a warning; a METER weight that maps nowhere, or one missing, stops the
conversion with the keys named. The pre-training checkpoints' MLM head is kept beside the model in
`mlm_head.safetensors` (METER's `mlm_score` names: `transform.dense.*`, `transform.LayerNorm.*`, `decoder.weight`,
`bias`), to initialise a masked-LM head later; no vkood head reads it today.
"""

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from . import pipeline_vkood
from .configuration_vkood import VKOODConfig
from .conversion.lightning_checkpoint import checkpoint_hyper_parameters, load_lightning_checkpoint
from .conversion.meter_answers import meter_answer_list
from .conversion.meter_card import meter_card
from .conversion.meter_state_dict import (
    NLVR2_LABELS,
    SNLI_LABELS,
    convert_weights,
    detect_task,
    fusion_config,
    text_config,
    vision_config,
)
from .modeling_vkood import VKOODForImagesAndTextClassification, VKOODForQuestionAnswering
from .processing_vkood import VKOODProcessor
from .retrieval_vkood import VKOODForImageTextRetrieval

logger = logging.getLogger(__name__)

TASKS = ("pretrain", "vqa", "nlvr2", "snli", "irtr")
TASK_MODELS = {
    "pretrain": VKOODForImageTextRetrieval,
    "irtr": VKOODForImageTextRetrieval,
    "vqa": VKOODForQuestionAnswering,
    "nlvr2": VKOODForImagesAndTextClassification,
    "snli": VKOODForImagesAndTextClassification,
}
# The OOD gate's threshold tau of a converted model: far above the log-likelihood score of any item (0 = as likely as
# the image's own tokens), so that every knowledge item starts gated out and the model computes METER's function.
CLOSED_GATE_THRESHOLD = 30.0
# The weights a converted model adds to METER's (they start from vkood's initialisation): the knowledge path, and
# the retrieval head's ITC projections and temperature (METER scores every pair with its fused heads).
NEW_WEIGHTS = ("vkood.knowledge_projection.", "vkood.ood.", "image_embedding.", "text_embedding.", "logit_scale.")
MLM_FILE = "mlm_head.safetensors"


def resize_position_table(table: torch.Tensor, patch_size: int, image_size: int) -> torch.Tensor:
    """The (1 + grid^2, width) position table for `image_size`: the patch rows resized bicubically, the class row
    kept (METER's `adapt_position_encoding`; transformers' CLIP resizes so with `interpolate_pos_encoding`)."""
    grid_before = round((table.shape[0] - 1) ** 0.5)
    grid_after = image_size // patch_size
    if grid_after == grid_before:
        return table
    patches = table[1:].reshape(1, grid_before, grid_before, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid_after, grid_after), mode="bicubic")
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid_after * grid_after, -1)])


def vkood_config(task: str, state_dict: dict, hyper: dict, text_base: dict, id2label: dict | None) -> VKOODConfig:
    """The VKOODConfig that holds METER's model for `task`."""
    types = ["text", "image", "second_image", "knowledge"] if task == "nlvr2" else ["text", "image", "knowledge"]
    fields = dict(
        vision_config=vision_config(state_dict),
        text_config=text_config(state_dict, text_base),
        **fusion_config(state_dict, hyper),
        classifier_head="meter",
        token_types=types,
        num_images={"nlvr2": 2, "snli": 1}.get(task, 2),
        interpolate_pos_encoding=True,
        retrieval_score="rank_output" if task == "irtr" else "itm",
        pretrained_backbones=["vision_model", "text_model"],
        ood_config={"threshold": CLOSED_GATE_THRESHOLD},
    )
    if id2label is not None:
        fields.update(id2label=id2label, label2id={label: index for index, label in id2label.items()})
    return VKOODConfig(**fields)


def task_labels(task: str, state_dict: dict, vqa_annotations: str | None) -> tuple[dict | None, str]:
    """(id2label, a sentence for the card) of the task's classifier (for a VQA head the checkpoint lacks, the size
    of METER's answer list rebuilt from `vqa_annotations`)."""
    if task == "nlvr2":
        return dict(enumerate(NLVR2_LABELS)), "NLVR2 labels: 0 = False, 1 = True (METER's order)."
    if task == "snli":
        return dict(enumerate(SNLI_LABELS)), "SNLI-VE labels in METER's order: " + ", ".join(SNLI_LABELS) + "."
    if task != "vqa":
        return None, ""
    size = state_dict["vqa_classifier.3.weight"].shape[0] if "vqa_classifier.3.weight" in state_dict else None
    if vqa_annotations is None and size is None:
        raise ValueError("a VQA model from a pre-training checkpoint needs --vqa_annotations (its answer list)")
    if vqa_annotations is None:
        note = (
            f"The {size} VQA labels are named `answer_{{i}}`: the checkpoint stores no answer names; convert with "
            "`--vqa_annotations DIR` (the official VQAv2 annotation files) to name them by METER's answer list."
        )
        return {index: f"answer_{index}" for index in range(size)}, note
    answers = meter_answer_list(vqa_annotations)
    if size is not None and len(answers) != size:
        raise ValueError(
            f"METER's answer list rebuilt from {vqa_annotations} has {len(answers)} answers, the checkpoint's "
            f"classifier {size} outputs: these are not the annotation files it was trained with"
        )
    return dict(enumerate(answers)), "VQA labels: METER's answer list, rebuilt from the official annotation files."


def meter_processor(config: VKOODConfig, tokenizer_name: str, max_text_length: int) -> VKOODProcessor:
    """METER's preprocessing: CLIP's transform at the model's image size, its tokenizer, at most `max_text_length`
    tokens (METER pads to that length; vkood pads to the longest text, which gives the same outputs)."""
    size = config.vision_config.image_size
    images = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = VKOODProcessor.from_model_config(images, AutoTokenizer.from_pretrained(tokenizer_name), config)
    processor.max_text_length = min(max_text_length, processor.max_text_length or max_text_length)
    return processor


def convert_meter(
    checkpoint: str | Path,
    output_dir: str | Path,
    vqa_annotations: str | None = None,
    image_size: int | None = None,
    task: str | None = None,
    text_encoder: str | None = None,
    tokenizer: str | None = None,
    command: str | None = None,
    push_to_hub: str | None = None,
):
    """Convert `checkpoint` into a vkood folder at `output_dir`; returns the converted model.

    `text_encoder` / `tokenizer`: where the text encoder's config and the tokenizer come from (default: the
    checkpoint's `tokenizer` hyper-parameter, e.g. roberta-base, which METER built its text encoder from).
    `image_size`: the resolution to work at (default: the checkpoint's own, read off its position table).
    `task`: the model to build from a pre-training checkpoint (default: the checkpoint's own task)."""
    checkpoint = Path(checkpoint)
    loaded = load_lightning_checkpoint(checkpoint)
    state_dict, hyper = loaded["state_dict"], checkpoint_hyper_parameters(loaded)
    source_task = detect_task(state_dict)
    task = task or source_task
    if task != source_task and source_task != "pretrain":
        raise ValueError(
            f"--task {task}: only a pre-training checkpoint starts another task; this one is {source_task}"
        )
    weights = convert_weights(state_dict)
    if task == "irtr" and source_task == "pretrain":  # METER starts rank_output as the ITM head's "match" row
        weights.head.update(
            {f"rank_output.{kind}": weights.head[f"itm_head.{kind}"][1:] for kind in ("weight", "bias")}
        )
    elif task != source_task:  # a classifier starts anew; the ITM head has no place in it
        weights.head = {}
    if weights.extra:
        logger.warning("vkood has no place for these weights of %s; dropped: %s", checkpoint.name, weights.extra)
    text_name = text_encoder or hyper.get("tokenizer")
    if not text_name:
        raise ValueError("the checkpoint names no text encoder (hyper-parameter `tokenizer`): pass --text_encoder")
    text_base = AutoConfig.from_pretrained(text_name).to_dict()
    id2label, labels_note = task_labels(task, state_dict, vqa_annotations)
    config = vkood_config(task, state_dict, hyper, text_base, id2label)
    table_key = "vision_model.embeddings.position_embedding.weight"
    if image_size is not None and image_size != config.vision_config.image_size:
        weights.base[table_key] = resize_position_table(
            weights.base[table_key], config.vision_config.patch_size, image_size
        )
        config.vision_config.image_size = image_size
    model = TASK_MODELS[task](config)
    token_types = weights.token_types
    rows = {"text": token_types[0], "image": token_types[1], "knowledge": token_types[0]}
    if "second_image" in config.token_types:  # METER's NLVR2 row; from pre-training, a copy of the image row
        rows["second_image"] = token_types[2] if len(token_types) > 2 else token_types[1]
    converted = {f"vkood.{key}": value for key, value in weights.base.items()}
    converted["vkood.token_type_embeddings.weight"] = torch.stack([rows[name] for name in config.token_types])
    converted.update(weights.head)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    new = NEW_WEIGHTS + (("classifier.",) if task != source_task else ())  # a new head
    missing = [key for key in missing if not key.startswith(new)]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint.name} does not fill a vkood {task} model: missing {missing}, unexpected {unexpected}"
        )
    model.eval()

    output_dir = Path(output_dir)
    if task == "vqa":
        model.config.custom_pipelines = pipeline_vkood.VQA_PIPELINE
    model.save_pretrained(output_dir)
    if task == "vqa":
        (output_dir / "pipeline_vkood.py").write_bytes(Path(pipeline_vkood.__file__).read_bytes())
    processor = meter_processor(config, tokenizer or text_name, int(hyper.get("max_text_len", 40)))
    processor.save_pretrained(output_dir)
    if weights.mlm:
        save_file({key: value.contiguous() for key, value in weights.mlm.items()}, output_dir / MLM_FILE)
    card = meter_card(
        checkpoint.name,
        task,
        config.vision_config.image_size,
        command or f"python -m modeling_vkood.convert_meter --checkpoint {checkpoint.name} --output_dir {output_dir}",
        weights.unused + weights.extra,
        labels_note,
        push_to_hub,
    )
    card.save(output_dir / "README.md")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=output_dir, commit_message=f"vkood: {checkpoint.name}")
    return model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="METER Lightning checkpoint (.ckpt)")
    parser.add_argument("--output_dir", required=True, help="the vkood folder to write")
    parser.add_argument(
        "--vqa_annotations",
        help="folder of the official v2_mscoco_{train,val}2014_annotations.json: names the VQA labels by METER's "
        "answer list (default: answer_{i})",
    )
    parser.add_argument("--image_size", type=int, help="resolution to work at (default: the checkpoint's)")
    parser.add_argument(
        "--task", choices=TASKS, help="build this task's model from a pre-training checkpoint (default: its own)"
    )
    parser.add_argument("--text_encoder", help="the text encoder's config (default: the checkpoint's `tokenizer`)")
    parser.add_argument("--tokenizer", help="the tokenizer (default: the text encoder's)")
    parser.add_argument("--push_to_hub", metavar="REPO", help="upload the folder to this Hub repository")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    command = "python -m modeling_vkood.convert_meter " + shlex.join(argv)
    convert_meter(
        args.checkpoint,
        args.output_dir,
        args.vqa_annotations,
        args.image_size,
        args.task,
        args.text_encoder,
        args.tokenizer,
        command,
        args.push_to_hub,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
