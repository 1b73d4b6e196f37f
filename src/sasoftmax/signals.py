"""Stopping cleanly on SIGINT/SIGTERM, and worker processes that end with their parent.

The trainer defers the signals with :class:`DeferredSignals` (it finishes the step, saves a checkpoint and
raises :class:`Interrupted`); ``compare`` turns SIGTERM into :class:`Interrupted` at once with
:func:`raising_signals` so that it can stop its workers; a worker calls :func:`watch_parent` so that it stops
(SIGTERM to itself, so a training run saves its checkpoint) when its parent dies, even by ``kill -9``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A command stopped by ``signum``; its exit code is 128 + signum (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class DeferredSignals:
    """While entered (in the main thread), SIGINT and SIGTERM only set :attr:`received` (the first one's
    number); a second SIGINT raises KeyboardInterrupt at once, other repeats are ignored. Elsewhere than the
    main thread it does nothing (Python delivers signals to the main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


@contextlib.contextmanager
def raising_signals() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` (SIGINT raises KeyboardInterrupt as usual) while entered in the main
    thread, so that ``finally`` blocks and cleanups run instead of the process vanishing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Interrupted(signum, f"stopped by {signal_name(signum)}")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def watch_parent(parent: int, grace_s: float = 60.0, poll_s: float = 0.5) -> threading.Thread:
    """Start a daemon thread that, once the process's parent ``parent`` is gone (the process is re-parented),
    sends SIGTERM to this process and, if it is still alive ``grace_s`` later, ends it with exit code 143."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=watch, name="sasoftmax-watch-parent", daemon=True)
    thread.start()
    return thread
