"""SIGTERM and SIGHUP handled like SIGINT, and what a command had written when one came.

SIGINT raises KeyboardInterrupt, which unwinds the ``with CheckpointWriter(...)``
blocks so that their staging folders are removed. ``timeout``, Kubernetes, Slurm and
``docker stop`` send SIGTERM, a closed terminal SIGHUP: ``handled()`` (installed by the
command line around one command, never by the library) turns those into
``Terminated``, a BaseException like KeyboardInterrupt, so the same clean-up runs and
the CLI exits 128 + the signal's number (143 for SIGTERM, 129 for SIGHUP, 130 for SIGINT).
A signal its parent process ignores (``nohup``, a background job's SIGINT) stays ignored.
Only the first signal raises; clean-up is not interrupted by a second one.

The ``modelgrow`` process itself (``for_process()``) keeps the handler installed from
start to exit, so that a signal outside a command is answered the same way: before the
command starts it stops the process with 128 + its number and "nothing was written"
(never click's "Aborted!" and exit 1), and once the command has finished, with all
its outputs in place, a late signal is ignored: the process is already on its way out
and its exit status tells the truth about a completed command. Before the command, the
process exits at once (``os._exit``) rather than raising: it has nothing to clean up,
and an exception raised inside an import can be swallowed by the library being imported
(or leave it half-imported), so that the command would run on as if no signal had come.

The same can happen to a signal raised during a command, so a swallowed one is raised
again: ``check()`` before every commit and report, and when the command's block ends.

The registry says what a command has published, so that the message after a signal is
true: an engine wraps each commit in ``committing(path)``, which holds a signal back
while the rename runs and records ``path`` once it is in place; ``expect(path)``
declares an output the command means to write, so that the message can also say what
was not written. Library callers may use both; without ``handled()`` they only record.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class Terminated(BaseException):
    """SIGTERM or SIGHUP (or SIGINT before a command) arrived: unwind, then exit 128 + signum."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"terminated by {SIGNAL_NAMES.get(self.signum, self.signum)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(exc: BaseException) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    if isinstance(exc, Terminated):
        return exc.exit_code
    return 128 + signal.SIGINT  # KeyboardInterrupt


class _Run:
    """What the running command has published and still means to publish."""

    def __init__(self) -> None:
        self.committed: list[str] = []
        self.expected: list[str] = []
        self.defer = 0  # depth of committing() blocks: a signal waits for their end
        self.pending: int | None = None
        self.raised = False  # only the first signal raises; clean-up runs undisturbed
        self.signum: int | None = None  # the signal that raised, for check()
        self.running = False  # inside handled(): unwind the command
        self.done = False  # handled() has ended: a late signal changes nothing


_run = _Run()
_lock = threading.Lock()


def reset() -> None:
    """Forget what an earlier command recorded (the CLI calls this before each command)."""
    global _run
    with _lock:
        _run = _Run()


def expect(*paths: str | Path | None) -> None:
    """Declare outputs this command means to write (None is skipped)."""
    with _lock:
        for p in paths:
            if p is not None and str(Path(p)) not in _run.expected:
                _run.expected.append(str(Path(p)))


def committed(path: str | Path) -> None:
    """Record that ``path`` is published (call right after its commit)."""
    with _lock:
        if str(Path(path)) not in _run.committed:
            _run.committed.append(str(Path(path)))


def written() -> list[str]:
    return list(_run.committed)


@contextmanager
def committing(path: str | Path) -> Iterator[None]:
    """Hold SIGTERM/SIGHUP/SIGINT back while ``path`` is moved into place; record it after.

    Use around the commit itself (renames and fsyncs, never a long computation): a signal
    that arrives meanwhile is raised as soon as the block ends, so the registry always
    agrees with what is on disk.
    """
    check()
    run = _run
    run.defer += 1
    try:
        yield
        committed(path)
    finally:
        run.defer -= 1
        if run.defer == 0 and run.pending is not None:
            signum, run.pending = run.pending, None
            _raise(signum)


def message(exc: BaseException) -> str:
    """The one line the CLI prints after a signal, true about what was written."""
    signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
    what = "interrupted" if signum == signal.SIGINT else f"terminated by {SIGNAL_NAMES.get(signum, signum)}"
    done = list(_run.committed)
    if not done:
        return f"{what}: nothing was written"
    missing = [p for p in _run.expected if p not in done]
    text = f"{what} after writing {', '.join(done)}"
    if missing:
        text += f"; {', '.join(missing)} {'was' if len(missing) == 1 else 'were'} not written"
    return text


def check() -> None:
    """Raise again a signal that arrived during the command and was swallowed on the way.

    Python raises a signal's exception wherever the main thread happens to be; a library
    that catches everything (some import fallbacks do) can swallow it and carry on. Call
    this before publishing anything: nothing is published after a signal.
    """
    run = _run
    if run.running and run.raised and run.pending is None and run.signum is not None:
        _raise(run.signum)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    run = _run
    if run.raised or run.done:
        return  # a second signal while cleaning up, or the command has finished
    if not run.running:  # before a command (for_process): nothing to clean up, exit now
        run.raised = True
        _exit_before_command(signum)
    run.raised, run.signum = True, signum
    if run.defer:
        run.pending = signum
        return
    _raise(signum)


def _exit_before_command(signum: int) -> None:
    what = Terminated(signum) if signum != signal.SIGINT else KeyboardInterrupt()
    try:
        sys.stderr.write(message(what) + "\n")
        sys.stderr.flush()
    finally:
        os._exit(exit_code(what))


@contextmanager
def handled(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)) -> Iterator[None]:
    """While the block runs, SIGTERM/SIGHUP raise Terminated and SIGINT KeyboardInterrupt.

    Signals that are ignored or handled by someone else stay so; the previous handlers are
    put back afterwards. Outside the main thread (where Python cannot install handlers)
    this does nothing.
    """
    reset()
    run = _run
    run.running = True
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _install(signums)
    try:
        try:
            yield
        except (KeyboardInterrupt, Terminated):
            raise
        except BaseException:
            check()  # a failure that follows a swallowed signal is reported as the signal
            raise
        check()
    finally:
        run.running, run.done = False, True
        for signum, old in previous.items():
            signal.signal(signum, old)


def for_process(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)) -> None:
    """Install the handler for the rest of this process (the ``modelgrow`` command itself)."""
    reset()
    _install(signums)


def _install(signums: tuple[int, ...]) -> dict:
    """Put the handler on each signal still at its default; return what it replaced."""
    previous = {}
    for signum in signums:
        current = signal.getsignal(signum)
        if current is signal.SIG_DFL or (signum == signal.SIGINT and current is signal.default_int_handler):
            previous[signum] = signal.signal(signum, _handler)
    return previous


__all__ = ["Terminated", "check", "committed", "committing", "exit_code", "expect", "for_process", "handled", "message", "reset", "written"]
