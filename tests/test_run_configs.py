"""The shipped run configs (configuration/*.yaml): they parse with the installed transformers, mean what their
comments say, and travel with the package so that an installed `train.py` finds them outside a checkout."""

import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import yaml

from modeling_vkood.training.arguments import (
    SHIPPED_CONFIGS,
    parse_arguments,
    resolve_config_path,
)
from tests.utils.paths import REPO_ROOT

TASK_CONFIGS = ("vqav2", "okvqa", "nlvr2", "coco_retrieval", "flickr30k_zeroshot", "easy_vqa_generative")
PAPER_TRAINING_CONFIGS = ("vqav2", "okvqa", "nlvr2", "coco_retrieval")


@pytest.mark.parametrize("name", ("easy_vqa", *TASK_CONFIGS))
def test_every_shipped_config_parses_without_deprecated_keys(name):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*deprecated.*", category=FutureWarning)
        _, data, _, training = parse_arguments([f"configuration/{name}.yaml", "--bf16", "false"])
    assert data.task in ("vqa", "nlvr2", "retrieval", "generative_vqa")
    if name in PAPER_TRAINING_CONFIGS:
        # METER's schedule: 10% linear warm-up, now a fraction given as warmup_steps below 1.
        assert training.get_warmup_steps(1000) == 100
        assert training.activation_checkpointing is True
        assert training.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_removed_training_argument_is_named_with_its_replacement(tmp_path):
    config = tmp_path / "old.yaml"
    shipped = yaml.safe_load((SHIPPED_CONFIGS / "vqav2.yaml").read_text())
    shipped.pop("warmup_steps")
    config.write_text(yaml.safe_dump({**shipped, "warmup_ratio": 0.1}))
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['warmup_ratio'\].*use warmup_steps"):
        parse_arguments([str(config)])


def test_no_dataloader_workers_switches_persistent_workers_off():
    # The paper YAMLs keep 8 workers alive; torch's DataLoader refuses persistent workers without workers.
    *_, with_workers = parse_arguments(["configuration/nlvr2.yaml", "--bf16", "false"])
    assert (with_workers.dataloader_num_workers, with_workers.dataloader_persistent_workers) == (8, True)
    *_, without = parse_arguments(["configuration/nlvr2.yaml", "--bf16", "false", "--dataloader_num_workers", "0"])
    assert without.dataloader_persistent_workers is False


def test_config_path_outside_a_checkout_falls_back_to_the_shipped_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configuration/nlvr2.yaml") == SHIPPED_CONFIGS / "nlvr2.yaml"
    (tmp_path / "mine.yaml").write_text("task: nlvr2\n")
    assert resolve_config_path("mine.yaml") == Path("mine.yaml")  # a file that exists is used as given
    with pytest.raises(FileNotFoundError, match="nlvr2.yaml"):
        resolve_config_path("configuration/nlvr3.yaml")


@pytest.mark.slow
def test_installed_wheel_ships_the_configs_and_train_py_finds_its_default(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", "tests", "outputs", "build", "*.egg-info", "__pycache__", "benchmarks"),
    )
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(source),
    ]
    subprocess.run(build, check=True, capture_output=True, env=env, timeout=300)
    wheel = next(tmp_path.glob("vkood-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"configuration/{p.relative_to(SHIPPED_CONFIGS)}" for p in SHIPPED_CONFIGS.rglob("*.yaml")}
    assert {"configuration/easy_vqa.yaml", "configuration/accelerate/ddp.yaml"} <= shipped <= names

    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, env=env, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(REPO_ROOT / "train.py", elsewhere / "train.py")  # a train.py away from any checkout
    user_env = {**env, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    probe = (
        "import modeling_vkood.training.arguments as arguments; "
        "_, default, _, _ = arguments.parse_arguments([]); "
        "_, data, _, training = arguments.parse_arguments(['configuration/vqav2.yaml', '--bf16', 'false']); "
        "print(arguments.__file__, default.dataset, data.dataset, training.get_warmup_steps(1000))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env=user_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    module_file, *parsed = result.stdout.split()
    assert Path(module_file).is_relative_to(site) and parsed == ["knowledge_vqa", "vqav2", "100"]
    helped = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=elsewhere, env=user_env, capture_output=True, text=True, timeout=300
    )
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--warmup_steps" in helped.stdout


@pytest.mark.slow
def test_the_shipped_generative_config_trains_evaluates_generated_answers_and_saves(tmp_path):
    """configuration/easy_vqa_generative.yaml as shipped (its backbones, decoder and recipe), on a tiny easy-VQA
    of the package's layout for 2 steps: it trains, evaluates generated answers and writes the Hub folder."""
    from tests.utils.generated_data import write_easy_vqa
    from tests.utils.train_script import train

    root = write_easy_vqa(tmp_path / "easy_vqa")
    output = tmp_path / "run"
    metrics = train.main(
        [
            "configuration/easy_vqa_generative.yaml",
            "--dataset_root",
            str(root),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--per_device_eval_batch_size",
            "8",
            "--generation_max_new_tokens",
            "4",
            "--dataset_cache_dir",
            str(tmp_path / "cache"),
            "--output_dir",
            str(output),
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
        ]
    )
    assert 0.0 <= metrics["eval_vqa_accuracy"] <= 100.0 and "eval_loss" in metrics
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "generation_vkood.VKOODForConditionalGeneration"
    assert config["custom_pipelines"]["visual-question-answering"]["pt"] == ["AutoModelForImageTextToText"]
    assert config["decoder_config"]["is_decoder"] and config["decoder_config"]["add_cross_attention"]
    for name in ("generation_vkood.py", "modeling_vkood.py", "pipeline_vkood.py", "model.safetensors", "README.md"):
        assert (output / name).is_file(), name
    assert "AutoModelForImageTextToText" in (output / "README.md").read_text()
