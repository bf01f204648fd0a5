"""Self-test of the METER oracle (tests/utils/meter_oracle.py): it runs METER's own code from ../shared/refdata/meter
in subprocesses, one per task, and must write the promised files, names and shapes, deterministically per seed."""

import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.utils.paths import REFDATA, REPO_ROOT

pytestmark = pytest.mark.skipif(
    (REFDATA is None or not (REFDATA / "meter").is_dir()) and not os.environ.get("VKOOD_REQUIRE_REFDATA"),
    reason="../shared/refdata/meter (METER's own code, the oracle) is absent on this machine "
    "(VKOOD_REQUIRE_REFDATA=1 forbids the skip)",
)

S, S2, BATCH, TEXT_LEN, HIDDEN, VOCAB = 32, 48, 3, 40, 64, 100
TOKENS, TOKENS_S2 = (S // 16) ** 2 + 1, (S2 // 16) ** 2 + 1
HEADS = {
    "pretrain": {"itm_logits": (BATCH, 2), "mlm_logits": (BATCH, TEXT_LEN, VOCAB)},
    "vqa": {"vqa_logits": (BATCH, 7)},
    "nlvr2": {"nlvr2_logits": (BATCH, 2)},
    "snli": {"snli_logits": (BATCH, 3)},
    "irtr": {"rank_scores": (BATCH,), "itm_logits": (BATCH, 2)},
}
HEAD_PREFIXES = {
    "pretrain": {"itm_score", "mlm_score"},
    "vqa": {"vqa_classifier"},
    "nlvr2": {"nlvr2_classifier"},
    "snli": {"snli_classifier"},
    "irtr": {"itm_score", "rank_output"},
}
# run name -> (task, seed); the nlvr2 runs also check determinism
RUNS = {task: (task, 0) for task in HEADS} | {"nlvr2_again": ("nlvr2", 0), "nlvr2_seed1": ("nlvr2", 1)}


@pytest.fixture(scope="module")
def oracle_dirs(tmp_path_factory) -> dict[str, Path]:
    """Run the oracle CLI once per entry of RUNS, two processes at a time."""
    root = tmp_path_factory.mktemp("meter_oracle")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    pending, running, dirs = list(RUNS.items()), [], {}
    while pending or running:
        while pending and len(running) < 2:
            name, (task, seed) = pending.pop(0)
            dirs[name] = root / name
            command = [sys.executable, "-m", "tests.utils.meter_oracle", "--task", task, "--out", str(dirs[name])]
            command += ["--image_size", str(S), "--second_image_size", str(S2), "--seed", str(seed)]
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            running.append((name, process))
        name, process = running.pop(0)
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"oracle run {name} failed:\n{output.decode()[-6000:]}"
    return dirs


def load_checkpoint(path: Path) -> dict:
    """Read a Lightning 1.3 checkpoint without Lightning: its `pytorch_lightning.*` globals become placeholders."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.split(".")[0] == "pytorch_lightning":
                return type(name, (), {"__module__": module})
            return super().find_class(module, name)

    pickle_module = types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="pickle")
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)


@pytest.mark.parametrize("task", list(HEADS))
def test_files_names_and_shapes(oracle_dirs, task):
    out = oracle_dirs[task]
    for name in (f"meter_{task}.ckpt", "inputs.safetensors", "oracle.json", "tiny_clip16.pt", "tiny_roberta"):
        assert (out / name).exists(), name

    images = ("image", "image_1") if task == "nlvr2" else ("image",)
    inputs = load_file(out / "inputs.safetensors")
    expected_inputs = {"text_ids": (BATCH, TEXT_LEN), "text_masks": (BATCH, TEXT_LEN)}
    expected_inputs |= {name: (BATCH, 3, S, S) for name in images} | {f"{n}_S2": (BATCH, 3, S2, S2) for n in images}
    assert {k: tuple(v.shape) for k, v in inputs.items()} == expected_inputs
    ids, masks = inputs["text_ids"], inputs["text_masks"]
    assert (ids[:, 0] == 0).all() and masks.sum(1).tolist() == [40, 17, 5]
    assert ((ids == 1) == (masks == 0)).all() and (ids.gather(1, masks.sum(1, keepdim=True) - 1) == 2).all()

    for size, tokens in ((S, TOKENS), (S2, TOKENS_S2)):
        outputs = load_file(out / f"outputs_{size}.safetensors")
        suffixes = ("_0", "_1") if task == "nlvr2" else ("",)
        expected = dict(HEADS[task])
        for suffix in suffixes:
            expected |= {f"cls_feats{suffix}": (BATCH, 2 * HIDDEN), f"text_feats{suffix}": (BATCH, TEXT_LEN, HIDDEN)}
            expected[f"image_feats{suffix}"] = (BATCH, tokens, HIDDEN)
        assert {k: tuple(v.shape) for k, v in outputs.items()} == expected
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in outputs.values())

    record = json.loads((out / "oracle.json").read_text())
    assert (record["task"], record["image_size"], record["second_image_size"]) == (task, S, S2)
    assert Path(record["tiny_roberta"]).is_dir() and Path(record["tiny_clip"]).is_file()
    assert record["config"]["vit"] == record["tiny_clip"] and record["config"]["tokenizer"] == record["tiny_roberta"]


@pytest.mark.parametrize("task", list(HEADS))
def test_checkpoint_is_lightning_1_3(oracle_dirs, task):
    path = oracle_dirs[task] / f"meter_{task}.ckpt"
    with pytest.raises(pickle.UnpicklingError, match="pytorch_lightning"):
        torch.load(path, map_location="cpu")  # the pickle references Lightning classes, as the released files do
    checkpoint = load_checkpoint(path)
    assert checkpoint["pytorch-lightning_version"] == "1.3.2"
    assert [key.__module__ for key in checkpoint["callbacks"]] == ["pytorch_lightning.callbacks.model_checkpoint"]
    config = checkpoint["hyper_parameters"]["config"]
    assert (config["image_size"], config["hidden_size"], config["load_path"]) == (S, HIDDEN, "")
    state = checkpoint["state_dict"]
    assert state["vit_model.visual.positional_embedding"].shape == (TOKENS, HIDDEN)
    assert state["token_type_embeddings.weight"].shape == (3 if task == "nlvr2" else 2, HIDDEN)
    heads = {key.split(".")[0] for key in state} - {
        "text_transformer",
        "vit_model",
        "token_type_embeddings",
        "cross_modal_text_transform",
        "cross_modal_image_transform",
        "cross_modal_text_layers",
        "cross_modal_image_layers",
        "cross_modal_text_pooler",
        "cross_modal_image_pooler",
    }
    assert heads == HEAD_PREFIXES[task]
    assert all(v.dtype == torch.float32 for k, v in state.items() if k != "text_transformer.embeddings.position_ids")


def test_same_seed_same_outputs_other_seed_differs(oracle_dirs):
    first, again, other = (oracle_dirs[name] for name in ("nlvr2", "nlvr2_again", "nlvr2_seed1"))
    for name in ("inputs.safetensors", f"outputs_{S}.safetensors", f"outputs_{S2}.safetensors"):
        a, b, c = (load_file(folder / name) for folder in (first, again, other))
        assert all(torch.equal(a[key], b[key]) for key in a), name
        assert not any(torch.equal(a[key], c[key]) for key in a if key != "text_masks"), name
    a, b, c = (load_checkpoint(folder / "meter_nlvr2.ckpt")["state_dict"] for folder in (first, again, other))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not any(torch.equal(a[key], c[key]) for key in a if a[key].is_floating_point())
