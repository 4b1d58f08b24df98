"""What the stages share: the pipeline's error type, atomic writes, one-line stage errors and text tables."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click


class PipelineError(Exception):
    """An expected failure (bad params, bad data, bad file) reported as one line, no traceback."""


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


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Valid JSON only: a NaN or infinity is a PipelineError, not a file others cannot parse."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        raise PipelineError(f"{path}: a value is not finite (NaN or infinity); nothing written") from None
    write_text(path, text + "\n")


def stage_command(fn: Callable) -> Callable:
    """Turn PipelineError into click's one-line 'Error: ...' and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def table(rows: list[dict], columns: list[str], markdown: bool = False) -> str:
    """Rows (dicts) as an aligned text table, or a Markdown one; missing cells are blank."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    if markdown:
        return "\n".join("| " + " | ".join(v) + " |" for v in [columns, ["---"] * len(columns), *cells]) + "\n"
    widths = [max(len(c), *(len(v[i]) for v in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)]) + "\n"
