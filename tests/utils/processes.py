"""Child processes of the tests: a free TCP port, a module run with the repository's Python, two torchrun ranks."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.utils.paths import REPO_ROOT


def free_port() -> int:
    """A free TCP port for a rendezvous or a server: other test runs on this machine may hold the default ones."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_module(*arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...` in the repository root; raise with its output when it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{arguments} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def run_two_ranks(worker: Path, *arguments: str, timeout: int = 600) -> None:
    """`worker ARGS...` on two gloo processes started by torchrun (one thread each); raise with its output on
    failure. The worker writes what the test checks."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(worker), *arguments]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
