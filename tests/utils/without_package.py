"""A runner for "package not installed" subprocesses."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Python prelude that makes `import modeling_vkood` (and the other project packages) impossible, so that a
# subprocess proves the Hub remote-code path works for a user who never installed this package.
_BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"modeling_vkood", "data_scripts", "hub_cards"}:
                raise ImportError(f"{name} is blocked: this process plays a user without the vkood package")
            return None
    sys.meta_path.insert(0, _Block())
    sys.path = [p for p in sys.path if p not in ("", ".")]
    """
)


def run_without_package(code: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python where the project packages cannot be imported; raise with its output on failure."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCK_PACKAGE + textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return proc
