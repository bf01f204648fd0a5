"""Check that the image files a build stores can be read, once per distinct file, before they are stored.

Without it an empty, truncated, non-image or decompression-bomb file is stored and fails only at training time,
inside the collator, far from the file's name. Modes (`--check-images`):

- "decode" (default): open and fully decode every image (`Image.load()`), the work the collator will do; finds
  every unreadable file. Decoding every image is the slow part of a build, so the check runs in `num_proc`
  processes.
- "header": open only (Pillow reads the header): finds empty, non-image and oversized files, not truncated ones.
- "none": no check beyond the file existing.

Oversized images: Pillow raises `DecompressionBombError` above twice `PIL.Image.MAX_IMAGE_PIXELS` (89.5 M pixels
by default) and only warns between once and twice that. The check turns the warning into an error, so an image
above the limit is unreadable whatever the warning filters: whether a row is kept never depends on the
interpreter's settings, and one image never costs more than about 270 MB of RGB per worker at training time.
To keep larger images, raise `PIL.Image.MAX_IMAGE_PIXELS` before building (and before training).
"""

import struct
import warnings
from collections.abc import Iterable

import PIL.Image
from datasets import Dataset

IMAGE_CHECKS = ("decode", "header", "none")
# What Pillow raises for a file it cannot read: unidentified/truncated/IO (OSError), broken chunks (SyntaxError,
# struct.error, EOFError), bad header values (ValueError), and the pixel limit (DecompressionBomb*).
_UNREADABLE = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    PIL.Image.DecompressionBombError,
    PIL.Image.DecompressionBombWarning,
)


def image_problem(path: str, check: str) -> str:
    """What makes the image file at `path` unreadable under `check` ("decode" or "header"); "" when it is fine."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                if check == "decode":
                    image.load()
    except _UNREADABLE as error:
        return f"{type(error).__name__}: {error}"
    return ""


class _CheckBatch:
    """Batched `datasets.map` function: the `problem` of each path (picklable, so it runs with num_proc > 1)."""

    def __init__(self, check: str) -> None:
        self.check = check

    def __call__(self, batch: dict) -> dict:
        return {"problem": [image_problem(path, self.check) for path in batch["path"]]}


class ImageChecker:
    """Checks each distinct image file once per build (VQA asks about 5 questions per image, COCO has 5 captions)."""

    def __init__(self, check: str = "decode", num_proc: int = 1) -> None:
        if check not in IMAGE_CHECKS:
            raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check!r}")
        self.check = check
        self.num_proc = num_proc
        self._problems: dict[str, str] = {}

    def problems(self, paths: Iterable[str], split: str) -> dict[str, str]:
        """path -> problem ("" = readable) for every path given, checking only the files not seen before."""
        paths = list(dict.fromkeys(paths))
        if self.check == "none":
            return dict.fromkeys(paths, "")
        new = [path for path in paths if path not in self._problems]
        if new:
            checked = Dataset.from_dict({"path": new}).map(
                _CheckBatch(self.check),
                batched=True,
                batch_size=64,
                num_proc=self.num_proc if self.num_proc > 1 and len(new) > 1 else None,
                keep_in_memory=True,
                desc=f"checking images {split} ({self.check})",
                new_fingerprint=f"vkood-check-images-{split}",
            )
            self._problems.update(zip(new, checked["problem"]))
        return {path: self._problems[path] for path in paths}
