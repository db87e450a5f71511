"""latentlab.provenance: the digest that ties resumable state to the code that wrote it."""

from __future__ import annotations

import os
from pathlib import Path

import latentlab
from latentlab.provenance import code_digest, tree_digest


def _tree(root: Path) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\n")
    (root / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (root / "pkg" / "notes.txt").write_text("not code\n")
    return root / "pkg"


def test_digest_follows_content_not_mtime_or_other_files(tmp_path):
    pkg = _tree(tmp_path)
    first = tree_digest(pkg)
    assert first == tree_digest(pkg)
    # A fresh checkout of the same code: new mtimes, same digest.
    os.utime(pkg / "a.py", (0, 0))
    (pkg / "notes.txt").write_text("edited, but not code\n")
    (pkg / "data.json").write_text("{}")
    assert tree_digest(pkg) == first
    # Any code edit, however small, is another digest.
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    edited = tree_digest(pkg)
    assert edited != first
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    assert tree_digest(pkg) == first


def test_a_moved_or_added_module_changes_the_digest(tmp_path):
    pkg = _tree(tmp_path)
    first = tree_digest(pkg)
    (pkg / "sub" / "b.py").rename(pkg / "b.py")  # same bytes, another module
    moved = tree_digest(pkg)
    (pkg / "c.py").write_text("")
    assert len({first, moved, tree_digest(pkg)}) == 3


def test_code_digest_is_the_installed_package_tree():
    package = Path(latentlab.__file__).resolve().parent
    assert code_digest() == tree_digest(package)
    assert len(code_digest()) == 64
