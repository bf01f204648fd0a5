"""No head leaves a parameter unused in any configuration a shipped config or a documented option produces: each is
trained under torch DDP with find_unused_parameters=False on two real gloo processes (VQA with knowledge, without,
with knowledge in some batches only, with the gate off; the generative head; NLVR2; retrieval)."""

import pytest
import torch

from tests.utils.distributed_ddp_worker import SCENARIOS
from tests.utils.paths import REPO_ROOT
from tests.utils.processes import run_two_ranks


@pytest.mark.slow
@pytest.mark.distributed
def test_every_head_trains_under_ddp_without_unused_parameters(tmp_path):
    run_two_ranks(REPO_ROOT / "tests" / "utils" / "distributed_ddp_worker.py", str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(results) == list(SCENARIOS)
        for name, result in results.items():
            assert result == {"world_size": 2, "parameters_equal_rank_0": True}, (rank, name)
