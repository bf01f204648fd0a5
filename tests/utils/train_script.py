"""train.py, loaded as a module, and the tiny run configs the end-to-end tests give it."""

import importlib.util
import json
from pathlib import Path

import yaml

from tests.utils.paths import REPO_ROOT

# train.py is a script at the repository root, not part of an installed package: load it from its file.
_spec = importlib.util.spec_from_file_location("train", REPO_ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


def tiny_config(workdir: Path, text_model: str, **overrides) -> Path:
    """A run config with tiny backbones (CLIP vision width 32, 2 layers; the tiny BERT) and fusion width 32."""
    config = {
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
        },
        "text_model": text_model,
        "vkood_config": {
            "hidden_size": 32,
            "num_fusion_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_knowledge_items": 4,
            "knowledge_max_length": 12,
            "ood_config": {"projection_dim": 8, "max_iter": 5, "score": "gem"},
            "projection_dim": 16,
            "k_test": 4,
        },
        "knowledge": "starter",
        "lora_r": 4,
        "lora_alpha": 8,
        "learning_rate": 1e-3,
        "new_modules_learning_rate": 3e-3,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "do_train": True,
        "do_eval": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "report_to": "none",
        "seed": 7,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "ood_plot_examples": 8,
        "pixel_cache_size": 64,
        "dataset_cache_dir": str(workdir / "built_datasets"),
        **overrides,
    }
    path = workdir / f"config_{len(list(workdir.glob('config_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())
