"""Training-step time of the embedded default recipe with and without the frozen-text-block cache, side by side.

    python benchmarks/default_step.py [--config configuration/easy_vqa.yaml] [--batches 8] [--rounds 3]

Builds the recipe's model and batches exactly as `train.py` does, fills the cache on the batches, then times
forward + backward + AdamW step on the same batches alternately with the cache and paused (so that a change of the
machine's speed hits both alike). Prints JSON: median seconds per step of each, their ratio, the cache's hit count;
writes it to benchmarks/results/default_step/default_step.json (or `--out`) and records the commit, command and
arguments in that folder's provenance.json (benchmarks/provenance.py).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# This folder holds benchmarks/datasets.py, which would shadow the `datasets` library when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import torch  # noqa: E402

from data_scripts.common import answer_vocabulary  # noqa: E402
from modeling_vkood.training import (  # noqa: E402
    PixelCache,
    VQACollator,
    apply_finetuning,
    build_model,
    load_splits,
    parse_arguments,
)
from modeling_vkood.training.frozen_text_cache import FrozenTextPrefixCache  # noqa: E402
from modeling_vkood.training.model_factory import max_knowledge_items  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import provenance


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configuration/easy_vqa.yaml")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "default_step" / "default_step.json"
    )
    args = parser.parse_args()
    run = provenance.begin(args)
    model_args, data_args, _, training_args = parse_arguments([args.config, "--output_dir", "/tmp/default_step"])
    splits = load_splits(data_args, [data_args.train_split], max_knowledge_items(model_args))
    dataset = splits[data_args.train_split]
    id2label = dict(enumerate(answer_vocabulary(splits)))
    built = build_model(model_args, "vqa", id2label)
    model = apply_finetuning(built, model_args).train()
    collator = VQACollator(built.processor, len(id2label), PixelCache(built.processor, data_args.pixel_cache_size))
    size = training_args.per_device_train_batch_size
    batches = [collator([dataset[i] for i in range(b * size, (b + 1) * size)]) for b in range(args.batches)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    cache = FrozenTextPrefixCache.for_model(built.model.base_model)

    def step(batch):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    for batch in batches:  # warm-up: fills the cache, first-call allocations
        step(batch)
    seconds = {"cached": [], "plain": []}
    for round_index in range(args.rounds):
        for index, batch in enumerate(batches):
            seconds["cached"].append(step(batch))
            with cache.paused():
                seconds["plain"].append(step(batch))
            print(f"round {round_index + 1}/{args.rounds} batch {index + 1}/{len(batches)}", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    summary = {
        "config": args.config,
        "batch_size": size,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_step": {name: round(value, 4) for name, value in median.items()},
        "speedup": round(median["plain"] / median["cached"], 3),
        "cached_blocks": len(cache.blocks),
        "cache_rows": cache.misses,
        "cache_hit_fraction": round(cache.hits / (cache.hits + cache.misses), 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    provenance.record(args.out.parent, run, outputs=[args.out])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
