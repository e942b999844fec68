"""How a command ends when it does not finish: each way in one line on stderr and an exit
status, never a traceback.

* a known fault (:class:`TLExtractError`, its parameters shown as flags, or a filesystem refusal
  the store knows): status 2;
* SIGINT or SIGTERM: what was running and what was kept, status 130 or 143. Finished batches
  and stages are on disk already (every write is atomic), so a rerun resumes;
* anything else is a bug: its traceback goes to a log file in the run directory (or the temp
  directory) and the line says where and how to report it; ``--debug`` also prints it. Status 1.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from tlextract.cli.options import flag_message
from tlextract.errors import Interrupted, TLExtractError
from tlextract.stages.common import first_line
from tlextract.store import fault_message, write_text

SIGNALS = (signal.SIGINT, signal.SIGTERM)
BUG_STATUS = 1
REPORT_TO = "the tlextract issue tracker"


def guarded(command: Callable[[], int], *, debug: bool, log_dirs: list[Path]) -> int:
    """``command()``'s exit status, or the status of how it ended (see the module docstring).
    ``log_dirs``: directories the command has reached so far (the last existing one receives a
    bug's traceback)."""
    with _signals_raise():
        try:
            return command()
        except TLExtractError as e:  # the library names its parameters, the user sees flags
            print(f"error: {one_line(flag_message(e))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or a KeyboardInterrupt from a library
            interrupt = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
            print(interrupted_line(interrupt, getattr(e, "where", "")), file=sys.stderr)
            return interrupt.exit_status
        except OSError as e:
            message = fault_message(e)
            if message is None:
                return _bug(e, debug, log_dirs)
            print(f"error: {one_line(message)}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - a bug: said in one line, traceback to a file
            return _bug(e, debug, log_dirs)


def one_line(message: str) -> str:
    """``message`` with control characters escaped: a name the user wrote with a newline or a
    carriage return in it (found by the fuzzer) must not split the line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def interrupted_line(e: Interrupted, where: str) -> str:
    name = "Ctrl-C (SIGINT)" if e.signum == signal.SIGINT else signal.Signals(e.signum).name
    return (
        f"interrupted by {name}{f' during {where}' if where else ''}: what finished is kept "
        "and no partial file is left; run the same command again to resume."
    )


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` while the block runs (main thread only,
    where Python delivers signals). Further signals while the first unwinds are ignored, so the
    cleanup it triggers (temporary files, the run lock) finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if not hit:
            hit.append(signum)
            raise Interrupted(signum)

    before = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, old in before.items():
            signal.signal(s, old)


def _bug(error: BaseException, debug: bool, log_dirs: list[Path]) -> int:
    text = "".join(traceback.format_exception(error))
    log = _write_log(text, [*reversed(log_dirs), Path(tempfile.gettempdir())])
    if debug:
        print(text, file=sys.stderr, end="")
    where = f"the full traceback is in {log}" if log else "the traceback could not be saved"
    print(
        f"error: a bug in tlextract ({first_line(error)}); {where}. Please report it to "
        f"{REPORT_TO} with that file and the command you ran (--debug shows the traceback here).",
        file=sys.stderr,
    )
    return BUG_STATUS


def _write_log(text: str, candidates: list[Path]) -> Path | None:
    """The traceback in the first of ``candidates`` that is a writable directory."""
    name = f"tlextract-bug-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    for directory in candidates:
        if not directory.is_dir():
            continue
        try:
            write_text(directory / name, text)
            return directory / name
        except (TLExtractError, OSError):
            continue
    return None
