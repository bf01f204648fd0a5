"""Where a benchmark's results come from: one `provenance.json` per results folder, written by the script itself.

    from benchmarks.provenance import begin, record

    run = begin(args)                   # at the start: commit, dirty tree, argv, parsed arguments, date, machine
    ...                                 # the study writes its files into `folder`
    record(folder, run, outputs=["study.json", "study.png"])

`folder/provenance.json` is `{"runs": [run, ...]}`, oldest first. A new run replaces the earlier runs whose outputs
it all rewrites; `extends=True` (a study completed in parts, such as `knowledge_task.py --extend`) keeps them, and
`inputs` names the files of the folder the run read back. Standard library only (the scripts import it before
anything else).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FILE_NAME = "provenance.json"


def _git(*arguments: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _jsonable(value):
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # Path, and anything else argparse may hold


def _machine() -> dict:
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    torch = sys.modules.get("torch")  # only when the script imported it: this module imports nothing heavy
    if torch is not None:
        machine["torch"] = torch.__version__
        machine["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            machine["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return machine


def _command(argv: list[str]) -> str:
    script = Path(argv[0]).resolve() if argv and argv[0] else None
    if script is not None and script.is_relative_to(REPO_ROOT):
        return shlex.join(["python", str(script.relative_to(REPO_ROOT)), *argv[1:]])
    return shlex.join(["python", *argv])


def begin(args=None, argv: list[str] | None = None) -> dict:
    """This run's record as it starts: `git rev-parse HEAD`, whether tracked files differ from it (and which),
    `sys.argv` (or `argv`, for a `main(argv)` called from Python: the script's path first) and the command it makes,
    the parsed arguments (`argparse.Namespace` or a mapping), the date (UTC). Taken at the start, so that a commit
    made while a long study runs is not credited with its results."""
    argv = list(sys.argv if argv is None else argv)
    diff = _git("diff", "HEAD", "--name-only")  # tracked files that differ from HEAD, staged or not
    changed = diff.splitlines() if diff else []
    if args is not None and not isinstance(args, dict):
        args = vars(args)
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if diff is None else bool(changed),
        "changed_files": changed[:50] + ([f"... and {len(changed) - 50} more"] if len(changed) > 50 else []),
        "command": _command(argv),
        "argv": argv,
        "arguments": _jsonable(args) if args is not None else None,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def record(folder, run: dict, outputs, inputs=(), extends: bool = False, **extra) -> Path:
    """Add `run` (from `begin`) to `folder/provenance.json` with the files it wrote (`outputs`) and read back
    (`inputs`), both relative to `folder`, the finishing date, the machine and any `extra` fields (e.g. seconds)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def relative(paths):
        """Names within `folder` of paths given absolute, relative to the working directory, or relative to `folder`."""
        located = (p if p.is_absolute() or p.exists() else folder / p for p in map(Path, paths))
        return sorted({str(path.resolve().relative_to(folder.resolve())) for path in located})

    entry = {
        **run,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "outputs": relative(outputs),
        "inputs": relative(inputs),
        "extends_earlier_runs": extends,
        **_jsonable(extra),
    }
    path = folder / FILE_NAME
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    if not extends:  # an earlier run whose every output this one rewrote describes nothing left in the folder
        runs = [old for old in runs if not set(old.get("outputs", [])) <= set(entry["outputs"])]
    path.write_text(json.dumps({"runs": [*runs, entry]}, indent=2) + "\n")
    return path
