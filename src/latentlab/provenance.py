"""Which code computed a saved result: a digest of latentlab's own source files.

Resumable state (training checkpoints, finished GAN and classifier runs, sweep
points, the generations of a collapse study) is reused only by the code that
wrote it. DVC reruns a stage when one of its source files changes; had the
stage then resumed a *finished* checkpoint of the old code, it would hand back
the old code's results as the new code's, silently. That happened: after an
engine change, `dvc repro` reran every training stage and each one returned its
previous run's weights from the checkpoint (found when a fresh clone's metrics
differed from the committed ones while the same clone's rerun matched).

The digest covers every ``*.py`` file of the package, by content (not mtime: a
fresh checkout of the same commit gives the same digest). It is deliberately
coarse: an edit anywhere in latentlab makes an interrupted run start afresh
rather than risk mixing two versions of the code in one result.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


def tree_digest(folder: Path) -> str:
    """SHA-256 over the relative path and content of every ``*.py`` file below ``folder``."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@functools.cache
def code_digest() -> str:
    """:func:`tree_digest` of the installed latentlab package (computed once per process, ~2 ms)."""
    return tree_digest(Path(__file__).resolve().parent)
