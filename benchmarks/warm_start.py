"""Warm start on knowledge-VQA: the recipe from scratch against the same recipe started from a model of the same
architecture trained without knowledge (on easy-VQA); accuracy, AUROC and kept fractions over the steps. Prints JSON.

Every model is `train.py` run as a subprocess (`python train.py configuration/knowledge_vqa.yaml ...`):
1. data: easy-VQA as its builder makes it (`python -m data_scripts easy_vqa --knowledge starter`), then a copy whose
   `knowledge` column is empty on every row (no item reaches the collator, so the model never sees knowledge);
2. pre-training, one run (`--pretrain-seed`): knowledge_vqa.yaml's model and optimiser (same vision, text and
   vkood configs, tokenizer, classifier head and ood_config) on that copy, `--pretrain-steps` steps, with
   `--balance_by question_type` (easy_vqa.yaml's: shape questions are 13% of easy-VQA) and the OOD objectives and
   gate forcing off (they need knowledge items); `--knowledge` names an index that does not exist, so the saved
   processor retrieves nothing either;
3. knowledge-VQA, three arms x `--seeds`, with a checkpoint every `--save-steps` steps (all kept):
   - `scratch`: knowledge_vqa.yaml as it is;
   - `warm`: the same with `--init_from` the pre-trained folder. train.py loads every weight whose shape fits: the
     classifier's answer projection (13 easy-VQA answers there, 16 place words here) starts anew, the classifier's
     gate, value and norm layers are the pre-trained ones;
   - `warm_new_classifier`: `--init_from` a copy of the pre-trained folder without the classifier's tensors, so that
     the whole classifier starts anew and only the encoders, fusion, poolers and OOD layer are carried over;
4. evaluation: `train.py ... --init_from CHECKPOINT --do_train false` for every checkpoint, and for step 0 the
   initial model (`--do_train false` with the run's seed builds exactly the model the run started from). All with
   `--ood_plot_examples 2000`: the OOD metrics on the whole test split (1,582 questions), not only its first 512.

    python benchmarks/warm_start.py        # the study: 7 trainings of 1,500 steps and 42 evaluations
    python benchmarks/warm_start.py --steps 4 --save-steps 2 --pretrain-steps 4 --max-eval-samples 64 \
        --work /tmp/warm_start_smoke --out /tmp/warm_start_smoke/results     # smoke test of the whole pipeline

Writes `--out` (default benchmarks/results/warm_start/): results.json, warm_start.png and provenance.json
(benchmarks/provenance.py). Models, checkpoints, evaluation folders and logs go to `--work` (default
/tmp/vkood_warm_start, outside the repository). A finished process is reused when the study is rerun with the same
command: its folder's warm_start_task.json records the command, when it ran and the commit and changed files of the
tree it started from (other work may commit or edit while a study runs); results.json lists them all under "tasks".
"""

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# This folder holds benchmarks/datasets.py, which would shadow the `datasets` library when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import provenance  # noqa: E402

CONFIG = "configuration/knowledge_vqa.yaml"
# scratch: the recipe as it is; warm: `--init_from` the pre-trained folder (train.py carries over every weight whose
# shape fits: the classifier's answer projection (13 easy-VQA answers, 16 place words) starts anew, its gate, value and
# norm layers are kept); warm_new_classifier: `--init_from` a copy of that folder without the classifier's weights, so
# the whole classifier starts anew.
ARMS = ("scratch", "warm", "warm_new_classifier")
ARM_LABELS = {
    "scratch": "from scratch",
    "warm": "warm start (easy-VQA, no knowledge): all but the answer projection",
    "warm_new_classifier": "warm start, the whole classifier new",
}
METRICS = {
    "eval_vqa_accuracy": "VQA accuracy (%) on the knowledge-VQA test split (1,582 questions)",
    "ood_auroc_fitting": "AUROC of the OOD scores, the 2 fitting facts of a question against its 9 others",
    "ood_kept_fraction_fitting": "share of the fitting facts whose gate is > 0.5",
    "ood_kept_fraction_not_fitting": "share of the not-fitting facts whose gate is > 0.5",
}
EXTRA_METRICS = ("eval_loss", "ood_kept_fraction")
TASK_RECORD = "warm_start_task.json"
LOSS_LINE = re.compile(r"\{'loss'")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Task:
    name: str
    argv: list[str]  # train.py's arguments
    folder: Path  # its --output_dir
    needs: tuple[str, ...] = ()
    steps: int | None = None  # a training: its optimizer steps (for the progress lines)
    state: str = "waiting"  # waiting, running, done, reused, failed, skipped
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    started: float = 0.0
    seconds: float | None = None
    prepare: Callable[[], None] | None = None  # run before the process starts (e.g. write its --init_from folder)
    record: dict = field(default_factory=dict)  # TASK_RECORD: command, started, finished, commit, changed files

    @property
    def command(self) -> list[str]:
        return ["python", "train.py", *self.argv]

    def finished_before(self) -> bool:
        path = self.folder / TASK_RECORD
        if not (path.is_file() and (self.folder / "all_results.json").is_file()):
            return False
        record = json.loads(path.read_text())
        if record["command"] != self.command:
            return False
        self.record = record
        return True


# ----------------------------------------------------------------------------------------------------- the data


def knowledge_free_easy_vqa(work: Path) -> Path:
    """easy-VQA as `python -m data_scripts easy_vqa` builds it, and a copy whose knowledge column is empty."""
    built, empty = work / "data" / "easy_vqa_built", work / "data" / "easy_vqa_no_knowledge"
    if (empty / "done.json").is_file():
        return empty
    if not (built / "README.md").is_file():
        command = [sys.executable, "-m", "data_scripts", "easy_vqa", "--knowledge", "starter", "--out", str(built)]
        log(f"building easy-VQA: {' '.join(command)}")
        subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    import datasets

    source = datasets.load_dataset(str(built))
    (empty / "data").mkdir(parents=True, exist_ok=True)
    rows = {}
    for split, data in source.items():
        data = data.cast_column("image", datasets.Image(decode=False))
        cleared = data.map(
            lambda batch: {"knowledge": [[] for _ in batch["knowledge"]]},
            batched=True,
            features=data.features,
            keep_in_memory=True,
        )
        if any(len(items) for items in cleared["knowledge"]):
            raise RuntimeError(f"{split}: knowledge items left in the knowledge-free copy")
        cleared.to_parquet(str(empty / "data" / f"{split}-00000-of-00001.parquet"))
        rows[split] = {"rows": len(cleared), "items_before": sum(len(k) for k in data["knowledge"]), "items_after": 0}
    (empty / "done.json").write_text(json.dumps({"source": str(built), "splits": rows}, indent=2))
    log(f"knowledge-free easy-VQA: {empty} {rows}")
    return empty


def without_classifier(source: Path, target: Path) -> None:
    """A copy of the checkpoint folder `source` whose model.safetensors lacks the classifier's tensors: loaded with
    `--init_from`, the whole classifier is then initialised anew (missing weights), everything else is `source`'s."""
    if (target / "model.safetensors").is_file():
        return
    import shutil

    from safetensors.torch import load_file, save_file

    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy2(path, scratch / path.name)
    state = load_file(source / "model.safetensors")
    kept = {name: tensor for name, tensor in state.items() if not name.startswith("classifier.")}
    save_file(kept, scratch / "model.safetensors", metadata={"format": "pt"})
    scratch.rename(target)
    log(f"{target}: {source} without its {len(state) - len(kept)} classifier tensors")


# ---------------------------------------------------------------------------------------------------- the tasks


def checkpoint_steps(steps: int, save_steps: int) -> list[int]:
    return sorted({*range(save_steps, steps + 1, save_steps), steps})


def plan(args, easy_vqa: Path) -> tuple[Task, dict, dict]:
    """The pre-training task, the knowledge-VQA runs {(arm, seed): Task} and the evaluations {(arm, seed, step)}."""
    common = ["--disable_tqdm", "true", "--ood_plot_examples", "2000"]
    if args.max_eval_samples is not None:
        common += ["--max_eval_samples", str(args.max_eval_samples)]
    no_index = args.work / "no_knowledge_index.sqlite"  # must not exist: the processor then retrieves nothing
    if no_index.exists():
        raise FileExistsError(f"{no_index} exists: the pre-training names it as an absent index")
    pre_folder = args.work / "pretrain" / f"easy_vqa_no_knowledge-s{args.pretrain_seed}"
    pretrain = Task(
        "pretrain",
        [
            CONFIG,
            "--dataset",
            str(easy_vqa),
            "--knowledge",
            str(no_index),
            "--eval_split",
            "test",
            "--balance_by",
            "question_type",
            "--ood_alignment_weight",
            "0",
            "--ood_cross_image_weight",
            "0",
            "--ood_gate_forcing_steps",
            "0",
            "--ood_gate_handover_steps",
            "0",
            "--max_steps",
            str(args.pretrain_steps),
            "--seed",
            str(args.pretrain_seed),
            "--output_dir",
            str(pre_folder),
            *common,
        ],
        pre_folder,
        steps=args.pretrain_steps,
    )
    headless = pre_folder.with_name(pre_folder.name + "-without_classifier")
    starts = {"scratch": None, "warm": pre_folder, "warm_new_classifier": headless}
    prepare = {"warm_new_classifier": lambda: without_classifier(pre_folder, headless)}
    runs, evaluations = {}, {}
    for arm in args.arms:
        for seed in args.seeds:
            folder = args.work / "runs" / f"{arm}-s{seed}"
            init = [] if starts[arm] is None else ["--init_from", str(starts[arm])]
            runs[arm, seed] = Task(
                f"{arm}-s{seed}",
                [
                    CONFIG,
                    *init,
                    "--seed",
                    str(seed),
                    "--max_steps",
                    str(args.steps),
                    "--save_strategy",
                    "steps",
                    "--save_steps",
                    str(args.save_steps),
                    "--output_dir",
                    str(folder),
                    *common,
                ],
                folder,
                needs=() if arm == "scratch" else ("pretrain",),
                steps=args.steps,
                prepare=prepare.get(arm),
            )
            for step in [0, *checkpoint_steps(args.steps, args.save_steps)]:
                source = init if step == 0 else ["--init_from", str(folder / f"checkpoint-{step}")]
                needs = runs[arm, seed].needs if step == 0 else (runs[arm, seed].name,)
                evaluations[arm, seed, step] = Task(
                    f"eval-{arm}-s{seed}-step{step}",
                    [
                        CONFIG,
                        *source,
                        "--do_train",
                        "false",
                        "--seed",
                        str(seed),
                        "--output_dir",
                        str(args.work / "evals" / f"{arm}-s{seed}" / f"step-{step}"),
                        *common,
                    ],
                    args.work / "evals" / f"{arm}-s{seed}" / f"step-{step}",
                    needs=needs,
                    prepare=prepare.get(arm) if step == 0 else None,
                )
    return pretrain, runs, evaluations


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def progress_of(task: Task, logging_steps: int) -> str:
    if task.steps is None or task.log_path is None or not task.log_path.is_file():
        return task.name
    lines = sum(1 for line in task.log_path.read_text(errors="replace").splitlines() if LOSS_LINE.search(line))
    return f"{task.name} ~step {min(lines * logging_steps, task.steps)}/{task.steps}"


def run_all(tasks: list[Task], args, logging_steps: int) -> None:
    """Run the tasks, `--jobs` at a time with `--threads` threads each, each once its `needs` are done."""
    environment = dict(os.environ)
    if args.threads is not None:
        environment.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task.finished_before():
            task.state = "reused"
    started, last_report = time.perf_counter(), time.perf_counter()
    while True:
        finished = {t.name for t in tasks if t.state in ("done", "reused")}
        broken = {t.name for t in tasks if t.state in ("failed", "skipped")}
        for task in tasks:
            if task.state == "waiting" and any(need in broken for need in task.needs):
                task.state = "skipped"
                log(f"skipped {task.name}: {[n for n in task.needs if n in broken]} did not finish")
        running = [t for t in tasks if t.state == "running"]
        for task in running:
            code = task.process.poll()
            if code is None:
                continue
            task.seconds = time.perf_counter() - task.started
            if code == 0 and (task.folder / "all_results.json").is_file():
                task.state = "done"
                task.record["finished"] = utc_now()
                (task.folder / TASK_RECORD).write_text(json.dumps(task.record, indent=2))
            else:
                task.state = "failed"
            done = sum(t.state in ("done", "reused") for t in tasks)
            log(
                f"[{done}/{len(tasks)}] {task.name}: {task.state} (exit {code}) in {task.seconds:.0f} s"
                + (f"; see {task.log_path}" if code else "")
            )
        running = [t for t in tasks if t.state == "running"]
        ready = [t for t in tasks if t.state == "waiting" and all(need in finished for need in t.needs)]
        for task in ready[: max(0, args.jobs - len(running))]:
            task.log_path = args.work / "logs" / f"{task.name}.log"
            task.folder.mkdir(parents=True, exist_ok=True)
            if task.prepare is not None:
                task.prepare()
            tree = provenance.begin()  # the code this process imports: other work may commit or edit meanwhile
            task.record = {
                "command": task.command,
                "started": utc_now(),
                "commit": tree["commit"],
                "changed_files": tree["changed_files"],
            }
            with task.log_path.open("w") as output:
                task.process = subprocess.Popen(
                    [sys.executable, "train.py", *task.argv],
                    cwd=REPO_ROOT,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=environment,
                )
            task.state, task.started = "running", time.perf_counter()
            log(f"started {task.name}: {' '.join(task.command)}")
        running = [t for t in tasks if t.state == "running"]
        if not running and not any(t.state == "waiting" for t in tasks):
            break
        if time.perf_counter() - last_report >= args.progress_seconds and running:
            last_report = time.perf_counter()
            left = sum(t.state in ("waiting", "running") for t in tasks)
            now = ", ".join(progress_of(t, logging_steps) for t in running)
            log(f"{time.perf_counter() - started:.0f} s: running {now}; {left} tasks left")
        time.sleep(2)


# -------------------------------------------------------------------------------------------------- the results


def summary(values: list[float]) -> dict:
    """Mean and standard error of the mean (sample deviation / sqrt(n); 0 for one value)."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"values": values, "mean": mean, "sem": spread / math.sqrt(len(values))}


def read_results(folder: Path) -> dict:
    return json.loads((folder / "all_results.json").read_text())


def loss_history(folder: Path) -> list[list[float]]:
    state = folder / "trainer_state.json"
    if not state.is_file():
        return []
    return [[entry["step"], entry["loss"]] for entry in json.loads(state.read_text())["log_history"] if "loss" in entry]


def collect(args, pretrain: Task, runs: dict, evaluations: dict) -> dict:
    keep = (*METRICS, *EXTRA_METRICS)
    steps = [0, *checkpoint_steps(args.steps, args.save_steps)]
    measured = {arm: {str(seed): {} for seed in args.seeds} for arm in args.arms}
    for (arm, seed, step), task in evaluations.items():
        if task.state in ("done", "reused"):
            results = read_results(task.folder)
            measured[arm][str(seed)][str(step)] = {name: results[name] for name in keep if name in results}
    table = {}
    for arm in args.arms:
        table[arm] = {}
        for step in steps:
            per_seed = [measured[arm][str(seed)].get(str(step)) for seed in args.seeds]
            if any(row is None for row in per_seed):
                continue
            table[arm][str(step)] = {
                name: summary([row[name] for row in per_seed]) for name in METRICS if name in per_seed[0]
            }
    trained, checks = {}, {}
    for (arm, seed), task in runs.items():
        if task.state not in ("done", "reused"):
            continue
        final = read_results(task.folder)
        trained[f"{arm}-s{seed}"] = {
            "argv": task.argv,
            "folder": str(task.folder),
            "final": {name: final[name] for name in (*keep, "train_loss", "train_runtime") if name in final},
            "loss_history": loss_history(task.folder),
        }
        last = measured[arm][str(seed)].get(str(args.steps))
        if last is not None:  # the checkpoint of the last step, evaluated again: the run's own end-of-run figures?
            checks[f"{arm}-s{seed}"] = {name: abs(last[name] - final[name]) for name in METRICS if name in final}
    pre = read_results(pretrain.folder) if pretrain.state in ("done", "reused") else None
    return {
        "measured": measured,
        "summary": table,
        "runs": trained,
        "pretraining": {
            "argv": pretrain.argv,
            "folder": str(pretrain.folder),
            "results_on_easy_vqa_test": pre,
            "loss_history": loss_history(pretrain.folder),
        },
        "checks": {
            "last_checkpoint_minus_end_of_run (absolute)": checks,
            "note": "each run evaluates its final model itself (all_results.json of the run); the evaluation of its "
            "last checkpoint through --init_from must give the same figures",
        },
    }


def plot(table: dict, measured: dict, seeds, recipe: dict, path: Path) -> None:
    """One panel per metric: mean over the seeds ± standard error per arm against the step, each seed as a dot."""
    panels = (
        ("eval_vqa_accuracy", "test accuracy (%)", 1.0),
        ("ood_auroc_fitting", "AUROC, fitting vs not-fitting facts", 1.0),
        ("ood_kept_fraction_fitting", "kept fitting facts (%)", 100.0),
        ("ood_kept_fraction_not_fitting", "kept not-fitting facts (%)", 100.0),
    )
    colours = {"scratch": "tab:blue", "warm": "tab:orange", "warm_new_classifier": "tab:green"}
    forcing = recipe.get("ood_gate_forcing_steps", 0)
    handover = recipe.get("ood_gate_handover_steps", 0)
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for axis, (metric, title, scale) in zip(axes.flat, panels):
        if forcing:
            axis.axvspan(0, forcing, color="0.9", zorder=0)
        if handover:
            axis.axvspan(forcing, forcing + handover, color="0.96", zorder=0)
        for arm in table:
            steps = sorted(int(s) for s in table.get(arm, {}) if metric in table[arm][s])
            if not steps:
                continue
            means = [table[arm][str(s)][metric]["mean"] * scale for s in steps]
            errors = [table[arm][str(s)][metric]["sem"] * scale for s in steps]
            axis.errorbar(steps, means, yerr=errors, color=colours[arm], marker="o", capsize=4, label=ARM_LABELS[arm])
            axis.fill_between(
                steps,
                [m - e for m, e in zip(means, errors)],
                [m + e for m, e in zip(means, errors)],
                color=colours[arm],
                alpha=0.15,
                linewidth=0,
            )
            for seed in seeds:
                points = [(int(s), row[metric] * scale) for s, row in measured[arm][str(seed)].items() if metric in row]
                if points:
                    axis.plot(*zip(*sorted(points)), ".", color=colours[arm], alpha=0.5, markersize=5)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8, loc="lower right")  # the AUROC panel is empty there once the layer separates
    figure.suptitle(
        f"knowledge-VQA, mean ± s.e. over seeds {', '.join(map(str, seeds))} (dots: each seed); "
        f"grey: gate forced (0-{forcing}), light grey: hand-over (to {forcing + handover}); "
        "the evaluations always use the learnt gate",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43], help="knowledge-VQA seeds, both arms")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500, help="knowledge-VQA steps (the recipe's 1,500)")
    parser.add_argument("--pretrain-steps", type=int, default=1500, help="easy-VQA pre-training steps")
    parser.add_argument("--save-steps", type=int, default=250, help="a checkpoint (and an evaluation) every N steps")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="smoke tests only: cap every evaluation")
    parser.add_argument("--jobs", type=int, default=2, help="train.py processes at a time")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP/MKL threads per process (default: CPUs / --jobs)"
    )
    parser.add_argument("--progress-seconds", type=float, default=60.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vkood_warm_start"), help="models, evaluations, logs")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "warm_start")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    args.work, args.out = args.work.resolve(), args.out.resolve()
    if args.work.is_relative_to(REPO_ROOT):
        parser.error("--work holds the checkpoints (gigabytes): keep it outside the repository")
    record = provenance.begin(args, argv=None if argv is None else [__file__, *argv])
    started = time.perf_counter()
    recipe = yaml.safe_load((REPO_ROOT / CONFIG).read_text())
    easy_vqa = knowledge_free_easy_vqa(args.work)
    pretrain, runs, evaluations = plan(args, easy_vqa)
    tasks = [pretrain, *runs.values(), *evaluations.values()]
    log(f"{len(tasks)} train.py processes ({len(runs) + 1} trainings), {args.jobs} at a time, {args.threads} threads")
    run_all(tasks, args, recipe.get("logging_steps", 20))
    results = {
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "config": CONFIG,
            "knowledge_free_easy_vqa": json.loads((easy_vqa / "done.json").read_text()),
        },
        "metrics": METRICS,
        **collect(args, pretrain, runs, evaluations),
        "tasks": {
            t.name: {"state": t.state, **t.record, "log": str(args.work / "logs" / f"{t.name}.log")} for t in tasks
        },
        "seconds": time.perf_counter() - started,
        "tree_at_end": provenance.begin()["changed_files"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results["summary"], results["measured"], args.seeds, recipe, args.out / "warm_start.png")
    provenance.record(args.out, record, outputs=[args.out / "results.json", args.out / "warm_start.png"])
    failed = [t.name for t in tasks if t.state in ("failed", "skipped")]
    print(json.dumps({"summary": results["summary"], "checks": results["checks"], "failed": failed}, indent=2))
    if failed:
        log(f"did not finish: {failed}")
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
