"""Reliability (issue 6): broken and odd images, hostile text, bad tensors, killed builds, checkpoint security.

Cases already tested elsewhere are not repeated here: odd image modes in memory (test_processor), processor batch
size mismatch (test_processor), all-NaN pixels and image/text mismatch in the VQA head (test_modeling), empty/CJK/
10,000-word/SQL text on a small graph (test_knowledge), index build interrupted in-process (test_knowledge).
"""

import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForVisualQuestionAnswering, AutoTokenizer, CLIPImageProcessorPil

from data_scripts import vqav2
from data_scripts.__main__ import main as build_dataset_cli
from modeling_vkood import (
    VKOODForImagesAndTextClassification,
    VKOODForImageTextRetrieval,
    VKOODForQuestionAnswering,
    VKOODProcessor,
)
from modeling_vkood.knowledge import KnowledgeBase
from modeling_vkood.knowledge.scratch import scratch_folder
from tests.utils.paths import REPO_ROOT
from tests.utils.tiny import tiny_batch, tiny_vkood_config
from tests.utils.without_package import run_without_package

SIZE = 32  # the tiny vision tower's input size
MAX_TEXT_TOKENS = 128  # the tiny BERT text tower's max_position_embeddings: the processor's max_text_length


@pytest.fixture(scope="module")
def processor(minilm_path):
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    return VKOODProcessor.from_model_config(image_processor, tokenizer, tiny_vkood_config())


@pytest.fixture(scope="module")
def starter_kb(tmp_path_factory):
    return KnowledgeBase.starter(cache_dir=tmp_path_factory.mktemp("starter"))


# ------------------------------------------------------------------------------------------------- image files


def decompression_bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit black PNG of side x side pixels: about 50 kB of file, 1.2 GB once decoded to RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + side // 8)  # filter byte + packed 1-bit samples
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def noise_image(mode: str = "RGB", size=(48, 40), seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def image_bytes(image: PIL.Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def unreadable_images() -> dict[str, bytes]:
    """File contents no decoder can turn into pixels (the decompression bomb has its own function)."""
    png, jpeg = image_bytes(noise_image(), "PNG"), image_bytes(noise_image(), "JPEG")
    return {
        "zero_byte": b"",
        "truncated_png": png[: len(png) // 2],
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "not_an_image": b"question_id,answer\n1,yes\n",
    }


def odd_valid_images() -> dict[str, bytes]:
    """Valid files in the modes real datasets contain (COCO has greyscale and CMYK JPEGs)."""
    sixteen_bit = PIL.Image.fromarray(np.linspace(0, 65535, 48 * 40).astype(np.uint16).reshape(40, 48))
    return {
        "grayscale": image_bytes(noise_image("L"), "JPEG"),
        "rgba": image_bytes(noise_image("RGBA"), "PNG"),
        "cmyk": image_bytes(noise_image("CMYK"), "JPEG"),
        "sixteen_bit": image_bytes(sixteen_bit, "PNG"),
        "one_pixel": image_bytes(noise_image(size=(1, 1)), "JPEG"),
    }


@pytest.mark.parametrize("name", ["truncated_png", "truncated_jpeg"])
def test_truncated_file_fails_in_the_processor_naming_image_and_file(processor, tmp_path, name):
    path = tmp_path / f"{name}.img"
    path.write_bytes(unreadable_images()[name])
    image = PIL.Image.open(path)  # succeeds: Pillow reads only the header until the pixels are needed
    pattern = rf"images\[1\] \({re.escape(str(path))}\): the image data cannot be decoded"
    with pytest.raises(ValueError, match=pattern):
        processor(images=[noise_image(), image], text=["a", "b"])


# ----------------------------------------------------------------------------------------- images in builders


def write_vqav2_validation(root: Path, images: dict[str, bytes]) -> dict[str, Path]:
    """Official VQAv2 validation files with one question per image; returns image name -> COCO file path."""
    questions, annotations, paths = [], [], {}
    for image_id, (name, content) in enumerate(images.items(), start=1):
        question_id = image_id * 1000
        question = f"What is on the table ({name})?"
        questions.append({"image_id": image_id, "question": question, "question_id": question_id})
        answers = [{"answer": "cup", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]
        annotations.append(
            {
                "question_id": question_id,
                "image_id": image_id,
                "answers": answers,
                "answer_type": "other",
                "question_type": "what is on the",
                "multiple_choice_answer": "cup",
            }
        )
        path = root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        paths[name] = path
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    # The vocabulary is counted on every annotation file in root: 9 train questions make "cup" reach its threshold
    # (only validation is built, so the train file needs no questions or images).
    train = [{**annotations[0], "question_id": 10**6 + k, "image_id": 10**6} for k in range(9)]
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": train}))
    return paths


def test_builder_keeps_odd_valid_images_and_they_reach_the_model_unchanged(processor, starter_kb, tmp_path):
    files = odd_valid_images()
    paths = write_vqav2_validation(tmp_path, files)
    dataset, skips = vqav2.build(tmp_path, tmp_path, starter_kb, image_mode="bytes")
    assert skips.skipped == [] and len(dataset["validation"]) == len(files)
    for row, name in zip(dataset["validation"], files):
        from_dataset = processor(images=row["image"])["pixel_values"]
        from_file = processor(images=PIL.Image.open(paths[name]))["pixel_values"]
        assert from_dataset.shape == (1, 3, SIZE, SIZE) and torch.isfinite(from_dataset).all(), name
        assert torch.equal(from_dataset, from_file), name


@pytest.mark.parametrize("strict", [False, True])
def test_builder_skips_unreadable_images_naming_them(starter_kb, tmp_path, strict):
    unreadable = {**unreadable_images(), "decompression_bomb": decompression_bomb_png()}
    paths = write_vqav2_validation(tmp_path, {"good": image_bytes(noise_image(), "JPEG"), **unreadable})
    if strict:
        with pytest.raises((ValueError, OSError), match=re.escape(str(paths["zero_byte"]))):
            vqav2.build(tmp_path, tmp_path, starter_kb, strict=True)
        return
    dataset, skips = vqav2.build(tmp_path, tmp_path, starter_kb)
    assert len(dataset["validation"]) == 1
    assert sorted(entry["path"] for entry in skips.skipped) == sorted(str(paths[name]) for name in unreadable)
    assert skips.to_dict()["per_reason"] == {"unreadable image": len(unreadable)}
    errors = {Path(entry["path"]): entry["error"] for entry in skips.skipped}
    assert errors[paths["zero_byte"]].startswith("UnidentifiedImageError")
    assert errors[paths["not_an_image"]].startswith("UnidentifiedImageError")
    assert "truncated" in errors[paths["truncated_png"]] and "truncated" in errors[paths["truncated_jpeg"]]
    assert errors[paths["decompression_bomb"]].startswith("DecompressionBombError")


def test_header_check_misses_only_truncated_files_and_none_checks_nothing(starter_kb, tmp_path):
    unreadable = {**unreadable_images(), "decompression_bomb": decompression_bomb_png()}
    paths = write_vqav2_validation(tmp_path, {"good": image_bytes(noise_image(), "JPEG"), **unreadable})
    _, skips = vqav2.build(tmp_path, tmp_path, starter_kb, check_images="header")
    assert sorted(entry["path"] for entry in skips.skipped) == sorted(
        str(paths[name]) for name in ("zero_byte", "not_an_image", "decompression_bomb")
    )
    dataset, skips = vqav2.build(tmp_path, tmp_path, starter_kb, check_images="none")
    assert skips.skipped == [] and len(dataset["validation"]) == 1 + len(unreadable)
    with pytest.raises(ValueError, match="check_images must be one of"):
        vqav2.build(tmp_path, tmp_path, starter_kb, check_images="full")


def test_images_above_the_pixel_limit_are_unreadable_even_where_pillow_only_warns(starter_kb, tmp_path, monkeypatch):
    """Between MAX_IMAGE_PIXELS and twice that, Pillow warns and decodes; the build treats it as unreadable."""
    paths = write_vqav2_validation(
        tmp_path,
        {
            "small": image_bytes(noise_image(size=(30, 30)), "PNG"),
            "large": image_bytes(noise_image(size=(48, 40)), "PNG"),
        },
    )
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 900 pixels pass, 1,920 are in the warning band
    dataset, skips = vqav2.build(tmp_path, tmp_path, starter_kb)
    assert len(dataset["validation"]) == 1
    assert [(entry["path"], entry["error"].split(":")[0]) for entry in skips.skipped] == [
        (str(paths["large"]), "DecompressionBombWarning")
    ]


# ------------------------------------------------------------------------------------------------------- text

HOSTILE_TEXT = {
    "empty": "",
    "whitespace": " \t\n\u00a0\u3000 ",
    "control_only": "\x00\x01\x07\x1b\x7f",
    "control_between_words": "what\x00 color\x07 is\x7f the\u200b circle\ufeff?",
    "ten_thousand_words": " ".join(["is", "the", "red", "circle", "near", "a", "cup", "or", "dog", "?"] * 1000),
    "rtl": "ما لون الدائرة؟ האם יש כוס על השולחן?",
    "emoji": "is the 🔴 circle 🐶 near a ☕ cup? 👍🏽",
}


def test_hostile_text_through_processor_and_retrieval(processor, starter_kb):
    def ids(text):
        return processor(text=text)["input_ids"][0].tolist()  # long text is cut at max_text_length

    tokenizer = processor.tokenizer
    only_specials = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert len(HOSTILE_TEXT["ten_thousand_words"].split()) == 10_000
    for name in ("empty", "whitespace", "control_only"):
        assert ids(HOSTILE_TEXT[name]) == only_specials, name
        assert starter_kb.retrieve(HOSTILE_TEXT[name]) == [], name
    # control and zero-width characters are dropped, not turned into tokens or [UNK]
    assert ids(HOSTILE_TEXT["control_between_words"]) == ids("what color is the circle?")
    assert starter_kb.concepts(HOSTILE_TEXT["control_between_words"]) == ["circle"]  # "color": question scaffolding
    assert len(ids(HOSTILE_TEXT["ten_thousand_words"])) == MAX_TEXT_TOKENS
    assert starter_kb.concepts(HOSTILE_TEXT["ten_thousand_words"]) == ["red", "circle", "cup", "dog"]
    assert len(starter_kb.retrieve(HOSTILE_TEXT["ten_thousand_words"], max_items=4)) == 4
    rtl = ids(HOSTILE_TEXT["rtl"])[1:-1]
    assert len(rtl) > 10 and set(rtl) != {tokenizer.unk_token_id}  # word pieces, not one unknown blob
    assert starter_kb.retrieve(HOSTILE_TEXT["rtl"]) == []
    emoji = ids(HOSTILE_TEXT["emoji"])
    assert emoji.count(tokenizer.unk_token_id) == 4 and tokenizer.convert_tokens_to_ids("circle") in emoji
    assert starter_kb.concepts(HOSTILE_TEXT["emoji"]) == ["circle", "cup"]
    with pytest.raises(TypeError, match="non-empty list of strings"):
        processor(text=[])


def test_hostile_text_batch_gives_finite_outputs_equal_to_each_row_alone(processor, starter_kb):
    """Padding a batch of odd texts together must not change any row: nothing leaks between examples."""
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(tiny_vkood_config(num_labels=5)).eval()
    texts = list(HOSTILE_TEXT.values())
    images = [noise_image(seed=index) for index in range(len(texts))]
    knowledge = starter_kb.retrieve_batch(texts, max_items=model.config.max_knowledge_items)
    with torch.no_grad():
        batch = model(**processor(images=images, text=texts, knowledge=knowledge))
        assert torch.isfinite(batch.logits).all() and torch.isfinite(batch.ood_scores).all()
        for index, text in enumerate(texts):
            alone = processor(images=images[index], text=text, knowledge=knowledge[index])
            torch.testing.assert_close(model(**alone).logits[0], batch.logits[index], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- tensors

HEADS = {
    "vqa": lambda: VKOODForQuestionAnswering(tiny_vkood_config(num_labels=5)),
    "nlvr2": lambda: VKOODForImagesAndTextClassification(tiny_vkood_config(num_labels=2)),
    "retrieval": lambda: VKOODForImageTextRetrieval(tiny_vkood_config()),
}


@pytest.fixture(scope="module")
def heads():
    torch.manual_seed(0)
    return {task: build() for task, build in HEADS.items()}


def head_batch(task: str) -> dict:
    batch = tiny_batch(pairs=task == "nlvr2")
    if task == "vqa":
        batch["labels"] = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    elif task == "nlvr2":
        batch["labels"] = torch.tensor([0, 1, 1])
    return batch


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("task", list(HEADS))
def test_one_non_finite_pixel_raises_instead_of_a_nan_loss(heads, task, value):
    batch = head_batch(task)
    pixel_values = batch["pixel_values"].clone()
    pixel_values.view(-1)[pixel_values.numel() // 2] = value  # a single pixel of one image
    with pytest.raises(ValueError, match="pixel_values contains NaN or Inf"):
        heads[task](**dict(batch, pixel_values=pixel_values))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_processor_rejects_non_finite_float_images(processor, value):
    array = np.full((8, 8, 3), 0.5, dtype=np.float32)
    array[3, 4, 1] = value
    for image in (array, torch.from_numpy(array).permute(2, 0, 1)):
        with pytest.raises(ValueError, match="nan|inf"):
            processor(images=image)


KNOWLEDGE_KEYS = ("knowledge_input_ids", "knowledge_attention_mask", "knowledge_mask")
MISMATCHES = {  # which inputs lose their last example
    "images": ("pixel_values",),
    "text": ("input_ids", "attention_mask"),
    "attention_mask": ("attention_mask",),
    "knowledge": KNOWLEDGE_KEYS,
    "knowledge_mask": ("knowledge_mask",),
    "knowledge_attention_mask": ("knowledge_attention_mask",),
}
MISMATCH_CASES = [
    (task, case)
    for task in HEADS
    for case in MISMATCHES
    if (task, case) != ("vqa", "images")  # test_modeling.test_bad_inputs_raise_clear_errors
]


@pytest.mark.parametrize("task, case", MISMATCH_CASES)
def test_batch_size_mismatch_raises_a_clear_error(heads, task, case):
    batch = head_batch(task)
    batch.update({key: batch[key][:2] for key in MISMATCHES[case]})
    torch.manual_seed(0)  # the retrieval head samples hard negatives
    with pytest.raises(ValueError, match="batch sizes differ"):
        heads[task](**batch)


# ----------------------------------------------------------------------------------------------------- faults


def kill_when(command: list[str], progress: re.Pattern) -> int:
    """Run `command`, SIGKILL it as soon as its stderr matches `progress`, and return its exit status."""
    child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    try:
        while not progress.search(seen):
            chunk = os.read(child.stderr.fileno(), 1 << 16)
            if not chunk:
                break  # the child ended before reaching the point: its exit status tells the test
            seen += chunk
        child.send_signal(signal.SIGKILL)
        return child.wait(timeout=60)
    finally:
        child.stderr.close()


@pytest.mark.slow
def test_index_build_killed_mid_stream_leaves_no_index_and_a_rebuild_works(tmp_path):
    lines = 150_000  # about 30 MB: a few seconds of indexing
    relations = ("IsA", "UsedFor", "AtLocation", "PartOf", "HasA")
    info = json.dumps({"dataset": "/d/test", "license": "cc:by-sa/4.0", "weight": 1.0})
    dump = tmp_path / "assertions.csv"
    with open(dump, "w", encoding="utf-8") as handle:
        for i in range(lines):
            relation, start, end = relations[i % 5], f"/c/en/thing_{i}/n", f"/c/en/object_{i % 97}"
            handle.write(f"/a/[/r/{relation}/,{start}/,{end}/]\t/r/{relation}\t{start}\t{end}\t{info}\n")
    index = tmp_path / "index" / "kb.sqlite"
    code = "import sys; from modeling_vkood.knowledge import KnowledgeBase as K; K.build(sys.argv[1], sys.argv[2])"
    mid_stream = re.compile(rb"indexing assertions\.csv:\s+([1-9]\d?)%\|")  # a progress update between 1% and 99%
    status = kill_when([sys.executable, "-c", code, str(dump), str(index)], mid_stream)

    assert status == -signal.SIGKILL
    assert not index.exists()
    stale = {path.name for path in index.parent.iterdir()}
    # SIGKILL runs no cleanup: the hidden scratch folder remains, never a file readers would open
    assert len(stale) == 1 and all(re.fullmatch(r"\.kb\.sqlite\..+\.tmp", name) for name in stale), stale
    with pytest.raises(FileNotFoundError, match="kb.sqlite"):
        KnowledgeBase.open(index)

    report = KnowledgeBase.build(dump, index)
    assert report.built and report.lines == lines and report.edges == lines
    assert [path.name for path in index.parent.iterdir()] == ["kb.sqlite"]  # the dead build's leftovers are gone
    with KnowledgeBase.open(index) as kb:
        assert len(kb) == lines


def test_a_build_removes_dead_builds_leftovers_but_never_a_live_builds(tmp_path):
    index = tmp_path / "kb.sqlite"
    dead = tmp_path / ".kb.sqlite.dead.tmp"  # what a killed build leaves: a scratch folder nobody holds
    dead.mkdir()
    (dead / "kb.sqlite").write_bytes(b"half an index")
    other = tmp_path / ".other.sqlite.dead.tmp"  # another output's scratch folder: not this build's business
    other.mkdir()
    # A concurrent build, still running. flock locks belong to an open file description, so a holder in this
    # process excludes the build below exactly as one in another process would.
    with scratch_folder(tmp_path, ".kb.sqlite.", ".tmp") as live:
        KnowledgeBase.build(REPO_ROOT / "modeling_vkood" / "knowledge" / "data" / "starter.csv", index)
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["kb.sqlite", live.name, other.name])
    assert not live.exists()  # the live build cleaned up after itself


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_dataset_build_killed_then_rerun_gives_the_same_files(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    KnowledgeBase.starter(cache_dir=cache)  # shared by the child and the reruns through VKOOD_CACHE
    monkeypatch.setenv("VKOOD_CACHE", str(cache))
    out = tmp_path / "killed" / "easy_vqa"
    arguments = ["easy_vqa", "--knowledge", "starter", "--splits", "test", "--out"]
    annotating = re.compile(rb"knowledge test")  # rows read, knowledge being added: nothing written to OUT yet
    status = kill_when([sys.executable, "-m", "data_scripts", *arguments, str(out)], annotating)

    assert status == -signal.SIGKILL
    assert not out.exists()
    stale = {path.name for path in out.parent.iterdir()}
    assert stale and all(name.startswith(".easy_vqa.") for name in stale), stale  # hidden work folders only

    assert build_dataset_cli([*arguments, str(out)]) == 0
    reference = tmp_path / "uninterrupted" / "easy_vqa"
    assert build_dataset_cli([*arguments, str(reference)]) == 0
    rebuilt = folder_files(out)
    assert "data/test-00000-of-00001.parquet" in rebuilt
    assert rebuilt == folder_files(reference)
    assert [path.name for path in out.parent.iterdir()] == ["easy_vqa"]  # the dead build's leftovers are gone


# --------------------------------------------------------------------------------------------------- security

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def is_pickle(path: Path) -> bool:
    """Pickle protocol >= 2 starts with 0x80; torch.save writes a zip archive holding a pickle.

    Not for .safetensors files: their first bytes are a header length, which may happen to be 0x80.
    """
    head = path.read_bytes()[:4]
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


@pytest.fixture
def checkpoint(tmp_path, processor):
    """A Hub-ready folder: a VQA model and its processor, as `save_pretrained` writes them."""
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(tiny_vkood_config(num_labels=3))
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, folder


def test_saved_folder_holds_safetensors_and_no_pickle(checkpoint):
    model, folder = checkpoint
    files = [path for path in folder.rglob("*") if path.is_file()]
    named = [path.name for path in files if path.suffix in PICKLE_SUFFIXES]
    disguised = [path.name for path in files if path.suffix != ".safetensors" and is_pickle(path)]
    assert named == [] and disguised == []
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        assert set(weights.keys()) == set(model.state_dict())


def test_pickled_weights_are_ignored_beside_safetensors_and_never_executed(checkpoint, tmp_path):
    model, folder = checkpoint
    zeros = {key: torch.zeros_like(value) for key, value in model.state_dict().items()}
    torch.save(zeros, folder / "pytorch_model.bin")
    reloaded = VKOODForQuestionAnswering.from_pretrained(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key  # the safetensors weights, not the zeros

    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        VKOODForQuestionAnswering.from_pretrained(folder, use_safetensors=True)

    marker = tmp_path / "unpickled"

    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"classifier.0.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        VKOODForQuestionAnswering.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.slow
def test_changed_remote_code_never_runs_without_trust_remote_code(checkpoint, tmp_path):
    _, folder = checkpoint
    markers = tmp_path / "markers"
    markers.mkdir()
    for name in ("configuration_vkood.py", "modeling_vkood.py", "processing_vkood.py"):
        with open(folder / name, "a", encoding="utf-8") as handle:  # a folder whose code differs from the package's
            handle.write(f"\nopen({str(markers / name)!r}, 'w').close()\n")

    # With the package installed, its own classes serve the folder: the folder's code is not imported.
    loaded = AutoModelForVisualQuestionAnswering.from_pretrained(folder)
    assert type(loaded) is VKOODForQuestionAnswering
    assert list(markers.iterdir()) == []

    # Without the package, every Auto class refuses unless trusted; trusting it runs the changed code (the control).
    run_without_package(
        textwrap.dedent(
            f"""
            import io, json, pathlib, sys, transformers
            sys.stdin = io.StringIO("")  # nobody answers the trust prompt
            folder, refused = {str(folder)!r}, []
            autos = ("AutoConfig", "AutoModel", "AutoModelForVisualQuestionAnswering", "AutoProcessor")
            for auto in autos:
                for trust in ({{}}, {{"trust_remote_code": False}}):
                    try:
                        getattr(transformers, auto).from_pretrained(folder, **trust)
                    except ValueError as error:
                        refused.append("trust_remote_code=True" in str(error))
            before = sorted(path.name for path in pathlib.Path({str(markers)!r}).iterdir())
            transformers.AutoModelForVisualQuestionAnswering.from_pretrained(folder, trust_remote_code=True)
            transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            with open("result.json", "w") as handle:  # stdout also carries the unanswered prompts
                json.dump({{"refused": refused, "markers_before_trust": before}}, handle)
            """
        ),
        tmp_path,
    )
    assert json.loads((tmp_path / "result.json").read_text()) == {"refused": [True] * 8, "markers_before_trust": []}
    assert sorted(path.name for path in markers.iterdir()) == [
        "configuration_vkood.py",
        "modeling_vkood.py",
        "processing_vkood.py",
    ]
