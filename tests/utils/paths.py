"""Where the repository and the real official reference files are."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Real official files (small real splits): next to the checkout, or at the project's fixed place for other clones.
REFDATA = next(
    (path for path in (REPO_ROOT.parent / "shared" / "refdata", Path("/work/shared/refdata")) if path.is_dir()), None
)
