"""Hidden scratch folders for atomic builds, reclaimed after their builder died.

A build (knowledge index, dataset) writes into a hidden folder beside its output and renames the result into place
only when complete. SIGKILL, an out-of-memory kill or a power cut runs no cleanup, so such a folder would stay
forever. Each scratch folder is therefore held under an advisory lock (`flock` on the folder itself) for the life
of its build; the kernel drops the lock when the holder dies, however it dies. The next build of the same output
deletes the leftovers whose lock it can take (their builder is dead) and keeps those still locked (a live
concurrent build). Forked worker processes inherit the lock, so a folder stays protected while any of them runs.

Without `fcntl` (Windows) nothing can tell a dead builder from a live one, so leftovers are kept, never guessed at.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def _lock(path: Path, blocking: bool) -> int | None:
    """An open descriptor of the folder `path` holding its exclusive lock; None when held elsewhere or gone."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # gone, not a folder, a symbolic link, or not ours to open
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The lock is on the folder opened above; make sure `path` still names that folder (a cleaner may have
        # deleted it between our open and our lock) before trusting it.
        if os.path.samestat(os.fstat(descriptor), os.stat(path, follow_symlinks=False)):
            return descriptor
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(descriptor)
    return None


def remove_abandoned(parent: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Delete the scratch folders `parent/{prefix}*{suffix}` whose builder is dead; return what was deleted."""
    if fcntl is None or not parent.is_dir():
        return []
    removed = []
    for path in sorted(parent.iterdir()):
        if not (path.name.startswith(prefix) and path.name.endswith(suffix)) or len(path.name) <= len(prefix):
            continue
        descriptor = _lock(path, blocking=False)
        if descriptor is None:
            continue  # a live build holds it (or it is not a folder, or it just went)
        try:
            shutil.rmtree(path)
            removed.append(path)
        finally:
            os.close(descriptor)
    return removed


@contextmanager
def scratch_folder(parent: Path, prefix: str, suffix: str = "") -> Iterator[Path]:
    """A new, locked, private folder `parent/{prefix}XXXX{suffix}`, deleted on exit; dead builds' leftovers go first."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent, prefix, suffix)
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
        if fcntl is None:
            descriptor = None
            break
        # Blocking: if a concurrent cleaner took the fresh folder for a dead one, it has deleted it by the time we
        # get the lock, `_lock` sees that, and we start again with a new name.
        descriptor = _lock(path, blocking=True)
        if descriptor is not None:
            break
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if descriptor is not None:
            os.close(descriptor)
