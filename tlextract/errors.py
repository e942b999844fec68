"""The one exception type users see: a message that names the file or setting and the fix; and
the interrupt the CLI raises on SIGINT and SIGTERM, which names what was running as it passes."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class TLExtractError(Exception):
    """A user-facing error. The CLI prints its message and exits with status 2.

    ``parameters``: the arguments the message names, by their Python names (the message starts
    with one, or writes ``name=value``; ``name="value"`` is a value to pass). The library never
    names a command-line flag: the CLI shows each of these as its flag (``tlextract.cli.options``).
    """

    def __init__(self, message: str = "", *, parameters: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.parameters = parameters


def first_line(e: BaseException) -> str:
    """An exception's first line (its type's name when it has no message): a library's
    multi-line message inside one of ours."""
    return next(iter(str(e).splitlines()), type(e).__name__)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread by the CLI's handler. A KeyboardInterrupt,
    so whatever cleans up after Ctrl-C (atomic writes, the run lock) does so for SIGTERM too.
    ``where`` is filled in by the innermost :func:`during` it passes through."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.where = ""

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended (130, 143)."""
        return 128 + self.signum


@contextmanager
def during(what: str | Callable[[], str]) -> Iterator[None]:
    """Name what runs in the block if an :class:`Interrupted` passes through (the innermost
    name wins; a callable is read at that moment, e.g. to count the batches finished)."""
    try:
        yield
    except Interrupted as e:
        e.where = e.where or (what() if callable(what) else what)
        raise
