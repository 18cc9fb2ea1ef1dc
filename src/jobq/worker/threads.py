"""Threads for sync (`def`) handlers.

A sync handler runs in a daemon thread of the worker's own, one per slot. A thread cannot be
interrupted, so a sync run keeps its slot and its lease until its function returns: a timeout, a
cancel or a lost lease can only abandon a call that has not begun, and otherwise waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any


class SyncCall:
    """One call of a sync handler, handed to a handler thread.

    `started` resolves (with the monotonic start time) when a thread begins the call, `done`
    with its outcome. A call not yet begun can be abandoned; once begun, it runs to the end.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any):
        self._loop = loop
        self._fn = fn
        self._args = args
        # The caller's context variables (what a middleware set: log context, the current
        # span) are the handler's too, as for an async handler.
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()
        self._begun = False
        self._abandoned = False
        self._returned = False
        self.started: asyncio.Future[float] = loop.create_future()
        self.done: asyncio.Future[Any] = loop.create_future()
        # Nobody may be waiting any more (the worker stopped): do not warn about it.
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def thread_alive(self) -> bool:
        """True while a thread is inside the handler function."""
        return self._begun and not self._returned

    def abandon(self) -> bool:
        """Make sure the call never begins; False when a thread is already running it."""
        with self._lock:
            if not self._begun:
                self._abandoned = True
            return self._abandoned

    def run(self) -> None:
        """In a handler thread."""
        with self._lock:
            if self._abandoned:
                return
            self._begun = True
        self._notify(self.started, time.monotonic(), None)
        try:
            result = self._context.run(self._fn, *self._args)
        except BaseException as exc:
            self._returned = True
            # asyncio futures refuse StopIteration, and SystemExit must not end the worker.
            if isinstance(exc, StopIteration) or not isinstance(exc, Exception):
                wrapped = RuntimeError(f"handler raised {type(exc).__name__}: {exc}")
                wrapped.__cause__ = exc
                exc = wrapped
            self._notify(self.done, None, exc)
        else:
            self._returned = True
            self._notify(self.done, result, None)

    def _notify(self, fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody to tell
            self._loop.call_soon_threadsafe(settle)


class HandlerThreads:
    """Threads for sync handlers, at most `size`, started as needed.

    Daemon threads, unlike a ThreadPoolExecutor's: a thread cannot be interrupted, and the
    interpreter joins non-daemon threads at exit, so one handler that never returns would hold
    the process past its shutdown deadline.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._calls: SimpleQueue[SyncCall | None] = SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def submit(self, call: SyncCall) -> None:
        self._calls.put(call)
        if self._idle.acquire(blocking=False):
            return
        with self._lock:
            if len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work, name=f"jobq-handler-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def shutdown(self) -> None:
        """Let idle threads end; busy ones end with their call (or with the process)."""
        for _ in self._threads:
            self._calls.put(None)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            call.run()
            self._idle.release()
