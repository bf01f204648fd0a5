"""Generated images and annotation files in the layouts of easy-VQA, NLVR2 and COCO Karpathy."""

import json
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
SHAPES = ("circle", "rectangle", "triangle")
ANSWERS = ["yes", "no", "circle", "rectangle", "triangle", *COLOURS]


def draw(shape: str, colour: str, size: int = 32) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (size, size), (255, 255, 255))
    pen, box = PIL.ImageDraw.Draw(image), (6, 6, size - 6, size - 6)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "rectangle":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(size // 2, 6), (6, size - 6), (size - 6, size - 6)], fill=COLOURS[colour])
    return image


def scenes(count: int, offset: int = 0) -> list[tuple[str, str]]:
    return [(SHAPES[(i + offset) % 3], list(COLOURS)[(i + offset) // 3 % 3]) for i in range(count)]


def write_easy_vqa(root: Path) -> Path:
    """The easy-VQA package layout: answers.txt, {split}/questions.json, {split}/images/{id}.png."""
    root.mkdir(parents=True)
    (root / "answers.txt").write_text("\n".join(ANSWERS) + "\n")
    for split, count, offset in (("train", 12, 0), ("test", 6, 1)):
        (root / split / "images").mkdir(parents=True)
        questions = []
        for image_id, (shape, colour) in enumerate(scenes(count, offset)):
            draw(shape, colour).save(root / split / "images" / f"{image_id}.png")
            questions += [
                ["what shape is in the image?", shape, image_id],
                ["what color is the shape?", colour, image_id],
                [f"is there a red {shape}?", "yes" if colour == "red" else "no", image_id],
            ]
        (root / split / "questions.json").write_text(json.dumps(questions))
    return root


def write_nlvr2(root: Path) -> Path:
    """NLVR2 layout: train.json / dev.json (JSON lines) and {split}-{set}-{pair}-img{0,1}.png images."""
    for split, folder, name in (("train", "train", "train.json"), ("dev", "dev", "dev.json")):
        lines = []
        for pair, (shape, colour) in enumerate(scenes(6)):
            for sentence in range(2):
                identifier = f"{split}-{pair}-{pair}-{sentence}"
                stem = identifier.rsplit("-", 1)[0]
                for side, picture in enumerate((draw(shape, colour), draw(SHAPES[(pair + 1) % 3], colour))):
                    (root / "images" / folder).mkdir(parents=True, exist_ok=True)
                    picture.save(root / "images" / folder / f"{stem}-img{side}.png")
                label = "True" if sentence == 0 else "False"
                lines.append(
                    json.dumps(
                        {"identifier": identifier, "sentence": f"one image shows a {colour} {shape}", "label": label}
                    )
                )
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def write_coco_karpathy(root: Path) -> Path:
    """Karpathy split file dataset_coco.json and images under {filepath}/{filename}."""
    records = []
    for index, (shape, colour) in enumerate(scenes(12)):
        split = "train" if index < 8 else "test"
        filename = f"COCO_{index:06d}.jpg"
        (root / "images" / "val2014").mkdir(parents=True, exist_ok=True)
        draw(shape, colour).save(root / "images" / "val2014" / filename)
        records.append(
            {
                "filepath": "val2014",
                "filename": filename,
                "cocoid": 100 + index,
                "split": split,
                "sentences": [{"raw": f"a {colour} {shape}"}, {"raw": f"a {shape} that is {colour}"}],
            }
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": records}))
    return root
