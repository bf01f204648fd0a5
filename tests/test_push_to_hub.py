"""`--push_to_hub` with checkpoints, up to the network: the folder uploaded at the end holds the merged model only
(no stale adapter files from the checkpoint pushes) and loads, as remote code, to the logits of the saved weights."""

import concurrent.futures
import fnmatch
import shutil
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

from modeling_vkood import VKOODConfig, VKOODForQuestionAnswering, VKOODProcessor
from tests.utils.generated_data import draw, write_easy_vqa
from tests.utils.tiny import save_tiny_bert
from tests.utils.train_script import tiny_config, train
from tests.utils.without_package import run_without_package

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """HfApi.create_repo / upload_folder replaced by recorders; each upload keeps a copy of what it would send."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        ignore_patterns=None,
        delete_patterns=None,
        run_as_future=False,
        **kwargs,
    ):
        snapshot = tmp_path / "uploads" / str(len(uploads))
        sent = []
        for path in sorted(Path(folder_path).rglob("*")):
            name = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(
                fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.split("/")[0], p) for p in ignore_patterns or ()
            ):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, snapshot / name)
                sent.append(name)
        uploads.append(
            {
                "repo_id": repo_id,
                "path_in_repo": path_in_repo,
                "files": set(sent),
                "folder": snapshot,
                "delete_patterns": list(delete_patterns or []),
            }
        )
        done = concurrent.futures.Future()
        done.set_result(None)
        return done if run_as_future else None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


@pytest.fixture
def text_model(tmp_path, minilm_path) -> str:
    return save_tiny_bert(tmp_path / "tiny_bert", minilm_path)


@pytest.mark.slow
def test_push_with_checkpoints_uploads_a_clean_merged_folder(hub, text_model, tmp_path):
    config = tiny_config(
        tmp_path,
        text_model,
        task="vqa",
        dataset="easy_vqa",
        dataset_root=str(write_easy_vqa(tmp_path / "easy_vqa")),
        eval_split="test",
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="someone/vkood-tiny",
        hub_strategy="every_save",
    )
    output = tmp_path / "out"
    train.main([str(config), "--output_dir", str(output)])

    checkpoint_pushes, final = hub[:-1], hub[-1]
    assert all(upload["repo_id"] == "someone/vkood-tiny" for upload in hub)
    assert len(checkpoint_pushes) == 2 and all(ADAPTER_FILES <= upload["files"] for upload in checkpoint_pushes)
    assert not ADAPTER_FILES & final["files"] and not any(path.startswith("checkpoint-") for path in final["files"])
    assert ADAPTER_FILES <= set(final["delete_patterns"])  # and the repo loses the adapters the checkpoints pushed
    assert {"config.json", "model.safetensors", "modeling_vkood.py", "README.md", "processor_config.json"} <= final[
        "files"
    ]
    assert not ADAPTER_FILES & {path.name for path in output.iterdir()}

    # Reference: the saved weights loaded into a fresh model strictly (no adapter logic involved).
    folder = final["folder"]
    reference = VKOODForQuestionAnswering(VKOODConfig.from_pretrained(folder)).eval()
    reference.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    image = tmp_path / "shape.png"
    draw("circle", "red").save(image)
    processor = VKOODProcessor.from_pretrained(folder)
    batch = dict(
        processor(images=[PIL.Image.open(image)], text=["what color is the shape?"], knowledge=[["red is a colour"]])
    )
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = reference(**batch).logits
    code = f"""
        import torch
        from transformers import AutoModelForVisualQuestionAnswering
        model = AutoModelForVisualQuestionAnswering.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        lora = [name for name, _ in model.named_parameters() if "lora_" in name]
        assert not lora, lora
        with torch.no_grad():
            torch.save(model(**torch.load({str(tmp_path / "batch.pt")!r})).logits, {str(tmp_path / "remote.pt")!r})
    """
    run_without_package(code, tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), expected)
