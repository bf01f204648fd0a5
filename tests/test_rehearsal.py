"""Rehearsals of the paper path: every shipped task config, as a user runs it, on two real processes.

Each case runs `accelerate launch --config_file configuration/accelerate/ddp.yaml --num_processes 2
--mixed_precision no train.py configuration/<task>.yaml ...` with the YAML as shipped except for:
- the starting weights: the recipes start from a converted METER checkpoint (`init_from`); here a tiny METER model
  built and run by METER's own code (tests/utils/meter_oracle.py, CLIP + RoBERTa in the released files' layout) is
  converted by `python -m modeling_vkood.convert_meter` inside the rehearsal and given as `--init_from`; the BLIP
  recipes' Salesforce/blip-vqa-base is a tiny `BlipForQuestionAnswering` saved in its format (tests/utils/tiny_blip.py),
  and their 480 px (BLIP's resize of its 384 px checkpoints) is the tiny model's 32 px resized to 48. Runs from
  backbones (`--vision_model` / `--text_model`) use tiny local checkpoints saved in the formats of
  openai/clip-vit-base-patch16 and FacebookAI/roberta-base (tests/utils/rehearsal_fixtures.py);
- the data: `--dataset_root` / `--image_root` at official annotation files made of real records of
  ../shared/refdata with generated images at the official file names, built by the real builder that train.py
  runs from the YAML's `dataset`; `--knowledge starter` (the bundled graph) instead of the full ConceptNet index;
- the size of the run: `--max_steps`, batch sizes, `--max_eval_samples`, `--dataloader_num_workers 0` and
  `--preprocessing_num_workers 1` (the YAMLs' 8 workers would spawn 8 processes per rank for a few rows on a 2-core
  machine), `--bf16 false` (CPU), `--output_dir`;
- `--vkood_config`: the YAML's dict (for a run from backbones, with the fusion widths made tiny: hidden_size 32,
  2 heads, intermediate 64, OOD projection 8; the shipped 768-wide fusion has ~110M parameters, minutes per step on
  this CPU). A converted checkpoint brings its own widths (the tiny METER's: 64).
The converted METER checkpoints are also evaluated without training, as the README's evaluation commands run them.
Then the output folder is reloaded with `trust_remote_code=True` in a process that cannot import the project, its
logits compared with the package's model on a fixed batch, and the usage snippet of its model card run there.
The world size is asserted from the run's all_results.json and, where the training rows are known, from the trainer
state: the epoch reached after N steps is N x 2 x per-device batch / training rows only when the rows were sharded
over two processes.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from modeling_vkood.conversion.meter_answers import meter_answer_list
from tests.utils.paths import REFDATA, REPO_ROOT
from tests.utils.processes import free_port, run_module
from tests.utils.rehearsal_fixtures import (
    save_char_roberta_tokenizer,
    save_tiny_clip,
    save_tiny_roberta,
    write_coco_karpathy,
    write_flickr30k,
    write_nlvr2,
    write_okvqa,
    write_vqav2,
)
from tests.utils.tiny_blip import save_tiny_blip
from tests.utils.without_package import run_without_package

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(
        REFDATA is None and not os.environ.get("VKOOD_REQUIRE_REFDATA"),
        reason="../shared/refdata (real official annotation files) is absent on this machine "
        "(VKOOD_REQUIRE_REFDATA=1 forbids the skip)",
    ),
]

TINY_FUSION = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
TINY_OOD = {"projection_dim": 8}
PER_DEVICE_BATCH = 2
EVAL_BATCH, EVAL_ROWS = 4, 8
PROCESSES = 2
WALL_TIMES: dict[str, float] = {}
FIXED_KNOWLEDGE = [["a cup is used for drinking", "a dog is an animal"], ["a car has a wheel"]]


@dataclass(frozen=True)
class Case:
    """One shipped config: how its data is written and where train.py finds it (YAML keys -> folders)."""

    config: str
    writer: object
    rows_per_split: int
    dataset_root: str
    image_root: str
    max_steps: int


CASES = {
    # 24 + 24 real VQAv2 questions: the first count where an answer ("yes", "no") is the consensus answer of the
    # 9 questions the VQAv2 vocabulary rule needs (16 + 16 would build an empty vocabulary).
    "vqav2": Case("vqav2", write_vqav2, 24, "vqav2", "coco", 3),
    "okvqa": Case("okvqa", write_okvqa, 16, "okvqa", "coco", 2),
    "nlvr2": Case("nlvr2", write_nlvr2, 16, "nlvr2", "nlvr2/images", 2),
    "coco_retrieval": Case("coco_retrieval", write_coco_karpathy, 16, "coco_karpathy", "coco", 2),
    "flickr30k_zeroshot": Case("flickr30k_zeroshot", write_flickr30k, 16, "flickr30k", "flickr30k/images", 0),
    # the BLIP recipes on the same data as vqav2 / okvqa
    "vqav2_blip": Case("vqav2_blip", write_vqav2, 24, "vqav2", "coco", 3),
    "okvqa_blip": Case("okvqa_blip", write_okvqa, 16, "okvqa", "coco", 2),
}
# The converted METER checkpoint each recipe starts from (its YAML's `init_from`).
START = {"vqav2": "pretrain", "okvqa": "pretrain", "nlvr2": "pretrain_nlvr2", "coco_retrieval": "pretrain"}
# The recipes that start from Salesforce/blip-vqa-base (the tiny BLIP here), and the image size they run at.
BLIP_CASES = ("vqav2_blip", "okvqa_blip")
BLIP_IMAGE_SIZE = 48
AUTO_CLASS = {
    "blip_vqa": "AutoModelForVisualQuestionAnswering",
    "vqa": "AutoModelForVisualQuestionAnswering",
    "nlvr2": "AutoModelForSequenceClassification",
    "retrieval": "AutoModelForZeroShotImageClassification",
}


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("backbones")
    return {"vision": save_tiny_clip(folder / "clip-vit"), "text": save_tiny_roberta(folder / "roberta")}


@pytest.fixture(scope="session")
def rehearsal_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rehearsal")


@pytest.fixture(scope="session")
def meter(rehearsal_root):
    """Converted tiny METER checkpoints, each made on first use: "pretrain" (the recipes' start), "pretrain_nlvr2"
    (converted with `--task nlvr2`), and the fine-tuned "vqa" (labels by METER's answer list rebuilt from the
    rehearsal's VQAv2 annotation files), "nlvr2" and "irtr" for the evaluations without training."""
    root, done = rehearsal_root / "meter", {}
    tokenizer = save_char_roberta_tokenizer(root / "tokenizer")

    def get(name: str) -> Path:
        if name not in done:
            task = name.removesuffix("_nlvr2")
            oracle, extra = root / f"oracle_{task}", []
            if name == "vqa":
                annotations = write_data(CASES["vqav2"], rehearsal_root)[0]
                labels = len(meter_answer_list(annotations))
                extra = ["--vqa_annotations", str(annotations)]
            if not oracle.exists():
                options = ["--vqa_labels", str(labels)] if name == "vqa" else []
                run_module("tests.utils.meter_oracle", "--task", task, "--out", str(oracle), *options)
            if name == "pretrain_nlvr2":
                extra = ["--task", "nlvr2"]
            done[name] = root / name
            run_module("modeling_vkood.convert_meter", "--checkpoint", str(oracle / f"meter_{task}.ckpt"),
                       "--output_dir", str(done[name]), "--tokenizer", tokenizer, *extra)  # fmt: skip
        return done[name]

    return get


def shipped(config: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "configuration" / f"{config}.yaml").read_text())


def write_data(case: Case, root: Path) -> tuple[Path, Path, dict[str, int]]:
    data_root, image_root = root / "data" / case.dataset_root, root / "data" / case.image_root
    counts_file = data_root.parent / f"{case.dataset_root}_counts.json"  # the configs of one dataset share its files
    if data_root.exists():
        return data_root, image_root, json.loads(counts_file.read_text())
    counts = case.writer(REFDATA, data_root, image_root, case.rows_per_split)
    counts_file.write_text(json.dumps(counts))
    return data_root, image_root, counts


def launch(
    case: Case, root: Path, backbones: dict, start: Path | None, name: str, *extra: str
) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the shipped config through `accelerate launch` on two CPU processes, from the converted checkpoint
    `start` (None: as `extra` says); (output folder, process)."""
    data_root, image_root, _ = write_data(case, root)
    output = root / name
    from_checkpoint = start is not None or "--init_from" in extra  # its own widths: only the YAML's keys apply
    vkood_config = dict(shipped(case.config).get("vkood_config") or {})
    if not from_checkpoint:
        vkood_config.update(TINY_FUSION, ood_config={**vkood_config.get("ood_config", {}), **TINY_OOD})
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configuration/accelerate/ddp.yaml",
        "--num_processes",
        str(PROCESSES),
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "train.py",
        f"configuration/{case.config}.yaml",
        "--dataset_root",
        str(data_root),
        "--image_root",
        str(image_root),
        "--knowledge",
        "starter",
        "--output_dir",
        str(output),
        "--per_device_train_batch_size",
        str(PER_DEVICE_BATCH),
        "--per_device_eval_batch_size",
        str(EVAL_BATCH),
        "--max_eval_samples",
        str(EVAL_ROWS),
        "--dataloader_num_workers",
        "0",
        "--preprocessing_num_workers",
        "1",
        "--bf16",
        "false",
        "--vkood_config",
        json.dumps(vkood_config),
        *extra,
    ]
    if start is not None:
        command += ["--init_from", str(start)]
    elif not from_checkpoint:
        command += ["--vision_model", str(backbones["vision"]), "--text_model", str(backbones["text"])]
    if case.max_steps:
        command += ["--max_steps", str(case.max_steps)]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(root / "datasets_cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    start = time.monotonic()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    WALL_TIMES[name] = time.monotonic() - start
    print(f"\nrehearsal {name}: {WALL_TIMES[name]:.1f} s")
    return output, proc


def assert_succeeded(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR (tail):\n{proc.stderr[-6000:]}"


def assert_trained_on_two_processes(output: Path, case: Case, rows: int | None) -> dict:
    """Trainer state of a finished run. The world size train.py recorded is 2, and where the training rows are known
    (`rows`; retrieval trains on one row per caption) the epoch proves that they were split over 2 processes."""
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == case.max_steps
    assert json.loads((output / "all_results.json").read_text())["world_size"] == PROCESSES
    if rows is not None:
        steps_per_epoch = rows / (PER_DEVICE_BATCH * PROCESSES)
        assert state["epoch"] == pytest.approx(case.max_steps / steps_per_epoch)  # one process: half this epoch
    return state


def sample_images(folder: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"sample_{index}.png"
        Image.new("RGB", (48, 40), (40 * index + 20, 200 - 30 * index, 90)).save(path)
        paths.append(path)
    return paths


def fixed_batch_code(folder: Path, task: str, images: list[Path], out: Path, remote: bool) -> str:
    """Python that loads `folder` (remote code or the installed package), runs a fixed batch, saves the outputs."""
    images = [str(path) for path in images]
    if task == "nlvr2":
        images = [images[0:2], images[2:4]]  # two pairs
        texts = ["there are two dogs.", "the left image shows a car."]
    else:
        images = images[:2]
        texts = ["what is on the table?", "is it a dog?"]
        if task == "retrieval":
            texts = ["a dog on a road.", "a cup on a table."]
    spec = {"images": images, "text": texts, "knowledge": FIXED_KNOWLEDGE}
    call, fields = ("", ("logits",))
    if task == "retrieval":
        call, fields = ", return_loss=False", ("logits_per_image", "itm_logits")
    trust = ", trust_remote_code=True" if remote else ""
    if task == "blip_vqa":  # answers are texts: the encoding, BLIP's rank inference over the answer list, generate
        run = textwrap.dedent(f"""
            with torch.no_grad():
                encoding = model.encode(**batch)
                candidates = processor.answer_candidates(model.config.answer_list)
                _, log_likelihoods = model.rank_answers(**candidates, memory=encoding)
                generated = model.generate(memory=encoding, max_new_tokens=4)
            torch.save({{"question_embeds": encoding.question_embeds, "ood_gate": encoding.ood_gate,
                        "log_likelihoods": log_likelihoods, "generated": generated}}, {str(out)!r})
        """)
    else:
        run = textwrap.dedent(f"""
            with torch.no_grad():
                outputs = model(**batch{call})
            torch.save({{name: getattr(outputs, name) for name in {fields!r}}}, {str(out)!r})
        """)
    return (
        textwrap.dedent(f"""
        import PIL.Image, torch
        import transformers
        {"" if remote else "import modeling_vkood"}
        def open_image(path):
            return PIL.Image.open(path).convert("RGB")
        spec = {spec!r}
        images = [[open_image(p) for p in entry] if isinstance(entry, list) else open_image(entry)
                  for entry in spec["images"]]
        model = getattr(transformers, {AUTO_CLASS[task]!r}).from_pretrained({str(folder)!r}{trust}).eval()
        processor = transformers.AutoProcessor.from_pretrained({str(folder)!r}{trust})
        assert type(model).__module__.startswith("transformers_modules") == {remote}, type(model).__module__
        batch = processor(images=images, text=spec["text"], knowledge=spec["knowledge"])
    """)
        + run
    )


def card_snippets(output: Path) -> str:
    """The Python blocks of the output folder's model card as one script, pointed at the folder (the card says
    "path/to/this/folder" for a run without a Hub id); the user has the image files it opens."""
    text = (output / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the model card has no usage snippet"
    return "\n".join(block.replace("path/to/this/folder", str(output)) for block in blocks)


def user_process_code(output: Path, task: str, images: list[Path], folder: Path) -> str:
    """One process without the package: the fixed batch by remote code (remote.pt), then the card's snippets in
    a fresh namespace, their outcome recorded in snippets.json (so a broken snippet fails only its own test)."""
    snippets = card_snippets(output)
    return fixed_batch_code(output, task, images, folder / "remote.pt", remote=True) + textwrap.dedent(f"""
        import json, traceback
        try:
            exec(compile({snippets!r}, "model card snippets", "exec"), {{}})
            outcome = {{"ok": True}}
        except Exception:
            outcome = {{"ok": False, "error": traceback.format_exc()}}
        with open({str(folder / "snippets.json")!r}, "w") as file:
            json.dump(outcome, file)
    """)


CARD_IMAGE_FILES = ("photo.jpg", "other.jpg", "left.jpg", "right.jpg")


@pytest.fixture(scope="module")
def as_a_user(tmp_path_factory):
    """(folder with remote.pt and snippets.json, the sample images) of the no-package process run on an output
    folder, run once per folder."""
    done = {}

    def get(output: Path, task: str) -> tuple[Path, list[Path]]:
        if output not in done:
            folder = tmp_path_factory.mktemp(f"user_{output.name}")
            images = sample_images(folder, 4)
            for name, image in zip(CARD_IMAGE_FILES, images):  # the files the card's snippets open
                Image.open(image).save(folder / name)
            run_without_package(user_process_code(output, task, images, folder), folder)
            done[output] = folder, images
        return done[output]

    return get


def assert_reloads_without_the_package(output: Path, task: str, as_a_user) -> None:
    """The folder loads by remote code alone, and gives the package model's outputs on a fixed batch."""
    import torch

    folder, images = as_a_user(output, task)
    exec(fixed_batch_code(output, task, images, folder / "local.pt", remote=False), {})  # noqa: S102
    remote, local = torch.load(folder / "remote.pt"), torch.load(folder / "local.pt")
    assert remote.keys() == local.keys()
    for name in local:
        torch.testing.assert_close(remote[name], local[name], msg=name)


def assert_card_snippets_run(output: Path, task: str, as_a_user) -> None:
    folder, _ = as_a_user(output, task)
    outcome = json.loads((folder / "snippets.json").read_text())
    assert outcome["ok"], outcome["error"]


def read_results(output: Path) -> dict:
    return json.loads((output / "all_results.json").read_text())


# ----------------------------------------------------------------------------------------------- the launches


@pytest.fixture(scope="session")
def tiny_blip(rehearsal_root, minilm_path) -> Path:
    """The BLIP recipes' Salesforce/blip-vqa-base: a tiny BLIP VQA model with a BLIP tokenizer, in its format."""
    return save_tiny_blip(rehearsal_root / "tiny_blip", minilm_path)


@pytest.fixture(scope="module")
def runs(rehearsal_root, backbones, meter, tiny_blip):
    """Launches shared by the tests of this module, each started the first time a test asks for it; a recipe that
    starts from a converted METER checkpoint gets it unless `extra` names another `--init_from`, a BLIP recipe the
    tiny BLIP at `BLIP_IMAGE_SIZE`."""
    done = {}

    def get(name: str, case: str, *extra: str):
        if name not in done:
            start = meter(START[case]) if case in START and "--init_from" not in extra else None
            if case in BLIP_CASES:
                start, extra = tiny_blip, ("--image_size", str(BLIP_IMAGE_SIZE), *extra)
            done[name] = launch(CASES[case], rehearsal_root, backbones, start, name, *extra)
        return done[name]

    yield get
    if WALL_TIMES:
        print("\nrehearsal wall times (s): " + json.dumps({k: round(v, 1) for k, v in WALL_TIMES.items()}))


def rows(rehearsal_root: Path, case: str, split: str) -> int:
    return write_data(CASES[case], rehearsal_root)[2][split]


# --------------------------------------------------------------------------------------------------- VQAv2


def test_vqav2_from_converted_meter_trains_evaluates_saves_and_reloads(runs, rehearsal_root, as_a_user):
    recipe = shipped("vqav2")
    assert recipe["finetuning"] == "full" and recipe["activation_checkpointing"] is True and recipe["init_from"]
    output, proc = runs("vqav2", "vqav2")
    assert_succeeded(proc)
    assert_trained_on_two_processes(output, CASES["vqav2"], rows(rehearsal_root, "vqav2", "train"))
    results = read_results(output)
    assert 0.0 <= results["eval_vqa_accuracy"] <= 100.0 and {"eval_vqa_accuracy_yes_no", "train_loss"} <= set(results)
    config = json.loads((output / "config.json").read_text())
    assert set(config["id2label"].values()) >= {"yes", "no"} and config["classifier_head"] == "meter"
    assert config["ood_config"]["score"] == "log_likelihood"  # the layer measured to filter, aligned on relevance
    assert_reloads_without_the_package(output, "vqa", as_a_user)


def test_vqav2_card_snippets_run_without_the_package(runs, as_a_user):
    output, proc = runs("vqav2", "vqav2")
    assert_succeeded(proc)
    assert_card_snippets_run(output, "vqa", as_a_user)


def test_vqav2_lora_on_the_converted_backbones(runs, rehearsal_root, as_a_user):
    output, proc = runs("vqav2_lora", "vqav2", "--finetuning", "lora")
    assert_succeeded(proc)
    assert_trained_on_two_processes(output, CASES["vqav2"], rows(rehearsal_root, "vqav2", "train"))
    assert 0.0 <= read_results(output)["eval_vqa_accuracy"] <= 100.0
    assert_reloads_without_the_package(output, "vqa", as_a_user)


def test_a_converted_meter_vqa_checkpoint_writes_the_server_file_without_training(runs, rehearsal_root, meter):
    """README: `train.py configuration/vqav2.yaml --init_from DIR --do_train false --predict_split test_dev`; the
    labels are METER's answer list (converted with --vqa_annotations), which the run's data is built over."""
    converted = meter("vqa")
    output, proc = runs(
        "vqav2_meter_eval", "vqav2", "--init_from", str(converted), "--do_train", "false", "--predict_split", "test_dev"
    )
    assert_succeeded(proc)
    results = read_results(output)
    assert results["world_size"] == PROCESSES and "train_loss" not in results and 0 <= results["eval_vqa_accuracy"]
    labels = json.loads((converted / "config.json").read_text())["id2label"]
    assert json.loads((output / "config.json").read_text())["id2label"] == labels
    predictions = json.loads((output / "predictions_test_dev.json").read_text())
    assert len(predictions) == rows(rehearsal_root, "vqav2", "test_dev")
    assert all(set(entry) == {"question_id", "answer"} for entry in predictions)
    assert {entry["answer"] for entry in predictions} <= set(labels.values())


# --------------------------------------------------------------------------------------------------- OK-VQA


def test_okvqa_from_converted_meter_trains_evaluates_saves_and_reloads(runs, rehearsal_root, as_a_user):
    output, proc = runs("okvqa", "okvqa")
    assert_succeeded(proc)
    assert_trained_on_two_processes(output, CASES["okvqa"], rows(rehearsal_root, "okvqa", "train"))
    assert 0.0 <= read_results(output)["eval_vqa_accuracy"] <= 100.0
    assert_reloads_without_the_package(output, "vqa", as_a_user)
    assert_card_snippets_run(output, "vqa", as_a_user)


# --------------------------------------------------------------------------------------------------- NLVR2


def test_nlvr2_from_converted_meter_trains_evaluates_saves_and_reloads(runs, rehearsal_root, as_a_user):
    output, proc = runs("nlvr2", "nlvr2")
    assert_succeeded(proc)
    assert_trained_on_two_processes(output, CASES["nlvr2"], rows(rehearsal_root, "nlvr2", "train"))
    results = read_results(output)
    assert 0.0 <= results["eval_nlvr2_accuracy"] <= 100.0 and 0.0 <= results["eval_nlvr2_consistency"] <= 100.0
    config = json.loads((output / "config.json").read_text())
    assert config["token_types"] == ["text", "image", "second_image", "knowledge"]  # METER's pair method
    assert_reloads_without_the_package(output, "nlvr2", as_a_user)


def test_nlvr2_card_snippets_run_without_the_package(runs, as_a_user):
    output, proc = runs("nlvr2", "nlvr2")
    assert_succeeded(proc)
    assert_card_snippets_run(output, "nlvr2", as_a_user)


def test_a_converted_meter_nlvr2_checkpoint_evaluates_without_training(runs, rehearsal_root, meter):
    output, proc = runs(
        "nlvr2_meter_eval",
        "nlvr2",
        "--init_from",
        str(meter("nlvr2")),
        "--do_train",
        "false",
        "--predict_split",
        "validation",
        "--max_eval_samples",
        str(rows(rehearsal_root, "nlvr2", "validation")),
    )  # fmt: skip  (a submission file covers the whole split)
    assert_succeeded(proc)
    results = read_results(output)
    assert results["world_size"] == PROCESSES and 0.0 <= results["eval_nlvr2_accuracy"] <= 100.0
    lines = (output / "predictions_validation.csv").read_text().splitlines()
    assert len(lines) == rows(rehearsal_root, "nlvr2", "validation")


# --------------------------------------------------------------------------------------- COCO and Flickr30k

RECALLS = [f"eval_{direction}_r{k}" for direction in ("i2t", "t2i") for k in (1, 5, 10)]


def test_coco_retrieval_from_converted_meter_trains_evaluates_saves_and_reloads(runs, rehearsal_root, as_a_user):
    assert shipped("coco_retrieval")["activation_checkpointing"] is True
    output, proc = runs("coco_retrieval", "coco_retrieval")
    assert_succeeded(proc)
    assert_trained_on_two_processes(output, CASES["coco_retrieval"], None)
    results = read_results(output)
    assert all(0.0 <= results[key] <= 100.0 for key in RECALLS)
    assert results["eval_r_mean"] == pytest.approx(sum(results[key] for key in RECALLS) / 6)
    assert_reloads_without_the_package(output, "retrieval", as_a_user)


def test_coco_retrieval_card_snippets_run_without_the_package(runs, as_a_user):
    output, proc = runs("coco_retrieval", "coco_retrieval")
    assert_succeeded(proc)
    assert_card_snippets_run(output, "retrieval", as_a_user)


def test_coco_retrieval_lora_on_the_converted_backbones(runs, rehearsal_root, as_a_user):
    output, proc = runs("coco_retrieval_lora", "coco_retrieval", "--finetuning", "lora")
    assert_succeeded(proc)
    assert_trained_on_two_processes(output, CASES["coco_retrieval"], None)
    assert 0.0 <= read_results(output)["eval_r_mean"] <= 100.0
    assert_reloads_without_the_package(output, "retrieval", as_a_user)


def test_a_converted_meter_retrieval_checkpoint_evaluates_without_training(runs, meter):
    output, proc = runs("coco_meter_eval", "coco_retrieval", "--init_from", str(meter("irtr")), "--do_train", "false")
    assert_succeeded(proc)
    results = read_results(output)
    assert results["world_size"] == PROCESSES and all(0.0 <= results[key] <= 100.0 for key in RECALLS)
    assert json.loads((output / "config.json").read_text())["retrieval_score"] == "rank_output"


def test_flickr30k_zeroshot_evaluates_the_coco_checkpoint_on_two_processes(runs, rehearsal_root, as_a_user):
    coco, coco_proc = runs("coco_retrieval", "coco_retrieval")
    assert_succeeded(coco_proc)
    assert shipped("flickr30k_zeroshot")["init_from"] == "outputs/coco_retrieval"  # chained as shipped
    output, proc = runs("flickr30k_zeroshot", "flickr30k_zeroshot", "--init_from", str(coco))
    assert_succeeded(proc)
    results = read_results(output)
    assert all(0.0 <= results[key] <= 100.0 for key in RECALLS) and "train_loss" not in results
    # Gallery encoding is sharded over the processes: 8 images x 5 captions in batches of 4 make 40 / (4 x 2)
    # = 5 text chunks per process on two processes (10 on one).
    texts = min(EVAL_ROWS, rows(rehearsal_root, "flickr30k_zeroshot", "test")) * 5
    chunks = re.findall(r"gallery texts: +100%\|[^|]*\| *(\d+)/(\d+)", proc.stderr)
    assert chunks and {int(total) for _, total in chunks} == {texts // (EVAL_BATCH * PROCESSES)}
    config = json.loads((output / "config.json").read_text())
    assert config["k_test"] == shipped("flickr30k_zeroshot")["vkood_config"]["k_test"]
    assert_reloads_without_the_package(output, "retrieval", as_a_user)


# ---------------------------------------------------------------------------------------------- VK-OOD-BLIP


def assert_blip_folder(output: Path, inference: str) -> dict:
    """The saved VK-OOD-BLIP: its family, inference, the builder's answer vocabulary as its answer list, the recipe's
    image size (the position table resized), BLIP's weights adapted in full and the VK-OOD modules beside them."""
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "vkood_blip" and config["inference"] == inference
    assert config["vision_config"]["image_size"] == BLIP_IMAGE_SIZE and config["k_test"] == 128
    assert config["pretrained_backbones"] == ["vision_model", "text_encoder", "text_decoder"]
    assert config["answer_list"] and config["ood_config"]["score"] == "log_likelihood"
    return config


def test_vqav2_blip_from_a_blip_checkpoint_trains_ranks_writes_the_server_file_and_reloads(
    runs, rehearsal_root, as_a_user
):
    recipe = shipped("vqav2_blip")
    assert recipe["task"] == "blip_vqa" and recipe["init_from"] == "Salesforce/blip-vqa-base"
    output, proc = runs("vqav2_blip", "vqav2_blip", "--predict_split", "test_dev")
    assert_succeeded(proc)
    assert_trained_on_two_processes(output, CASES["vqav2_blip"], rows(rehearsal_root, "vqav2", "train"))
    results = read_results(output)
    assert 0.0 <= results["eval_vqa_accuracy"] <= 100.0 and {"eval_vqa_accuracy_yes_no", "train_loss"} <= set(results)
    config = assert_blip_folder(output, "rank")
    assert {"yes", "no"} <= set(config["answer_list"])
    predictions = json.loads((output / "predictions_test_dev.json").read_text())
    assert len(predictions) == rows(rehearsal_root, "vqav2", "test_dev")  # the official question list, checked
    assert {entry["answer"] for entry in predictions} <= set(config["answer_list"])  # ranked over the list
    assert_reloads_without_the_package(output, "blip_vqa", as_a_user)
    assert_card_snippets_run(output, "blip_vqa", as_a_user)


def test_okvqa_blip_from_a_blip_checkpoint_trains_generates_and_reloads(runs, rehearsal_root, as_a_user):
    assert shipped("okvqa_blip")["knowledge"] == shipped("okvqa")["knowledge"]  # retrieved ConceptNet items
    output, proc = runs("okvqa_blip", "okvqa_blip")
    assert_succeeded(proc)
    assert_trained_on_two_processes(output, CASES["okvqa_blip"], rows(rehearsal_root, "okvqa", "train"))
    assert 0.0 <= read_results(output)["eval_vqa_accuracy"] <= 100.0
    assert_blip_folder(output, "generate")
    processor = json.loads((output / "processor_config.json").read_text())
    assert processor["knowledge_source"] and (output / "knowledge_index.sqlite").is_file()  # retrieves as training did
    assert_reloads_without_the_package(output, "blip_vqa", as_a_user)
    assert_card_snippets_run(output, "blip_vqa", as_a_user)
