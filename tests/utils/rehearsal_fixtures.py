"""Inputs of the rehearsals of the shipped run configs (tests/test_rehearsal.py), all offline.

- Tiny backbones saved in the formats of the paper's checkpoints: a `CLIPModel` composite folder like
  `openai/clip-vit-base-patch16` (config with text and vision sub-configs, safetensors, `preprocessor_config.json`
  of a `CLIPImageProcessor`, a CLIP BPE tokenizer with `vocab.json` / `merges.txt`), and a `RobertaModel` folder
  like `FacebookAI/roberta-base` (byte-level BPE tokenizer with `vocab.json` / `merges.txt`). The BPE vocabularies
  are written here: every byte symbol plus a few merges of common English pairs.
- Official annotation folders made of real records of ../shared/refdata (a small subset), laid out under the
  official file names, with generated images at the official image file names.
"""

import gzip
import json
import re
import zipfile
from pathlib import Path

from PIL import Image

# Common letter pairs of English (and of the refdata questions): enough merges for a BPE that is not only bytes.
MERGED_PAIRS = ("t h", "h e", "i n", "e r", "a n", "o n", "r e", "a t", "e n", "o r", "i s", "o u")
IMAGE_SIDE = 32  # the tiny CLIP vision tower's input; generated images are a little larger so the processor resizes


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's byte-to-unicode table), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def write_bpe_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """`vocab.json` and `merges.txt` as the Hub checkpoints carry them (beside tokenizer.json)."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def save_tiny_clip(folder: Path) -> Path:
    """A 2-layer CLIPModel (vision and text towers of width 32, 32 px images) with its processor files."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    symbols = byte_symbols()
    merges = list(MERGED_PAIRS) + [f"{a} {b}</w>" for a, b in (p.split() for p in MERGED_PAIRS)]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIDE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(  # writes the preprocessor_config.json of a CLIPImageProcessor (no torchvision here)
        size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_bpe_files(folder, vocab, merges)
    return folder


def save_tiny_roberta(folder: Path) -> Path:
    """A 2-layer RobertaModel of width 32 with a byte-level BPE tokenizer, as FacebookAI/roberta-base is laid out."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    merges = ["Ġ t", "Ġ a", "Ġ w", "Ġ s", "Ġt h", *MERGED_PAIRS]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for token in [*byte_symbols(), *(merge.replace(" ", "") for merge in merges)]:
        vocab.setdefault(token, len(vocab))
    vocab["<mask>"] = len(vocab)
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=64)
    config = RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    RobertaModel(config, add_pooling_layer=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_bpe_files(folder, vocab, merges)
    return folder


def save_char_roberta_tokenizer(folder: Path) -> str:
    """A character-level byte-BPE tokenizer in RoBERTa's layout (<s>=0, <pad>=1, </s>=2; 36 tokens), for the tiny
    METER models of tests/utils/meter_oracle.py, whose text encoder has a vocabulary of 100."""
    from transformers import RobertaTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in ["Ġ", *map(chr, range(ord("a"), ord("z") + 1)), *"?.,'"]:
        vocab[char] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")  # no merges: one token per character
    RobertaTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------------------- images and annotations


def image_writer(folder: Path):
    """Writes a distinct small image at each path asked for (a colour per call), creating folders."""
    count = [0]

    def write(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        index = count[0]
        count[0] += 1
        colour = ((53 * index) % 256, (97 * index + 40) % 256, (151 * index + 80) % 256)
        image = Image.new("RGB", (IMAGE_SIDE + 8, IMAGE_SIDE + 4), colour)
        image.paste((255 - colour[0], 255 - colour[1], 255 - colour[2]), (4, 4, 4 + index % 20 + 6, 20))
        image.save(path)

    return write


def _vqa_header(refdata: Path, kind: str, subtype: str) -> dict:
    header = json.loads((refdata / "vqav2" / "header_sample" / f"{kind}.json").read_text())
    header.pop(kind)
    return {**header, "data_subtype": subtype}


def write_vqav2(refdata: Path, root: Path, image_root: Path, per_split: int) -> dict[str, int]:
    """VQAv2 in its official files: the first questions of the real records (train2014) for train, the next ones,
    filed as val2014, for validation, and the next ones as test-dev questions; one image per image id at
    `COCO_{folder}_{id:012d}.jpg`."""
    questions = json.loads(gzip.open(refdata / "vqav2" / "vqa_questions_valid.gzip").read())["questions"]
    annotations = json.loads(gzip.open(refdata / "vqav2" / "vqa_annotatons_valid.gzip").read())["annotations"]
    by_id = {record["question_id"]: record for record in annotations}
    root.mkdir(parents=True)
    write_image, counts = image_writer(image_root), {}
    for index, (split, subtype) in enumerate((("train", "train2014"), ("validation", "val2014"))):
        chosen = questions[index * per_split : (index + 1) * per_split]
        (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(
            json.dumps({**_vqa_header(refdata, "questions", subtype), "questions": chosen})
        )
        (root / f"v2_mscoco_{subtype}_annotations.json").write_text(
            json.dumps(
                {
                    **_vqa_header(refdata, "annotations", subtype),
                    "annotations": [by_id[q["question_id"]] for q in chosen],
                }
            )
        )
        for image_id in sorted({q["image_id"] for q in chosen}):
            write_image(image_root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg")
        counts[split] = len(chosen)
    # test-dev: the next questions, without answers, on test2015 images (the split a VQAv2 server file answers)
    chosen = questions[2 * per_split : 3 * per_split]
    (root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(
        json.dumps({**_vqa_header(refdata, "questions", "test-dev2015"), "questions": chosen})
    )
    for image_id in sorted({q["image_id"] for q in chosen}):
        write_image(image_root / "test2015" / f"COCO_test2015_{image_id:012d}.jpg")
    counts["test_dev"] = len(chosen)
    return counts


def okvqa_annotation(question: dict) -> dict:
    """An annotation record in the schema of the published OK-VQA v1.0 files (`mscoco_*2014_annotations.json`):
    5 annotators, each answer recorded twice (answer_id 1..10, raw_answer and its normalised answer),
    answer_type "other", question_type one of OK-VQA's knowledge categories, a confidence; no
    `multiple_choice_answer` (the published records have none). The answers are derived from the question words
    so that some recur across questions and reach OK-VQA's vocabulary threshold."""
    words = re.findall(r"[a-z]+", question["question"].lower())
    given = [words[-1] if words else "thing", "yes", words[0] if words else "what", "yes", "food"]
    answers = [
        {"answer_id": 2 * index + copy + 1, "raw_answer": answer, "answer_confidence": "yes", "answer": answer}
        for index, answer in enumerate(given)
        for copy in range(2)
    ]
    return {
        "image_id": question["image_id"],
        "answer_type": "other",
        "question_type": "eight",
        "question_id": question["question_id"],
        "answers": answers,
        "confidence": 3,
    }


def write_okvqa(refdata: Path, root: Path, image_root: Path, per_split: int) -> dict[str, int]:
    """OK-VQA in its official files: the first real questions of each genuine question file, the annotation
    files in the published schema (see `okvqa_annotation`), COCO images at their official names."""
    root.mkdir(parents=True)
    write_image, counts = image_writer(image_root), {}
    for split, subtype in (("train", "train2014"), ("validation", "val2014")):
        document = json.loads((refdata / "okvqa" / f"OpenEnded_mscoco_{subtype}_questions.json").read_text())
        chosen = document["questions"][:per_split]
        header = {key: value for key, value in document.items() if key != "questions"}
        (root / f"OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps({**header, "questions": chosen}))
        annotations = {**header, "annotations": [okvqa_annotation(q) for q in chosen]}
        (root / f"mscoco_{subtype}_annotations.json").write_text(json.dumps(annotations))
        for image_id in sorted({q["image_id"] for q in chosen}):
            write_image(image_root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg")
        counts[split] = len(chosen)
    return counts


def write_nlvr2(refdata: Path, root: Path, image_root: Path, per_split: int) -> dict[str, int]:
    """NLVR2 in its official files: real dev.json records. dev.json keeps the first ones unchanged; train.json
    takes the next ones as train.json records are written (identifier `train-...`, a numbered `directory`),
    since refdata holds no train records. Images `{split}-{set}-{pair}-img{0,1}.png` where the archives put them."""
    records = [json.loads(line) for line in (refdata / "nlvr2" / "dev.json").read_text().splitlines() if line]
    root.mkdir(parents=True)
    write_image = image_writer(image_root)
    dev, train = records[:per_split], records[per_split : 2 * per_split]
    train = [
        {**r, "identifier": "train-" + r["identifier"].split("-", 1)[1], "directory": 1 + i % 3}
        for i, r in enumerate(train)
    ]
    for name, chosen, folder in (
        ("dev.json", dev, lambda r: "dev"),
        ("train.json", train, lambda r: f"train/{r['directory']}"),
    ):
        (root / name).write_text("".join(json.dumps(record) + "\n" for record in chosen))
        for stem in sorted({(folder(r), r["identifier"].rsplit("-", 1)[0]) for r in chosen}):
            for side in (0, 1):
                write_image(image_root / stem[0] / f"{stem[1]}-img{side}.png")
    return {"train": len(train), "validation": len(dev)}


def _flickr8k(refdata: Path) -> dict:
    with zipfile.ZipFile(refdata / "karpathy" / "dataset_flickr8k.zip") as archive:
        return json.loads(archive.read("dataset_flickr8k.json"))


def write_coco_karpathy(refdata: Path, root: Path, image_root: Path, per_split: int) -> dict[str, int]:
    """`dataset_coco.json`: the real first record of the COCO file (a test image) and records in its exact
    schema (filepath, filename, cocoid, split, sentences with raw/tokens) whose captions are real Karpathy
    captions (Flickr8k's, the only other real split file at hand); images at `{filepath}/{filename}`."""
    document = json.loads((refdata / "karpathy" / "dataset_coco.first_record.json").read_text())
    first = document["images"][0]
    captions = [record["sentences"] for record in _flickr8k(refdata)["images"]]
    records = [first]
    for index in range(2 * per_split - 1):
        split, folder = ("test", "val2014") if index < per_split - 1 else ("train", "train2014")
        cocoid = 100000 + index
        sentences = [{**sentence, "imgid": index + 1} for sentence in captions[index]]
        records.append(
            {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
                "imgid": index + 1,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        )
    root.mkdir(parents=True)
    (root / "dataset_coco.json").write_text(json.dumps({**document, "images": records}))
    write_image = image_writer(image_root)
    for record in records:
        write_image(image_root / record["filepath"] / record["filename"])
    return {"train": per_split, "test": per_split}


def write_flickr30k(refdata: Path, root: Path, image_root: Path, per_split: int) -> dict[str, int]:
    """`dataset_flickr30k.json` from the real Karpathy Flickr8k file (the same schema): its first test images
    (and their records unchanged); images at `image_root/{filename}`."""
    document = _flickr8k(refdata)
    test = [record for record in document["images"] if record["split"] == "test"][:per_split]
    root.mkdir(parents=True)
    (root / "dataset_flickr30k.json").write_text(json.dumps({**document, "images": test}))
    write_image = image_writer(image_root)
    for record in test:
        write_image(image_root / record["filename"])
    return {"test": len(test)}
