"""Text that reaches a terminal or a log: first lines of errors, escaped names, the CLIs' usage error."""
from __future__ import annotations

import os

import click

# Characters that would end or rewrite a line of output (C0 controls, DEL, Unicode line breaks), as escapes
LINE_BREAKING = {c: repr(chr(c))[1:-1] for c in [*range(32), 0x7F, 0x85, 0x2028, 0x2029]}
DISTRIBUTION = "digitlens"  # the installed package's name, for --version
USAGE = 2  # exit status of a bad command line, as click's


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def shown(name: str | bytes | os.PathLike) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 appear escaped, e.g. '\\xff'."""
    name = os.fsdecode(name)
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        raw = name.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """`text` with every character that would break or rewrite its line escaped, e.g. '\\n', '\\x1b'."""
    return text.translate(LINE_BREAKING)


class BadUsage(click.ClickException):
    """A bad command line, model or option value of a user-facing command: reported as the one line
    'Error: ...' (no usage text, unlike click.UsageError), exit status USAGE."""

    exit_code = USAGE

    def __init__(self, message: str):
        super().__init__(one_line(shown(message)))
