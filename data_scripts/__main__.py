"""One CLI for every dataset builder, writing Parquet, a dataset card and a skip report.

    python -m data_scripts NAME --root DIR --image-root DIR --knowledge INDEX|starter --out DIR
        [--splits ...] [--image-mode path|bytes] [--check-images decode|header|none] [--max-knowledge-items 16]
        [--num-proc N] [--strict] [--push-to-hub REPO] [--answer-vocabulary JSON|MODEL_DIR]

Writes `OUT/data/{split}-{i:05d}-of-{n:05d}.parquet` (the layout `push_to_hub` uses), `OUT/README.md` (dataset card)
and `OUT/skip_report.json`. Load the result with `datasets.load_dataset("OUT")` (the card's YAML names the files)
or `datasets.load_dataset("parquet", data_dir="OUT/data")`; the features come back from the Parquet schema.

The output is deterministic (same inputs, same bytes) and appears atomically: everything is written to a hidden
scratch folder beside OUT (`.OUT.tmp-*`) that replaces OUT only when complete, so an interrupted build leaves no
partial OUT and a rerun gives the same files. The scratch folder is locked while its build lives, so the next
build deletes the one a killed build left behind (`modeling_vkood.knowledge.scratch`).
"""

import argparse
import dataclasses
import importlib
import math
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from datasets import DatasetDict

from hub_cards.dataset_card import DATA_DIR, dataset_card
from modeling_vkood.knowledge.scratch import scratch_folder

from .common import IMAGE_MODES, BuildResult, open_knowledge, read_answer_vocabulary
from .image_check import IMAGE_CHECKS

BUILDERS = ("vqav2", "okvqa", "nlvr2", "coco_karpathy", "flickr30k", "easy_vqa", "knowledge_vqa")
GENERATED_KNOWLEDGE = ("knowledge_vqa",)  # builders that write their own knowledge items: --knowledge not read
NO_ROOT_NEEDED = ("easy_vqa", "knowledge_vqa")  # default to the easy-vqa package's data
FIXED_VOCABULARY = ("vqav2", "okvqa")  # builders whose `build` takes `vocabulary=` (--answer-vocabulary)
# Upper bound of one Parquet file; the Hub serves files of a few hundred MB best.
MAX_SHARD_BYTES = 500 * 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_scripts", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BUILDERS)
    parser.add_argument("--root", type=Path, help="folder of the official annotation files (easy_vqa: optional)")
    parser.add_argument("--image-root", type=Path, help="folder of the images (default: --root)")
    parser.add_argument("--knowledge", help='path to a built knowledge index, or "starter" (not for knowledge_vqa)')
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced when the build completes)")
    parser.add_argument("--splits", nargs="+", help="splits to build (default: every split whose files exist)")
    parser.add_argument("--image-mode", choices=IMAGE_MODES, default="path")
    parser.add_argument("--max-knowledge-items", type=int, default=16)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument(
        "--check-images",
        choices=IMAGE_CHECKS,
        default="decode",
        help="decode: fully decode every image once (default); header: only open it (finds empty, "
        "non-image and oversized files, not truncated ones); none: only check that it exists",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on a missing or unreadable image instead of skipping it"
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub dataset repository")
    parser.add_argument(
        "--answer-vocabulary",
        "--answer_vocabulary",
        type=Path,
        metavar="PATH",
        help=f"{'/'.join(FIXED_VOCABULARY)}: use these answers, in this label order, instead of the selected ones "
        "(e.g. a converted checkpoint's): a JSON list of answers, or a model folder whose config.json has id2label",
    )
    args = parser.parse_args(argv)
    if args.root is None and args.name not in NO_ROOT_NEEDED:
        parser.error(f"--root is required for {args.name}")
    if args.knowledge is None and args.name not in GENERATED_KNOWLEDGE:
        parser.error(f"--knowledge is required for {args.name}")
    if args.answer_vocabulary is not None and args.name not in FIXED_VOCABULARY:
        parser.error(f"--answer-vocabulary is for {', '.join(FIXED_VOCABULARY)}, not {args.name}")
    return args


def content_bytes(column: pa.ChunkedArray | pa.Array) -> int:
    """Bytes of the values in a column, independent of how Arrow chunked it.

    `Table.nbytes` counts per-chunk buffers (offsets), which differ between a 1-process and an N-process build;
    the shard count must not, or the output files would.
    """
    kind = column.type
    if pa.types.is_struct(kind):
        return sum(content_bytes(pc.struct_field(column, index)) for index in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return content_bytes(pc.list_flatten(column))
    if pa.types.is_binary(kind) or pa.types.is_string(kind) or pa.types.is_large_binary(kind):
        return pc.sum(pc.binary_length(column)).as_py() or 0
    return len(column) * max(1, kind.bit_width // 8)


def write_parquet(dataset: DatasetDict, folder: Path) -> list[Path]:
    """Each split as Parquet shards of at most about MAX_SHARD_BYTES, named as push_to_hub names them."""
    (folder / DATA_DIR).mkdir(parents=True)
    written = []
    for split, data in dataset.items():
        size = sum(content_bytes(column) for column in data.data.columns)
        num_shards = max(1, math.ceil(size / MAX_SHARD_BYTES))
        for index in range(num_shards):
            path = folder / DATA_DIR / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
            data.shard(num_shards, index, contiguous=True).to_parquet(str(path))
            written.append(path)
    return written


def knowledge_source(spec: str | None) -> str:
    """How the card names the knowledge the build used."""
    if spec is None:
        return "facts generated by the builder for each row (see the notes below)"
    if spec == "starter":
        return "the vkood starter graph (`KnowledgeBase.starter()`: easy-VQA shapes and colours, the 80 COCO objects)"
    return f"a ConceptNet index (`{Path(spec).name}`, built with `KnowledgeBase.build`)"


def write_output(result: BuildResult, args: argparse.Namespace, description, work: Path) -> None:
    """Parquet, README.md and skip_report.json into `work`."""
    write_parquet(result.dataset, work)
    card = dataset_card(
        description,
        result.dataset,
        result.skips.to_dict(),
        knowledge_source(args.knowledge),
        args.image_mode,
        repo_id=args.push_to_hub,
    )
    (work / "README.md").write_text(str(card), encoding="utf-8")
    result.skips.write(work / "skip_report.json")


def replace_folder(new: Path, target: Path, scratch: Path) -> None:
    """Move the finished `new` folder to `target`; an older build moves into `scratch` (deleted with it) first."""
    if target.exists():
        os.replace(target, scratch / "previous")
    os.replace(new, target)


def push(result: BuildResult, out: Path, repo_id: str) -> None:
    """Upload: `push_to_hub` embeds the images whatever the image mode; then the card and the skip report."""
    from huggingface_hub import HfApi

    result.dataset.push_to_hub(repo_id)
    api = HfApi()
    for name in ("README.md", "skip_report.json"):
        api.upload_file(path_or_fileobj=str(out / name), path_in_repo=name, repo_id=repo_id, repo_type="dataset")


def given_vocabulary_note(path: Path, size: int) -> str:
    """The card's note on a vocabulary given with --answer-vocabulary (it replaces the rule the notes describe)."""
    return (
        f"The answer vocabulary (the ClassLabel of `label_ids`) was given, not selected: the {size} answers of "
        f"`{path.resolve().name}` (`--answer-vocabulary`) in their label order; the selection rule above does not "
        "apply."
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    module = importlib.import_module(f"data_scripts.{args.name}")
    description, fixed = module.DESCRIPTION, {}
    if args.answer_vocabulary is not None:
        fixed["vocabulary"] = read_answer_vocabulary(args.answer_vocabulary)
        note = given_vocabulary_note(args.answer_vocabulary, len(fixed["vocabulary"]))
        description = dataclasses.replace(description, notes=[*description.notes, note])
    out = args.out.resolve()
    with scratch_folder(out.parent, f".{out.name}.tmp-") as scratch:
        work = scratch / "output"
        work.mkdir()  # the usual permissions (the scratch folder itself is private)
        result = module.build(
            args.root,
            args.image_root or args.root,
            None if args.knowledge is None else open_knowledge(args.knowledge),
            splits=args.splits,
            max_knowledge_items=args.max_knowledge_items,
            num_proc=args.num_proc,
            strict=args.strict,
            image_mode=args.image_mode,
            check_images=args.check_images,
            work_dir=scratch / "arrow",
            **fixed,
        )
        write_output(result, args, description, work)
        replace_folder(work, out, scratch)
        print(
            f"{args.name}: wrote {out}: rows {result.dataset.num_rows}, "
            f"skipped {len(result.skips.skipped)} (see skip_report.json)",
            file=sys.stderr,
        )
        if args.push_to_hub:
            push(result, out, args.push_to_hub)
        del result  # release the memory-mapped Arrow files before the scratch folder is deleted
    return 0


if __name__ == "__main__":
    sys.exit(main())
