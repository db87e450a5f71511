"""Write outputs so that a failure never leaves a half-written file or folder.

Everything is written to a temporary sibling first and renamed into place only
when complete; ``os.replace`` is atomic on one filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``target`` on success.

    The temporary file keeps ``target``'s suffix so that libraries that choose a
    format by extension (numpy, matplotlib) write the right thing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the usual mode under the umask.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces folder ``target`` on success.

    On failure the temporary folder is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj: Any, target: str | Path) -> None:
    """Atomically ``torch.save`` ``obj`` to ``target``: the same content gives the same bytes.

    ``torch.save`` to a path names the zip archive's root folder after the file; saved under
    a random temporary name, equal weights would give files (and DVC hashes, and the digests
    that key saved state) that differ on every run. Saved through a file object, the root
    is always ``archive``.
    """
    import torch  # lazily: most users of this module write text, JSON or arrays

    with atomic_path(target) as tmp, open(tmp, "wb") as stream:
        torch.save(obj, stream)


def write_text(target: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths: the usual things that reach a manifest.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
