"""The METER converter against METER's own code: tiny random METER models (every weight perturbed) built and run with
METER's classes (tests/utils/meter_oracle.py, in its own process), saved as Lightning 1.3 checkpoints, converted with
`python -m modeling_vkood.convert_meter`, and loaded with `trust_remote_code=True` in a process without the package.
The converted model must give METER's outputs to 1e-5 at the checkpoint's size and, through the position table's
resizing, at a second size (METER's `adapt_position_encoding`), with no knowledge and with knowledge items (which
the converted model's closed gate keeps out)."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from modeling_vkood.conversion.lightning_checkpoint import load_lightning_checkpoint
from modeling_vkood.convert_meter import convert_meter
from tests.utils.paths import REFDATA
from tests.utils.processes import run_module
from tests.utils.rehearsal_fixtures import save_char_roberta_tokenizer
from tests.utils.without_package import run_without_package

pytestmark = [
    pytest.mark.skipif(
        REFDATA is None and not os.environ.get("VKOOD_REQUIRE_REFDATA"),
        reason="needs ../shared/refdata/meter (in CI and on dev machines; VKOOD_REQUIRE_REFDATA=1 forbids the skip)",
    ),
    pytest.mark.slow,  # five METER models built, run and converted in subprocesses
]
TASKS = ("pretrain", "vqa", "nlvr2", "snli", "irtr")
SIZE, SECOND_SIZE = 32, 48


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per task: (oracle folder, converted folder), the converter run as a user runs it (the CLI)."""
    root = tmp_path_factory.mktemp("meter")
    tokenizer = save_char_roberta_tokenizer(root / "tokenizer")
    folders = {}
    for task in TASKS:
        oracle, output = root / f"oracle_{task}", root / f"vkood_{task}"
        run_module("tests.utils.meter_oracle", "--task", task, "--out", str(oracle), "--image_size", str(SIZE),
            "--second_image_size", str(SECOND_SIZE))  # fmt: skip
        run_module("modeling_vkood.convert_meter", "--checkpoint", str(oracle / f"meter_{task}.ckpt"),
            "--output_dir", str(output), "--tokenizer", tokenizer)  # fmt: skip
        folders[task] = (oracle, output)
    return folders


PARITY = """
import torch
from safetensors.torch import load_file
from transformers import {auto}, AutoProcessor

model = {auto}.from_pretrained({folder!r}, trust_remote_code=True).eval()
assert type(model).__name__ == {model_class!r}, type(model).__name__
inputs = load_file({inputs!r})
for knowledge, size, suffix in [(k, s, x) for k in (False, True) for s, x in (({size}, ""), ({second}, "_S2"))]:
    reference = load_file({oracle!r} + f"/outputs_{{size}}.safetensors")
    images = inputs["image" + suffix]
    if {task!r} == "nlvr2":
        images = torch.stack([images, inputs["image_1" + suffix]], 1)
    batch = dict(pixel_values=images, input_ids=inputs["text_ids"], attention_mask=inputs["text_masks"])
    if knowledge:
        generator = torch.Generator().manual_seed(1)
        batch["knowledge_input_ids"] = torch.randint(3, 30, (3, 4, 6), generator=generator)
        batch["knowledge_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    extra = dict(return_loss=False) if {task!r} in ("pretrain", "irtr") else {{}}
    with torch.no_grad():
        output = model(**batch, **extra, output_hidden_states=True)
    length = inputs["text_ids"].shape[1]
    checks = {checks}
    for name, (ours, theirs) in checks.items():
        error = (ours - theirs).abs().max().item()
        assert error < 1e-5, (knowledge, size, name, error)
        print(knowledge, size, name, error)
"""
# What each task's converted model must reproduce: the head's output and the fused states (text positions only: the
# knowledge positions follow them), as METER's oracle names them.
CHECKS = {
    "pretrain": """{"itm_logits": (output.itm_logits, reference["itm_logits"]),
        "cls_feats": (output.text_hidden_states[-1][:, 0], reference["text_feats"][:, 0]),
        "text_feats": (output.text_hidden_states[-1][:, :length], reference["text_feats"]),
        "image_feats": (output.image_hidden_states[-1], reference["image_feats"])}""",
    "irtr": """{"rank_scores": (output.rank_scores, reference["rank_scores"]),
        "itm_logits": (output.itm_logits, reference["itm_logits"]),
        "text_feats": (output.text_hidden_states[-1][:, :length], reference["text_feats"]),
        "image_feats": (output.image_hidden_states[-1], reference["image_feats"])}""",
    "vqa": """{"vqa_logits": (output.logits, reference["vqa_logits"]),
        "cls_feats": (output.pooler_output, reference["cls_feats"]),
        "text_feats": (output.text_hidden_states[-1][:, :length], reference["text_feats"]),
        "image_feats": (output.image_hidden_states[-1], reference["image_feats"])}""",
    "snli": """{"snli_logits": (output.logits, reference["snli_logits"]),
        "cls_feats": (output.pooler_output, reference["cls_feats"]),
        "text_feats": (output.text_hidden_states[-1][:, 0, :length], reference["text_feats"]),
        "image_feats": (output.image_hidden_states[-1][:, 0], reference["image_feats"])}""",
    "nlvr2": """{"nlvr2_logits": (output.logits, reference["nlvr2_logits"]),
        "cls_feats": (output.pooler_output, torch.cat([reference["cls_feats_0"], reference["cls_feats_1"]], -1)),
        "text_feats_1": (output.text_hidden_states[-1][:, 1, :length], reference["text_feats_1"]),
        "image_feats_0": (output.image_hidden_states[-1][:, 0], reference["image_feats_0"]),
        "image_feats_1": (output.image_hidden_states[-1][:, 1], reference["image_feats_1"])}""",
}
AUTO = {
    "pretrain": ("AutoModelForZeroShotImageClassification", "VKOODForImageTextRetrieval"),
    "irtr": ("AutoModelForZeroShotImageClassification", "VKOODForImageTextRetrieval"),
    "vqa": ("AutoModelForVisualQuestionAnswering", "VKOODForQuestionAnswering"),
    "snli": ("AutoModelForSequenceClassification", "VKOODForImagesAndTextClassification"),
    "nlvr2": ("AutoModelForSequenceClassification", "VKOODForImagesAndTextClassification"),
}


@pytest.mark.parametrize("task", TASKS)
def test_converted_model_gives_meters_outputs(converted, task, tmp_path):
    """Without knowledge and with knowledge items (held out by the converted model's closed gate), at both sizes."""
    oracle, folder = converted[task]
    auto, model_class = AUTO[task]
    code = PARITY.format(
        auto=auto,
        model_class=model_class,
        folder=str(folder),
        inputs=str(oracle / "inputs.safetensors"),
        oracle=str(oracle),
        size=SIZE,
        second=SECOND_SIZE,
        task=task,
        checks=CHECKS[task],
    )
    proc = run_without_package(code, tmp_path)
    assert len(proc.stdout.splitlines()) == 4 * CHECKS[task].count('": ('), proc.stdout  # each check, 4 runs


def test_the_folder_holds_what_a_user_needs(converted):
    """Config (task head, labels, resolution, METER's text length), processor, card, and the MLM head kept aside."""
    config = json.loads((converted["nlvr2"][1] / "config.json").read_text())
    assert config["token_types"] == ["text", "image", "second_image", "knowledge"]
    assert config["id2label"] == {"0": "False", "1": "True"} and config["classifier_head"] == "meter"
    assert config["vision_config"]["image_size"] == SIZE and config["interpolate_pos_encoding"] is True
    assert config["vision_config"]["num_hidden_layers"] == 2  # METER runs one block fewer than CLIP's file has
    assert config["ood_config"]["threshold"] == 30.0
    vqa = json.loads((converted["vqa"][1] / "config.json").read_text())
    assert list(vqa["id2label"].values()) == [f"answer_{i}" for i in range(7)]
    processor = json.loads((converted["vqa"][1] / "processor_config.json").read_text())
    assert processor["max_text_length"] == 40
    snli = json.loads((converted["snli"][1] / "config.json").read_text())
    assert snli["num_images"] == 1 and list(snli["id2label"].values()) == ["contradiction", "neutral", "entailment"]
    assert json.loads((converted["irtr"][1] / "config.json").read_text())["retrieval_score"] == "rank_output"
    mlm = load_file(converted["pretrain"][1] / "mlm_head.safetensors")
    reference = load_lightning_checkpoint(converted["pretrain"][0] / "meter_pretrain.ckpt")["state_dict"]
    assert set(mlm) == {key[len("mlm_score.") :] for key in reference if key.startswith("mlm_score.")}
    for key, value in mlm.items():
        torch.testing.assert_close(value, reference["mlm_score." + key], rtol=0, atol=0)
    assert not (converted["vqa"][1] / "mlm_head.safetensors").exists()
    card = (converted["vqa"][1] / "README.md").read_text()
    assert "license: mit" in card and "dou2022meter" in card and "--vqa_annotations" in card


def test_a_checkpoint_that_does_not_map_is_refused_and_extra_modules_are_dropped(converted, tmp_path, caplog):
    oracle, _ = converted["vqa"]
    checkpoint = load_lightning_checkpoint(oracle / "meter_vqa.ckpt")
    state = checkpoint["state_dict"]
    state["concept_encoder.weight"] = torch.ones(3)  # a module another project added: named, dropped
    extra = tmp_path / "extra.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": checkpoint["hyper_parameters"]}, extra)
    tokenizer = save_char_roberta_tokenizer(tmp_path / "tokenizer")
    with caplog.at_level("WARNING"):
        convert_meter(extra, tmp_path / "out", tokenizer=tokenizer)
    assert "concept_encoder.weight" in caplog.text
    state["cross_modal_text_layers.0.adapter.weight"] = torch.ones(3)  # under METER's modules, but maps nowhere
    broken = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": checkpoint["hyper_parameters"]}, broken)
    with pytest.raises(ValueError, match=r"cross_modal_text_layers\.0\.adapter\.weight"):
        convert_meter(broken, tmp_path / "out2", tokenizer=tokenizer)
    del state["cross_modal_text_layers.0.adapter.weight"], state["cross_modal_image_pooler.dense.weight"]
    torch.save({"state_dict": state, "hyper_parameters": checkpoint["hyper_parameters"]}, broken)
    with pytest.raises(ValueError, match=r"missing \['vkood\.image_pooler\.dense\.weight'\]"):
        convert_meter(broken, tmp_path / "out3", tokenizer=tokenizer)


def test_image_size_option_resizes_as_meter_does(converted, tmp_path):
    """`--image_size 48` resizes the position table at conversion: METER's outputs at 48 without interpolating."""
    oracle, _ = converted["vqa"]
    tokenizer = save_char_roberta_tokenizer(tmp_path / "tokenizer")
    model = convert_meter(oracle / "meter_vqa.ckpt", tmp_path / "out", image_size=SECOND_SIZE, tokenizer=tokenizer)
    assert model.config.vision_config.image_size == SECOND_SIZE
    model.config.interpolate_pos_encoding = False  # the table itself is at 48 px now
    inputs = load_file(oracle / "inputs.safetensors")
    reference = load_file(oracle / f"outputs_{SECOND_SIZE}.safetensors")
    with torch.no_grad():
        logits = model(
            pixel_values=inputs["image_S2"], input_ids=inputs["text_ids"], attention_mask=inputs["text_masks"]
        ).logits
    torch.testing.assert_close(logits, reference["vqa_logits"], rtol=0, atol=1e-5)


def test_a_pretraining_checkpoint_starts_other_tasks_as_meter_does(converted, tmp_path):
    """`--task`: NLVR2's second-image row starts as the image row, and retrieval's rank_output as ITM's match row."""
    oracle, _ = converted["pretrain"]
    tokenizer = save_char_roberta_tokenizer(tmp_path / "tokenizer")
    inputs = load_file(oracle / "inputs.safetensors")
    reference = load_file(oracle / f"outputs_{SIZE}.safetensors")
    text = dict(input_ids=inputs["text_ids"], attention_mask=inputs["text_masks"])
    nlvr2 = convert_meter(oracle / "meter_pretrain.ckpt", tmp_path / "nlvr2", task="nlvr2", tokenizer=tokenizer)
    table = nlvr2.vkood.token_type_embeddings.weight
    assert nlvr2.config.token_types == ["text", "image", "second_image", "knowledge"]
    torch.testing.assert_close(table[2], table[1], rtol=0, atol=0)
    with torch.no_grad():
        pooled = nlvr2(pixel_values=torch.stack([inputs["image"]] * 2, 1), **text).pooler_output
    # both images are METER's pre-trained pass (the second row is a copy of the image row)
    torch.testing.assert_close(pooled, reference["cls_feats"].repeat(1, 2), rtol=0, atol=1e-5)
    irtr = convert_meter(oracle / "meter_pretrain.ckpt", tmp_path / "irtr", task="irtr", tokenizer=tokenizer)
    with torch.no_grad():
        output = irtr(pixel_values=inputs["image"], **text, return_loss=False)
    torch.testing.assert_close(output.rank_scores, reference["itm_logits"][:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(output.itm_logits, reference["itm_logits"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="only a pre-training checkpoint"):
        convert_meter(converted["vqa"][0] / "meter_vqa.ckpt", tmp_path / "x", task="nlvr2", tokenizer=tokenizer)


@pytest.mark.parametrize("task", TASKS)
def test_the_cards_usage_snippet_runs_without_the_package(converted, task, tmp_path):
    folder = converted[task][1]
    text = (folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the card has no usage snippet"
    code = "\n".join(block.replace("PATH_TO_THIS_FOLDER", str(folder)) for block in blocks)
    run_without_package(code + "\nprint('snippet ran')", tmp_path)
