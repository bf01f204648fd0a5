"""Run by tests/test_fsdp.py under torchrun with 2 gloo processes: every head sharded with FSDP2 next to an unsharded
copy with the same weights, both driven through what train.py calls (`VKOODTrainer.evaluate`, `export_predictions`,
`save_output_folder`), each writing to its own folder under OUT/<scenario>/{sharded,reference}.

accelerate applies no FSDP config on CPU (arguments.py says where), so `shard` applies `fully_shard` as accelerate's
FSDP2 applies fsdp.yaml: each fusion layer and backbone block its own unit (reshard_after_forward=True), then the
root with the default. The models take the fixed-shape path (`force_fixed_shapes`), the one every accelerator takes:
on it each rank runs every unit as often as the others, which the collective gathers of FSDP need.

`accelerate_preparation` runs accelerate's own `fsdp2_prepare_model` (fsdp.yaml's settings, the tiny backbones'
block classes) on each head and one forward pass; accelerate applies no FSDP on CPU, so it gets a stand-in for the
accelerator with the attributes that function reads.

Rank 0 writes OUT/results.pt: per scenario, the sharded and reference metrics, predictions files and outputs.
"""

import copy
import sys
import types
from pathlib import Path

if not __package__:  # run as a script: import the helpers as tests.utils.*, from the repository root, not this folder
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parents[1]), *(p for p in sys.path if Path(p or ".").resolve() != _here)]

import datasets
import torch
import torch.distributed as dist
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import AutoTokenizer, CLIPImageProcessorPil

from hub_cards.model_card import ModelDescription
from modeling_vkood import (
    VKOODForConditionalGeneration,
    VKOODForImagesAndTextClassification,
    VKOODForImageTextRetrieval,
    VKOODForQuestionAnswering,
    VKOODProcessor,
)
from modeling_vkood.fusion_vkood import VKOODFusionLayer
from modeling_vkood.knowledge import KnowledgeBase
from modeling_vkood.training import (
    BuiltModel,
    DataArguments,
    GenerativeVQACollator,
    ModelArguments,
    NLVR2Collator,
    NLVR2Metrics,
    PixelCache,
    RetrievalCollator,
    VKOODTrainer,
    VKOODTrainingArguments,
    VQACollator,
    VQAMetrics,
    apply_finetuning,
    predicted_class,
    save_output_folder,
)
from modeling_vkood.training.predictions import export_predictions
from modeling_vkood.training.wise_ft import wise_ft
from tests.utils.generated_data import draw, scenes
from tests.utils.paths import REPO_ROOT
from tests.utils.tiny import tiny_batch, tiny_decoder_config, tiny_vkood_config

FSDP_CONFIG = yaml.safe_load((REPO_ROOT / "configuration" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
# fsdp.yaml's units, the tiny models' BERT blocks (text backbone and decoder) in place of METER's RoBERTa ones
UNIT_CLASSES = tuple(
    "BertLayer" if name == "RobertaLayer" else name
    for name in FSDP_CONFIG["fsdp_transformer_layer_cls_to_wrap"].split(",")
)
ROWS = 5  # odd: the two ranks get shares of different sizes
VQA_LABELS = {0: "circle", 1: "rectangle", 2: "triangle"}
NLVR2_LABELS = {0: "False", 1: "True"}
HEADS = {
    "vqa": (VKOODForQuestionAnswering, {"id2label": VQA_LABELS}),
    "nlvr2": (VKOODForImagesAndTextClassification, {"id2label": NLVR2_LABELS}),
    "retrieval": (VKOODForImageTextRetrieval, {}),
    "generative_vqa": (VKOODForConditionalGeneration, {"decoder_config": tiny_decoder_config()}),
}
# scenario: (task, LoRA?, what is run, in this order: "predict" (first: decoding starts from a sharded root),
# "wise_ft" (WiSE-FT of a fully fine-tuned model at alpha 0.5, as train.py applies it at the end), "evaluate", "save")
SCENARIOS = {
    "vqa": ("vqa", False, ("predict", "evaluate", "save")),
    "vqa_lora": ("vqa", True, ("evaluate", "save")),
    "vqa_wise_ft": ("vqa", False, ("wise_ft", "evaluate", "save")),
    "nlvr2": ("nlvr2", False, ("predict", "evaluate")),
    "retrieval": ("retrieval", False, ("evaluate", "save")),
    "retrieval_lora": ("retrieval", True, ("evaluate",)),
    "generative_vqa": ("generative_vqa", False, ("predict", "evaluate", "save")),
    "generative_vqa_lora": ("generative_vqa", True, ("evaluate", "save")),
}
TIMING = ("_runtime", "_per_second", "_preparation_time")  # metrics that differ from one run to the next


def shard(model):
    """`fully_shard` per fusion layer and backbone block (resharded after forward, as fsdp.yaml says), then the root,
    as accelerate does."""
    for module in list(model.modules()):
        if type(module).__name__ in UNIT_CLASSES:
            fully_shard(module, reshard_after_forward=FSDP_CONFIG["fsdp_reshard_after_forward"])
    return fully_shard(model)


def task_model(model):
    return model.get_base_model() if isinstance(model, PeftModel) else model


def build(task: str, lora: bool, processor):
    """(model, unsharded copy with the same weights) of `task`: random weights, LoRA B matrices included."""
    model_class, fields = HEADS[task]
    labels = {"label2id": {v: k for k, v in fields["id2label"].items()}} if "id2label" in fields else {}
    backbones = {"pretrained_backbones": ["vision_model", "text_model"]} if lora else {}
    torch.manual_seed(0)
    model = model_class(tiny_vkood_config(**fields, **labels, **backbones, ood_config={"max_iter": 3})).eval()
    model.vkood.force_fixed_shapes = True
    if task == "generative_vqa":
        end_some_answers_first(model, processor)
    if lora:
        arguments = ModelArguments(
            vision_config={}, text_config={}, finetuning="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0
        )
        model = apply_finetuning(BuiltModel(model, processor), arguments)
        with torch.no_grad():  # LoRA starts at B = 0: a delta that merging must fold in
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5)
    return model.eval(), copy.deepcopy(model).eval()


@torch.no_grad()
def end_some_answers_first(model, processor):
    """Raise the decoder's end-token score so that exactly one of the first two questions (one per rank) ends at
    the first step: the two ranks then decode for different numbers of steps."""
    rows = vqa_rows()
    batch = GenerativeVQACollator(processor, PixelCache(processor), with_targets=False)([rows[0], rows[1]])
    end = model.config.decoder_config.eos_token_id
    start = torch.full((2, 1), model.config.decoder_config.bos_token_id)
    logits = model(**batch, decoder_input_ids=start).logits[:, -1]
    margin = logits.max(-1).values - logits[:, end]  # what the end token lacks to be chosen
    model.text_decoder.get_output_embeddings().bias[end] += margin.mean()


def vqa_rows() -> datasets.Dataset:
    questions = ["what shape is it?", "what colour is the shape?", "is there a shape?"]
    rows = []
    for index, (shape, colour) in enumerate(scenes(ROWS)):
        label = list(VQA_LABELS.values()).index(shape)
        rows.append(
            {
                "image": draw(shape, colour),
                "question": questions[index % 3],
                "knowledge": [f"a {shape} is a shape", f"{colour} is a colour"][: 1 + index % 2],
                "label_ids": [label],
                "label_scores": [1.0],
                "answers": [shape] * 10,
                "answer_type": "other",
                "question_id": 100 + index,
            }
        )
    return datasets.Dataset.from_list(rows)


def nlvr2_rows() -> datasets.Dataset:
    rows = []
    for index, (shape, colour) in enumerate(scenes(ROWS)):
        rows.append(
            {
                "image_0": draw(shape, colour),
                "image_1": draw(shape, "red"),
                "sentence": f"both images show a {shape}",
                "knowledge": [f"a {shape} is a shape"],
                "label": index % 2,
                "identifier": f"dev-{index}-0-0",
            }
        )
    return datasets.Dataset.from_list(rows)


def retrieval_rows() -> datasets.Dataset:
    rows = [
        {"image": draw(shape, colour), "captions": [f"a {colour} {shape}", f"a {shape} on white"]}
        for shape, colour in scenes(ROWS)
    ]
    return datasets.Dataset.from_list(rows)


def describe(task: str) -> ModelDescription:
    return ModelDescription(
        model_name="tiny",
        task=task,
        dataset_name="tiny",
        eval_split="validation",
        vision_backbone="v",
        text_backbone="t",
        knowledge_source="k",
        finetuning="f",
        weights_form="w",
        command="python train.py",
        results={},
    )


def trainer_for(task, model, output_dir, processor):
    """The Trainer as train.py builds it for `task` (its collator, metrics, retrieval or generation settings)."""
    pixels = PixelCache(processor)
    rows = {"vqa": vqa_rows, "generative_vqa": vqa_rows, "nlvr2": nlvr2_rows, "retrieval": retrieval_rows}[task]()
    if task == "vqa":
        kwargs = dict(
            data_collator=VQACollator(processor, len(VQA_LABELS), pixels),
            compute_metrics=VQAMetrics(rows, VQA_LABELS),
            preprocess_logits_for_metrics=predicted_class,
        )
    elif task == "nlvr2":
        kwargs = dict(
            data_collator=NLVR2Collator(processor, pixels),
            compute_metrics=NLVR2Metrics(rows),
            preprocess_logits_for_metrics=predicted_class,
        )
    elif task == "generative_vqa":
        generation = {
            "collator": GenerativeVQACollator(processor, pixels, with_targets=False),
            "max_new_tokens": 4,
            "num_beams": 1,
        }
        kwargs = dict(data_collator=GenerativeVQACollator(processor, pixels), generation=generation)
    else:
        retrieval = {
            "pixels": pixels,
            "processor": processor,
            "knowledge_base": KnowledgeBase.starter(),
            "max_knowledge_items": 2,
        }
        kwargs = dict(
            data_collator=RetrievalCollator(
                processor, pixels, retrieval["knowledge_base"], retrieval["max_knowledge_items"]
            ),
            retrieval=retrieval,
        )
    args = VKOODTrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        # generative: one question per batch, so that the ranks' decoding ends at different steps
        per_device_eval_batch_size=1 if task == "generative_vqa" else 2,
        prediction_loss_only=task == "generative_vqa",
        label_names=None if task == "retrieval" else ["labels"],
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=True,
    )
    return VKOODTrainer(model=model, args=args, eval_dataset=rows, processing_class=processor, **kwargs), rows


def run(name, task, lora, steps, out, processor) -> dict:
    """The scenario's results for the sharded model and for the unsharded reference."""
    model, reference = build(task, lora, processor)
    if "wise_ft" in steps:  # initial backbone weights that differ from the trained ones, the same on both ranks
        generator = torch.Generator().manual_seed(1)
        initial = {
            name: value + 0.05 * torch.randn(value.shape, generator=generator)
            for name, value in reference.state_dict().items()
            if name.startswith(("vkood.vision_model.", "vkood.text_model.")) and value.is_floating_point()
        }
    shard(model)
    results = {}
    for kind, candidate in (("sharded", model), ("reference", reference)):
        folder = out / name / kind
        trainer, rows = trainer_for(task, candidate, folder, processor)
        result = {}
        if "wise_ft" in steps:
            wise_ft(trainer.accelerator.unwrap_model(trainer.model), 0.5, initial)
        if "predict" in steps:
            data_args = DataArguments(task=task, dataset="tiny", predict_split="test")
            labels = VQA_LABELS if task == "vqa" else NLVR2_LABELS if task == "nlvr2" else None
            path = export_predictions(trainer, {"test": rows}, data_args, labels, str(folder))
            result["predictions"] = path.read_text() if path is not None else None
        if "evaluate" in steps:
            metrics = trainer.evaluate()
            result["metrics"] = {key: value for key, value in metrics.items() if not key.endswith(TIMING)}
        if "save" in steps:
            save_output_folder(trainer, task, describe(task), None, None)
            if dist.get_rank() == 0:  # the merged model that was saved, in memory
                result["saved_class"] = type(trainer.model).__name__
                result["outputs"] = head_outputs(trainer.model, task)
        results[kind] = result
    if task == "generative_vqa" and not lora:  # each row's answer length: the ranks must decode unequal lengths
        with torch.no_grad():
            batch = GenerativeVQACollator(processor, PixelCache(processor), with_targets=False)(list(vqa_rows()))
            results["generated_lengths"] = task_model(reference).generate(**batch, max_new_tokens=4).ne(0).sum(-1)
    return results


@torch.no_grad()
def head_outputs(model, task: str) -> torch.Tensor:
    """The head's scores on a fixed tiny batch (the test runs the loaded checkpoint on the same batch)."""
    batch = tiny_batch(seed=7, pairs=task == "nlvr2")
    if task == "generative_vqa":
        batch["labels"] = torch.arange(1000, 1012).view(3, 4)
    outputs = model.eval()(**batch)
    return outputs.rank_scores if task == "retrieval" else outputs.logits


def accelerate_preparation(task: str, processor) -> dict:
    """accelerate's `fsdp2_prepare_model` with fsdp.yaml's settings on `task`'s head, and one forward pass: its
    outputs next to the unsharded model's, or the error it raised."""
    model, reference = build(task, False, processor)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=FSDP_CONFIG["fsdp_version"],
        auto_wrap_policy=FSDP_CONFIG["fsdp_auto_wrap_policy"],
        transformer_cls_names_to_wrap=list(UNIT_CLASSES),
        reshard_after_forward=FSDP_CONFIG["fsdp_reshard_after_forward"],
        state_dict_type=FSDP_CONFIG["fsdp_state_dict_type"],
        cpu_offload=FSDP_CONFIG["fsdp_offload_params"],
        cpu_ram_efficient_loading=FSDP_CONFIG["fsdp_cpu_ram_efficient_loading"],
    )
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no",
        is_main_process=dist.get_rank() == 0,
        device=torch.device("cpu"),
    )
    try:
        prepared = fsdp2_prepare_model(accelerator, model)
        outputs = head_outputs(prepared, task)
    except (RuntimeError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    units = sum(
        isinstance(module, VKOODFusionLayer) and isinstance(module, FSDPModule) for module in prepared.modules()
    )
    return {"outputs": outputs, "expected": head_outputs(reference, task), "fusion_units": units}


def main(out: Path, tokenizer_path: str):
    # the Trainer's world size (setting it up starts the gloo group) and the process group's
    sizes = (VKOODTrainingArguments(output_dir=str(out), use_cpu=True, report_to=[]).world_size, dist.get_world_size())
    processor = VKOODProcessor.from_model_config(
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        AutoTokenizer.from_pretrained(tokenizer_path),
        tiny_vkood_config(),
    )
    results = {"world_sizes": sizes}
    for name, (task, lora, steps) in SCENARIOS.items():
        results[name] = run(name, task, lora, steps, out, processor)
    results["accelerate"] = {task: accelerate_preparation(task, processor) for task in HEADS}
    if dist.get_rank() == 0:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
