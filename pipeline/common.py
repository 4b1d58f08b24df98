"""What the stages share: the pipeline's error type, atomic writes (digitlens.files), one-line stage errors and text
tables."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from digitlens.files import atomic_path
from digitlens.text import first_line, one_line, shown


class PipelineError(Exception):
    """An expected failure (bad params, bad data, bad file) reported as one line, no traceback."""


class Stopped(BaseException):
    """SIGTERM or SIGINT, raised where the stage is, so that its clean-ups run (no `except Exception` takes it)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


@contextlib.contextmanager
def stops_deferred():
    """Hold SIGTERM and SIGINT back while a clean-up runs (a stop signal arriving in the middle of one would leave
    half of what it removes), then raise Stopped for the first that came. In the main thread, as stage_command."""
    caught = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:
        raise_stopped(caught[0], None)


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
    """Turn PipelineError, and an OSError of the file system (disk full, no permission, a name too long), into
    click's one-line 'Error: ...' (line breaks in file names escaped) and exit status 1; SIGTERM and SIGINT into
    Stopped, raised where the stage is (its clean-ups run), then 'Error: stopped by SIGTERM; nothing written' and
    the shell's status for the signal (128 + its number)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = {signum: signal.signal(signum, raise_stopped) for signum in STOP_SIGNALS}
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            raise click.ClickException(one_line(shown(str(e)))) from None
        except OSError as e:
            where = f"{shown(e.filename)}: " if e.filename else ""
            raise click.ClickException(one_line(f"{where}{e.strerror or first_line(e)}; nothing written")) from None
        except Stopped as e:
            click.echo(f"Error: stopped by {e}; nothing written", err=True)
            sys.exit(128 + signal.Signals[str(e)])
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    return wrapper


def table(rows: list[dict], columns: list[str], markdown: bool = False) -> str:
    """Rows (dicts) as an aligned text table, or a Markdown one; missing cells are blank."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    if markdown:
        return "\n".join("| " + " | ".join(v) + " |" for v in [columns, ["---"] * len(columns), *cells]) + "\n"
    widths = [max(len(c), *(len(v[i]) for v in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)]) + "\n"
