"""No head leaves a parameter unused in any configuration a shipped config or a documented option produces: each is
trained under torch DDP with find_unused_parameters=False on two real gloo processes (VQA with knowledge, without,
with knowledge in some batches only, with the gate off; the generative head; NLVR2; retrieval)."""

import os
import subprocess
import sys

import pytest
import torch

from tests.test_retrieval_distributed import free_port
from tests.utils.distributed_ddp_worker import SCENARIOS
from tests.utils.paths import REPO_ROOT


@pytest.mark.slow
@pytest.mark.distributed
def test_every_head_trains_under_ddp_without_unused_parameters(tmp_path):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO_ROOT / "tests" / "utils" / "distributed_ddp_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(results) == list(SCENARIOS)
        for name, result in results.items():
            assert result == {"world_size": 2, "parameters_equal_rank_0": True}, (rank, name)
