"""Files and folders written whole or not at all: a temporary one beside the target, renamed over it on success."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process's umask (reading it means setting it, briefly to the strictest common value)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp made it 0600; the file gets the mode any other would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def own_folder(path: str | os.PathLike) -> Path:
    """`path` as a Path; ValueError if replacing it would delete the working folder (`.`, `..`, '', one above)."""
    path = Path(path)
    if path.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ValueError(f"{path}: the working folder or one above it; give a folder of its own to write")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (and whatever was there), on error it
    is removed: the folder appears whole or not at all. The old one is renamed aside before the new one takes its
    name, and only then deleted."""
    path = own_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name[:64]}.", dir=path.parent))
    old = staging.with_name(staging.name + ".old")
    try:
        staging.chmod(0o777 & ~umask())  # mkdtemp made it 0700; the folder gets the mode any other would
        yield staging
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists() or old.is_symlink():
            old.unlink()
