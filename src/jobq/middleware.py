"""Middleware: code of your own around every run of a handler and around every enqueue.

A middleware is an object with either or both of two async hooks, each given what it wraps and
a `call_next` that runs the rest of the chain:

    class Timing(jobq.Middleware):
        async def run(self, ctx: JobContext, call_next: CallNext) -> Any:
            started = time.monotonic()
            try:
                return await call_next()          # the next middleware, then the handler
            finally:
                observe(ctx.kind, time.monotonic() - started)

        async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[UUID]:
            return await call_next(jobs)          # may hand on changed jobs

A plain `async def f(ctx, call_next)` given to `Registry.use` is a run middleware.

The sync enqueues (`jobq.txn.enqueue_sync`, `enqueue_many_sync`, on a sync driver's
connection) cannot await: they run a third hook, `enqueue_sync(jobs, call_next)`, the same as
`enqueue` without `await`. A middleware with an `enqueue` hook and no `enqueue_sync` makes a
sync enqueue raise TypeError before anything is stored, rather than be skipped; one with
`enqueue_sync` only is refused when it is added (the async enqueues could not run it).

Where they apply: a registry's middleware (`Registry.use`) around the runs of a worker started
with it, and around the enqueues of an API started with it (`--app`); a `Queue`'s
(`Queue(pool, middleware=[...])`) around its enqueues; a process-wide one (`install`, what
`jobq.otel.instrument()` uses) around both, everywhere in the process, outermost. The first
registered is the outermost.

What a run's outcome is: whatever the whole chain returns or raises, exactly as if the handler
had. A middleware that raises before or after `call_next` fails the attempt like a handler
that raised (it is retried with backoff until its attempts are spent, the error recorded); one
that swallows the handler's exception and returns makes the job succeed with what it returned.
A job is never lost and its lease never leaked by a middleware: every outcome is written by
the worker as for a handler; the result of a run whose lease was lost meanwhile is discarded.
Let `asyncio.CancelledError` through: it is how the worker stops a run (hard cancel,
shutdown, lost lease). `call_next` may be awaited once: a second call raises, so a handler
never runs twice in one attempt.

Run hooks run on the worker's event loop, also around sync (`def`) handlers: the handler's
thread sees the context variables the middleware set (structured-log context, the current
span). Blocking work in a middleware blocks the worker; use `asyncio.to_thread` for it.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

if TYPE_CHECKING:
    from jobq.queue.model import NewJob
    from jobq.registry import JobContext

CallNext: TypeAlias = Callable[[], Awaitable[Any]]
EnqueueNext: TypeAlias = Callable[["list[NewJob]"], Awaitable[list[uuid.UUID]]]
EnqueueNextSync: TypeAlias = Callable[["list[NewJob]"], list[uuid.UUID]]
RunFunction: TypeAlias = Callable[["JobContext", CallNext], Awaitable[Any]]


class Middleware:
    """Hooks around runs and enqueues; override either. The defaults pass through."""

    async def run(self, ctx: JobContext, call_next: CallNext) -> Any:
        """Around one attempt of a job: return (or raise) the attempt's outcome."""
        return await call_next()

    async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[uuid.UUID]:
        """Around one enqueue (of one job or many): `call_next(jobs)` stores them and returns
        their ids in order. It may be given changed jobs (`dataclasses.replace`), as many as
        it was handed; it must be called, or the enqueue raises."""
        return await call_next(jobs)

    def enqueue_sync(self, jobs: list[NewJob], call_next: EnqueueNextSync) -> list[uuid.UUID]:
        """`enqueue` for the sync enqueues (`jobq.txn.enqueue_sync`): override it too when
        you override `enqueue`, or those raise TypeError rather than skip your hook."""
        return call_next(jobs)


class _RunFunction(Middleware):
    def __init__(self, fn: RunFunction) -> None:
        self.fn = fn

    async def run(self, ctx: JobContext, call_next: CallNext) -> Any:
        return await self.fn(ctx, call_next)

    def __repr__(self) -> str:
        return f"<run middleware {getattr(self.fn, '__qualname__', self.fn)!r}>"


def as_middleware(obj: Middleware | RunFunction) -> Middleware:
    """A `Middleware`, or an `async def f(ctx, call_next)` as a run middleware; else TypeError
    (at registration, not at the first job)."""
    if isinstance(obj, Middleware):
        if _overrides(obj, "enqueue_sync") and not _overrides(obj, "enqueue"):
            raise TypeError(
                f"{obj!r} has an enqueue_sync hook and no async enqueue hook: Queue.enqueue,"
                " jobq.txn.enqueue and POST /jobs could not run it; define both"
            )
        return obj
    if isinstance(obj, type):
        raise TypeError(f"{obj.__name__} is a class: pass an instance, {obj.__name__}()")
    if not inspect.iscoroutinefunction(obj) and not inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 (an async callable object)
    ):
        raise TypeError(
            f"middleware must be a jobq.Middleware or an async function (ctx, call_next), "
            f"got {obj!r}"
        )
    try:
        inspect.signature(obj).bind(None, None)
    except TypeError:
        raise TypeError(f"middleware {obj!r} must take two parameters, (ctx, call_next)") from None
    return _RunFunction(obj)


# Process-wide middleware, outermost everywhere: `install` replaces the tuple, so a chain
# built from it (a worker's, at start) does not change under a running worker.
_installed: tuple[Middleware, ...] = ()


def _original(mw: Middleware) -> object:
    """What the caller passed: the function a run middleware was made from."""
    return mw.fn if isinstance(mw, _RunFunction) else mw


def install(middleware: Middleware | RunFunction) -> None:
    """Add a middleware to every worker started and every enqueue made in this process from
    now on, outside those of registries and queues. Installing one twice does nothing."""
    global _installed
    if all(middleware not in (m, _original(m)) for m in _installed):
        _installed = (*_installed, as_middleware(middleware))


def uninstall(middleware: Middleware | RunFunction) -> None:
    global _installed
    _installed = tuple(m for m in _installed if middleware not in (m, _original(m)))


def installed() -> tuple[Middleware, ...]:
    return _installed


def _overrides(mw: Middleware, hook: str) -> bool:
    return getattr(type(mw), hook) is not getattr(Middleware, hook)


RunChain: TypeAlias = Callable[["JobContext", CallNext], Awaitable[Any]]
EnqueueChain: TypeAlias = Callable[["list[NewJob]", EnqueueNext], Awaitable[list[uuid.UUID]]]


class _Once:
    """`call_next`: runs the rest of the chain, once. Returns the awaitable itself (no frame of
    its own): a chain costs each job about one call per middleware."""

    __slots__ = ("_call", "_called")

    def __init__(self, call: Callable[[], Awaitable[Any]]) -> None:
        self._call = call
        self._called = False

    def __call__(self) -> Awaitable[Any]:
        if self._called:
            raise RuntimeError("call_next was already called: a handler runs once per attempt")
        self._called = True
        return self._call()


def run_chain(middleware: Sequence[Middleware]) -> RunChain | None:
    """The run hooks of `middleware` (outermost first) as one function; None when none has one,
    so that a worker without middleware calls its handlers directly."""
    hooks = tuple(m.run for m in middleware if _overrides(m, "run"))
    if not hooks:
        return None
    outer, *inner = hooks
    inner.reverse()

    async def chain(ctx: JobContext, innermost: CallNext) -> Any:
        call_next = _Once(innermost)
        for hook in inner:
            call_next = _Once(functools.partial(hook, ctx, call_next))
        return await outer(ctx, call_next)

    return chain


def enqueue_chain(own: Sequence[Middleware]) -> EnqueueChain | None:
    """The enqueue hooks of the process-wide middleware, then `own`'s; None when none has one."""
    if not own and not _installed:
        return None
    hooks = tuple(m.enqueue for m in (*_installed, *own) if _overrides(m, "enqueue"))
    if not hooks:
        return None

    async def chain(jobs: list[NewJob], innermost: EnqueueNext) -> list[uuid.UUID]:
        count = len(jobs)
        called = [False] * (len(hooks) + 1)

        def step(i: int) -> EnqueueNext:
            async def call_next(changed: list[NewJob]) -> list[uuid.UUID]:
                if called[i]:
                    raise RuntimeError("call_next was already called: jobs are stored once")
                called[i] = True
                changed = _handed_on(changed, count)
                if i == len(hooks):
                    return await innermost(changed)
                return await hooks[i](changed, step(i + 1))

            return call_next

        ids = await step(0)(list(jobs))
        if not called[-1]:
            raise RuntimeError("an enqueue middleware returned without calling call_next")
        return ids

    return chain


SyncHook: TypeAlias = Callable[["list[NewJob]", EnqueueNextSync], list[uuid.UUID]]


def _sync_hooks(middleware: Sequence[Middleware]) -> tuple[SyncHook, ...]:
    hooks = []
    for mw in middleware:
        if _overrides(mw, "enqueue_sync"):
            hooks.append(mw.enqueue_sync)
        elif _overrides(mw, "enqueue"):
            # Skipping it would store jobs it was meant to see (spans, tags, checks) unseen.
            raise TypeError(
                f"the enqueue middleware {_original(mw)!r} has no enqueue_sync hook, so a sync"
                " enqueue (jobq.txn.enqueue_sync, enqueue_many_sync) cannot run it: give it"
                " one, or enqueue with the async forms; nothing was stored"
            )
    return tuple(hooks)


def _handed_on(changed: Sequence[NewJob], count: int) -> list[NewJob]:
    changed = list(changed)
    if len(changed) != count:
        raise ValueError(f"an enqueue middleware handed on {len(changed)} job(s) for {count}")
    return changed


R = TypeVar("R")


def around_enqueue_sync(
    own: Sequence[Middleware],
    jobs: Sequence[NewJob],
    store: Callable[[list[NewJob]], tuple[R, list[uuid.UUID]]],
) -> R:
    """`around_enqueue` for the sync enqueues: the `enqueue_sync` hooks; TypeError, before
    `store` runs, when a middleware has only an async `enqueue` hook."""
    if not own and not _installed:
        return store(list(jobs))[0]
    hooks = _sync_hooks((*_installed, *own))
    if not hooks:
        return store(list(jobs))[0]
    count = len(jobs)
    called = [False] * (len(hooks) + 1)
    stored: list[R] = []

    def step(i: int) -> EnqueueNextSync:
        def call_next(changed: list[NewJob]) -> list[uuid.UUID]:
            if called[i]:
                raise RuntimeError("call_next was already called: jobs are stored once")
            called[i] = True
            changed = _handed_on(changed, count)
            if i < len(hooks):
                return hooks[i](changed, step(i + 1))
            value, ids = store(changed)
            stored.append(value)
            return ids

        return call_next

    step(0)(list(jobs))
    if not called[-1]:
        raise RuntimeError("an enqueue middleware returned without calling call_next")
    return stored[0]


async def around_enqueue(
    own: Sequence[Middleware],
    jobs: Sequence[NewJob],
    store: Callable[[list[NewJob]], Awaitable[tuple[R, list[uuid.UUID]]]],
) -> R:
    """Run `store` (which returns what the enqueue returns, and the ids) inside the enqueue
    hooks of the process-wide middleware and `own` (directly when there are none): the
    caller gets what was stored, whatever a middleware returns."""
    chain = enqueue_chain(own)
    if chain is None:
        return (await store(list(jobs)))[0]
    stored: list[R] = []

    async def innermost(changed: list[NewJob]) -> list[uuid.UUID]:
        value, ids = await store(changed)
        stored.append(value)
        return ids

    await chain(list(jobs), innermost)
    return stored[0]
