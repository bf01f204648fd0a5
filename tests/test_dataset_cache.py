"""A dataset is built once and reused: the second load comes from the cache (the builder is not called) with the
same rows, and changing an input file, the knowledge index or a builder option builds again."""

import os

import pytest

import data_scripts.easy_vqa
from modeling_vkood.training import load_splits
from modeling_vkood.training.arguments import DataArguments
from tests.utils.generated_data import write_easy_vqa


@pytest.fixture
def builds(monkeypatch):
    calls = []
    original = data_scripts.easy_vqa.build

    def counting_build(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(data_scripts.easy_vqa, "build", counting_build)
    return calls


def rows(dataset):
    return {split: [dict(row, image=row["image"]["path"]) for row in dataset[split]] for split in dataset}


def test_second_load_comes_from_the_cache_and_a_changed_input_rebuilds(builds, tmp_path):
    root = write_easy_vqa(tmp_path / "easy_vqa")
    args = DataArguments(
        dataset="easy_vqa",
        dataset_root=str(root),
        eval_split="test",
        check_images="header",
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    items = 2
    first = load_splits(args, ["train", "test"], items)
    assert len(builds) == 1 and builds[0]["check_images"] == "header"
    second = load_splits(args, ["train", "test"], items)
    assert len(builds) == 1  # from the cache
    assert rows(second) == rows(first) and len(first["train"]) == 36
    assert second["train"].features == first["train"].features
    # images stay files at their place (save_to_disk alone would copy each into the cache)
    assert all(os.path.isabs(row["image"]) and os.path.isfile(row["image"]) for row in rows(second)["train"])

    questions = root / "train" / "questions.json"
    questions.write_text(questions.read_text().replace("what shape is in the image?", "which shape is it?"))
    os.utime(questions, ns=(questions.stat().st_atime_ns, questions.stat().st_mtime_ns + 10**9))
    changed = load_splits(args, ["train", "test"], items)
    assert len(builds) == 2 and "which shape is it?" in changed["train"]["question"]

    items = 3  # a builder option is part of the key too
    load_splits(args, ["train", "test"], items)
    assert len(builds) == 3
    load_splits(args, ["train", "test"], items)
    assert len(builds) == 3
    caches = [path.name for path in (tmp_path / "cache").iterdir()]
    assert len(caches) == 3 and not any(".partial-" in name for name in caches)


def test_the_image_check_mode_is_validated():
    with pytest.raises(ValueError, match="check_images"):
        DataArguments(check_images="thorough")
