"""Handlers: what code runs for each job kind, and what a handler sees (`JobContext`)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
import types
import typing
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, overload

import pydantic

from jobq.backoff import Backoff
from jobq.middleware import Middleware, RunFunction, as_middleware
from jobq.periodic import DEFAULT_CATCH_UP, Schedule
from jobq.queue import DEFAULT_QUEUE, InvalidJob, Limits, NewJob, validate
from jobq.queue.progress import check_progress
from jobq.queue.unique import UniqueSpec, unique_spec
from jobq.queue.validation import check_concurrency_key

HandlerFn = Callable[..., Any]
M = typing.TypeVar("M", bound="Middleware | RunFunction")
# A job's concurrency key from its payload: a function, the name of a payload field, or the
# names down to a nested field. A field (or path) is also stored with the limits and derived by
# the database at every insert; a function applies only where the registry is (new_job, an
# API or CLI given it).
KeyFn = Callable[[dict[str, Any]], object] | str | tuple[str, ...]
MAX_KEY_PATH = 16


def key_path_of(source: object, where: str) -> tuple[str, ...] | None:
    """The payload path a `concurrency_key=` declaration names (None for a function), or
    TypeError."""
    if callable(source):
        return None
    path = (source,) if isinstance(source, str) else source
    if (
        not isinstance(path, tuple)
        or not 1 <= len(path) <= MAX_KEY_PATH
        or not all(isinstance(p, str) and 1 <= len(p) <= 255 for p in path)
    ):
        raise TypeError(
            f"{where}: concurrency_key must be a function of the payload, the name of a payload"
            f" field, or a tuple of 1 to {MAX_KEY_PATH} names down to a nested field, got"
            f" {source!r}"
        )
    return path


class KeyUnusable(InvalidJob):
    """The concurrency key a handler derives from a payload cannot be used. `path`: the
    payload field it was read from (empty when a function derived it), where an API reports
    it: the client sent that field, not a `concurrency_key`."""

    def __init__(self, message: str, path: tuple[str, ...] = ()) -> None:
        super().__init__("concurrency_key", message)
        self.path = path


class KeyConflict(InvalidJob):
    """A concurrency key given at enqueue differs from the one the handler derives from the
    payload: it would put the job under another key's limits. `derived`: the handler's key."""

    def __init__(self, derived: str) -> None:
        super().__init__(
            "concurrency_key", f"conflicts with the key derived from payload ({derived!r})"
        )
        self.derived = derived


class JobCancelled(Exception):
    """Raised inside a handler (by `ctx.raise_if_cancelled()`) to stop for a cancel request."""


class Snooze(Exception):
    """Raised inside a handler to run the job again `seconds` from now without counting an
    attempt: the job waits (`queued`, or `retrying` after earlier failures) with its `run_at`
    moved, and its lease is released. `ctx.snooze(seconds)` raises it."""

    def __init__(self, seconds: float) -> None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or not 0 <= seconds <= MAX_SNOOZE_SECONDS
        ):
            raise ValueError(
                f"snooze seconds must be a number from 0 to {MAX_SNOOZE_SECONDS}, got {seconds!r}"
            )
        super().__init__(f"snoozed for {seconds}s")
        self.seconds = float(seconds)


# A year: a longer wait is a mistake more likely than a plan.
MAX_SNOOZE_SECONDS = 366 * 24 * 3600


class PayloadInvalid(ValueError):
    """The payload does not fit the handler's declared model."""

    def __init__(self, kind: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"payload for {kind!r} is invalid: {errors}")
        self.kind = kind
        self.errors = errors


class JobContext:
    """What a running handler knows about its job, and how it hears about cancellation."""

    def __init__(
        self,
        *,
        id: uuid.UUID,
        kind: str,
        queue: str,
        attempt: int,
        max_attempts: int,
        worker_id: str,
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        self.id = id
        self.kind = kind
        self.queue = queue
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.worker_id = worker_id
        # Where the job was enqueued from (jobq.otel): the propagation fields, or None.
        self.trace_context = trace_context
        # A plain flag, set once on the event loop: reading it from a thread-pool thread (a
        # sync handler) is safe. The event is made only for a handler that waits on it: one
        # context per job, so what it costs is paid on every job.
        self._cancel_flag = False
        self._cancelled: asyncio.Event | None = None
        # The latest progress reported, and whether the worker was told of it since it last
        # took it: a handler reporting in a tight loop costs a tuple per call, the worker
        # writes at most a few times a second (jobq.worker.progress).
        self._progress: tuple[float, str | None] | None = None
        self._progress_noted = False
        self._progress_sink: Callable[[JobContext], None] | None = None

    @property
    def cancelled(self) -> bool:
        """True once a cancel request for this job has reached the worker."""
        return self._cancel_flag

    async def wait_cancelled(self) -> None:
        """Return when a cancel request arrives."""
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
            if self._cancel_flag:
                self._cancelled.set()
        await self._cancelled.wait()

    def raise_if_cancelled(self) -> None:
        """Stop here if cancellation was requested: the job then ends `cancelled`."""
        if self._cancel_flag:
            raise JobCancelled(f"job {self.id} cancelled on request")

    def snooze(self, seconds: float) -> typing.NoReturn:
        """Stop here and run the job again `seconds` from now, without counting this attempt
        (raises `Snooze`)."""
        raise Snooze(seconds)

    async def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the job is: `fraction` from 0 to 1, and an optional message (at most
        1,000 characters). Stored on the job (coalesced: the latest report is written, at most
        a few times a second), shown by `GET /jobs/{id}` and the dashboard, and wakes
        `?wait=...&until=progress`. ValueError for a fraction outside [0, 1] or NaN."""
        self.set_progress(fraction, message)

    def set_progress(self, fraction: float, message: str | None = None) -> None:
        """`progress` for sync handlers: callable from any thread, returns at once."""
        self._progress = check_progress(fraction, message)
        if not self._progress_noted and self._progress_sink is not None:
            self._progress_noted = True
            self._progress_sink(self)

    def _request_cancel(self) -> None:
        self._cancel_flag = True
        if self._cancelled is not None:
            self._cancelled.set()


@dataclass(frozen=True)
class Handler:
    kind: str
    fn: HandlerFn
    is_async: bool
    payload_model: type[pydantic.BaseModel] | None
    max_attempts: int | None
    timeout: float | None
    # Per-handler retry bounds; None takes the worker's configured bound.
    retry_base_seconds: float | None = None
    retry_cap_seconds: float | None = None
    # Flow control (docs/flow-control.md): limits on this kind, and where its key comes from.
    limits: Limits = dataclasses.field(default_factory=Limits)
    concurrency_key: KeyFn | None = None
    # Every enqueue of this kind is a unique job (jobq.queue.unique) unless it says otherwise.
    unique: UniqueSpec | None = None

    def key_of(self, payload: dict[str, Any]) -> str | None:
        """The concurrency key of a job of this kind with this payload, from the handler's
        `concurrency_key`; None when it declares none or the payload has none. KeyUnusable
        when it derives a value that is no key."""
        source = self.concurrency_key
        if source is None:
            return None
        path: tuple[str, ...] = ()
        try:
            if callable(source):
                key = source(payload)
            else:
                path = (source,) if isinstance(source, str) else source
                key = payload
                for name in path:
                    key = key.get(name) if isinstance(key, dict) else None
        except Exception as exc:
            raise KeyUnusable(f"the handler's concurrency_key function failed: {exc!r}") from None
        if key is None:
            return None
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise KeyUnusable(
                f"must come out a string or an integer, got {type(key).__name__}", path
            )
        try:
            return check_concurrency_key(str(key))
        except InvalidJob as exc:
            raise KeyUnusable(exc.message, path) from None

    def job_key(self, payload: dict[str, Any], given: str | None) -> str | None:
        """The concurrency key an enqueue from outside (HTTP, the CLI) gives a job: the one
        derived from the payload, or the one given if the same. A given key that differs is
        refused (KeyConflict), not silently preferred; one given where none can be derived
        stands, as there is nothing for it to conflict with. KeyUnusable when none is given
        and the derived one is no key."""
        try:
            derived = self.key_of(payload)
        except KeyUnusable:
            if given is not None:
                return given
            raise
        if given is not None and derived is not None and derived != given:
            raise KeyConflict(derived)
        return derived if given is None else given

    def backoff_with(self, configured: Backoff) -> Backoff:
        """This handler's backoff: its own bounds, the configured ones where it sets none."""
        base = configured.base if self.retry_base_seconds is None else self.retry_base_seconds
        cap = configured.cap if self.retry_cap_seconds is None else self.retry_cap_seconds
        try:
            return Backoff(base, cap)
        except ValueError as exc:
            raise ValueError(f"handler {self.kind!r}: {exc} (a bound it does not set is the "
                             f"configured one: base {configured.base}s, cap {configured.cap}s)"
                             ) from None  # fmt: skip

    def parse_payload(self, payload: dict[str, Any]) -> Any:
        """The value handed to the handler: a model instance, or the dict as it is."""
        if self.payload_model is None:
            return payload
        try:
            return self.payload_model.model_validate(payload)
        except pydantic.ValidationError as exc:
            errors = [
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            raise PayloadInvalid(self.kind, errors) from None

    def payload_schema(self) -> dict[str, Any]:
        if self.payload_model is None:
            return {"type": "object", "additionalProperties": True}
        return self.payload_model.model_json_schema()

    def call(
        self, ctx: JobContext, payload: Any, executor: Executor | None = None
    ) -> Awaitable[Any]:
        if self.is_async:
            return typing.cast(Awaitable[Any], self.fn(ctx, payload))
        # Sync handlers must not block the event loop.
        return asyncio.get_running_loop().run_in_executor(executor, self.fn, ctx, payload)


def _check_schedule_payload(schedule: Schedule, handler: Handler) -> None:
    """A schedule's payload must fit its handler's model now, not fail every tick's job."""
    try:
        handler.parse_payload(dict(schedule.payload))
    except PayloadInvalid as exc:
        raise ValueError(f"schedule {schedule.name!r}: {exc}") from None


def _payload_model(fn: HandlerFn, localns: dict[str, Any]) -> type[pydantic.BaseModel] | None:
    """The model the annotation of the payload parameter names; None for a dict, Any or no
    annotation. Raises TypeError for anything else, so no payload goes unvalidated by mistake."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in _POSITIONAL]
    if len(positional) < 2:
        return None
    name = positional[1].name
    annotation = inspect.get_annotations(fn).get(name, inspect.Parameter.empty)
    if isinstance(annotation, str):
        # Postponed annotations: resolved here, with the names visible where the handler was
        # defined (a model defined inside a function is a local of that function).
        globalns = getattr(fn, "__globals__", {})
        try:
            annotation = eval(annotation, globalns, localns)  # the handler module's own code
        except Exception as exc:
            raise TypeError(
                f"handler {_name(fn)}: cannot resolve the payload annotation {annotation!r} "
                f"({type(exc).__name__}: {exc}); define the model where the handler can see it "
                "or pass payload=Model"
            ) from None
    return _model_from_hint(fn, annotation)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_AS_IS: tuple[object, ...] = (inspect.Parameter.empty, Any, object, dict, Mapping, MutableMapping)


def _model_from_hint(fn: HandlerFn, hint: object) -> type[pydantic.BaseModel] | None:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _model_from_hint(fn, typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        # Optional[M] and M | None: a payload is always a JSON object, never null.
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1:
            return _model_from_hint(fn, members[0])
    elif inspect.isclass(hint) and issubclass(hint, pydantic.BaseModel):
        return hint
    elif hint in _AS_IS or origin in _AS_IS:
        return None
    raise TypeError(
        f"handler {_name(fn)}: the payload annotation {hint!r} is not a pydantic model, a dict "
        "or Any; annotate with one of those or pass payload=Model"
    )


def _name(fn: HandlerFn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _check_callable(fn: HandlerFn) -> None:
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise TypeError(
            f"handler {_name(fn)} must take two positional parameters, (ctx, payload)"
        ) from None


def _check_seconds(name: str, value: float | None, *, positive: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


class Registry:
    """Maps job kinds to handlers.

    >>> registry = Registry()
    >>> @registry.handler("email.send", max_attempts=5, timeout=30)
    ... async def send_email(ctx: JobContext, payload: dict) -> dict | None: ...
    """

    def __init__(self, *, middleware: typing.Sequence[Middleware | RunFunction] = ()) -> None:
        self._handlers: dict[str, Handler] = {}
        self._queue_limits: dict[str, Limits] = {}
        self._schedules: dict[str, Schedule] = {}
        self._middleware: list[Middleware] = []
        for mw in middleware:
            self.use(mw)

    def use(self, middleware: M) -> M:
        """Add a middleware (see `jobq.middleware`): a `Middleware`, or an `async def f(ctx,
        call_next)` around every run (usable as a decorator). Runs of a worker started with
        this registry go through it, and enqueues of an API started with it. The first added
        is the outermost."""
        self._middleware.append(as_middleware(middleware))
        return middleware

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        return tuple(self._middleware)

    def queue(
        self,
        name: str,
        *,
        max_concurrency: int | None = None,
        max_per_key: int | None = None,
        rate_limit: str | None = None,
        rate_burst: int | None = None,
        fair: bool = False,
        concurrency_key: str | tuple[str, ...] | None = None,
        rate_limit_per_key: str | None = None,
        rate_burst_per_key: int | None = None,
        fair_weights: typing.Mapping[str, int] | None = None,
    ) -> None:
        """Declare limits for a queue, across every worker and host: running jobs at most
        (`max_concurrency`), per concurrency key (`max_per_key`), starts per second, minute or
        hour (`rate_limit="100/s"`, a bucket of `rate_burst` starts, default one second's
        worth), starts per concurrency key (`rate_limit_per_key="10/s"`, each key its own
        bucket of `rate_burst_per_key`), and fair share across keys (`fair=True`; a key
        with weight w in `fair_weights={"gold": 3}` gets w turns per round, others 1).
        Workers store them at start-up.

        `concurrency_key`: the payload field (or tuple of names down to a nested field) that
        gives the key of the queue's jobs enqueued without one, whatever their kind, unless
        their kind's handler declares its own; the database derives it at every insert."""
        validate(NewJob(kind="k", queue=name))
        if name in self._queue_limits:
            raise ValueError(f"limits for queue {name!r} are already declared")
        limits = Limits.declare(
            max_concurrency=max_concurrency,
            max_per_key=max_per_key,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
            fair=fair,
            rate_limit_per_key=rate_limit_per_key,
            rate_burst_per_key=rate_burst_per_key,
            fair_weights=fair_weights,
        )
        if concurrency_key is not None:
            if callable(concurrency_key):
                raise TypeError(
                    f"queue {name!r}: concurrency_key must name a payload field (a function"
                    " belongs to a handler)"
                )
            path = key_path_of(concurrency_key, f"queue {name!r}")
            limits = dataclasses.replace(limits, key_path=path)
        self._queue_limits[name] = limits

    @property
    def queue_limits(self) -> dict[str, Limits]:
        """The limits declared per queue."""
        return dict(self._queue_limits)

    @property
    def unique_defaults(self) -> dict[str, UniqueSpec]:
        """The kinds whose handlers declare `unique_for`, with what makes them unique: pass it
        to `Queue(pool, unique=...)` for `Queue.enqueue` to apply it."""
        return {h.kind: h.unique for h in self._handlers.values() if h.unique is not None}

    @property
    def kind_limits(self) -> dict[str, Limits]:
        """The limits each handler declares for its kind (an empty Limits: none)."""
        return {h.kind: h.limits for h in self._handlers.values()}

    def new_job(self, kind: str, payload: dict[str, Any] | None = None, **fields: Any) -> NewJob:
        """A `NewJob` of a registered kind, its concurrency key taken from the payload by
        the handler's `concurrency_key` unless given."""
        payload = {} if payload is None else payload
        if "concurrency_key" not in fields:
            fields["concurrency_key"] = self[kind].key_of(payload)
        return NewJob(kind=kind, payload=payload, **fields)

    def handler(
        self,
        kind: str,
        *,
        max_attempts: int | None = None,
        timeout: float | None = None,
        retry_base_seconds: float | None = None,
        retry_cap_seconds: float | None = None,
        payload: type[pydantic.BaseModel] | None = None,
        max_concurrency: int | None = None,
        concurrency_key: KeyFn | None = None,
        max_per_key: int | None = None,
        rate_limit: str | None = None,
        rate_burst: int | None = None,
        unique_for: timedelta | None = None,
        unique_by: typing.Sequence[str] | None = None,
        unique_states: typing.Sequence[str] | None = None,
        rate_limit_per_key: str | None = None,
        rate_burst_per_key: int | None = None,
    ) -> Callable[[HandlerFn], HandlerFn]:
        """Register `fn(ctx, payload)` for `kind`. The payload model comes from `payload=`
        or from the annotation of the function's second parameter.

        Flow control, across every worker and host (docs/flow-control.md): at most
        `max_concurrency` jobs of this kind run at once, at most `max_per_key` per
        concurrency key, and they start no faster than `rate_limit` ("100/s", "30/min",
        "1000/h"; a bucket of `rate_burst` starts, default one second's worth) and, per
        concurrency key, no faster than `rate_limit_per_key` (each key its own bucket of
        `rate_burst_per_key`).

        `concurrency_key`: where a job's key comes from when it is enqueued without one. A
        payload field's name (or a tuple of names down to a nested field) is stored with the
        limits and derived by the database at every insert, however the job is enqueued; a
        function of the payload applies only where this registry is (`new_job`, an API or
        `jobq enqueue --app` given it).

        `unique_for` (with `unique_by`, `unique_states`, as for `Queue.enqueue`): every
        enqueue of this kind that gives no unique options and no idempotency key is a unique
        job, where this registry is: `POST /jobs` of an API started with it, and
        `Queue.enqueue` of a `Queue(pool, unique=registry.unique_defaults)`. A batch refuses
        the kind (InvalidJob; 422 over HTTP): unique jobs are enqueued one at a time."""
        # The queue's own rules for a kind: a handler for a kind no job can have would never run.
        validate(NewJob(kind=kind))
        if kind in self._handlers:
            raise ValueError(f"a handler for {kind!r} is already registered")
        _check_seconds("timeout", timeout, positive=True)
        _check_seconds("retry_base_seconds", retry_base_seconds, positive=False)
        _check_seconds("retry_cap_seconds", retry_cap_seconds, positive=False)
        if payload is not None and not (
            inspect.isclass(payload) and issubclass(payload, pydantic.BaseModel)
        ):
            raise TypeError(f"payload= must be a pydantic model class, got {payload!r}")
        if max_attempts is not None and not 1 <= max_attempts <= 1000:
            raise ValueError("max_attempts must be between 1 and 1000")
        for name, bound in (("retry_base_seconds", retry_base_seconds),
                            ("retry_cap_seconds", retry_cap_seconds)):  # fmt: skip
            if bound is not None and not bound > 0:
                raise ValueError(f"{name} must be > 0, got {bound}")
        if (
            retry_base_seconds is not None
            and retry_cap_seconds is not None
            and retry_cap_seconds < retry_base_seconds
        ):
            raise ValueError("retry_cap_seconds must be >= retry_base_seconds")
        try:
            limits = Limits.declare(
                max_concurrency=max_concurrency,
                max_per_key=max_per_key,
                rate_limit=rate_limit,
                rate_burst=rate_burst,
                rate_limit_per_key=rate_limit_per_key,
                rate_burst_per_key=rate_burst_per_key,
            )
        except ValueError as exc:
            raise ValueError(f"handler {kind!r}: {exc}") from None
        if concurrency_key is not None:
            path = key_path_of(concurrency_key, f"handler {kind!r}")
            limits = dataclasses.replace(limits, key_path=path)
        unique = None
        if unique_for is not None or unique_by is not None or unique_states is not None:
            try:
                unique = unique_spec(unique_for, unique_by, unique_states)
            except InvalidJob as exc:
                raise ValueError(f"handler {kind!r}: {exc.field} {exc.message}") from None

        def register(fn: HandlerFn) -> HandlerFn:
            _check_callable(fn)
            # The caller's frame is where the handler was defined: its locals resolve postponed
            # annotations that name a model defined in the same function.
            caller = inspect.currentframe()
            localns = dict(caller.f_back.f_locals) if caller and caller.f_back else {}
            del caller
            model = payload or _payload_model(fn, localns)
            if kind in self._handlers:
                raise ValueError(f"a handler for {kind!r} is already registered")
            handler = Handler(
                kind=kind,
                fn=fn,
                is_async=inspect.iscoroutinefunction(fn),
                payload_model=model,
                max_attempts=max_attempts,
                timeout=timeout,
                retry_base_seconds=retry_base_seconds,
                retry_cap_seconds=retry_cap_seconds,
                limits=limits,
                concurrency_key=concurrency_key,
                unique=unique,
            )
            for schedule in self._schedules.values():
                if schedule.kind == kind:
                    _check_schedule_payload(schedule, handler)
            self._handlers[kind] = handler
            return fn

        return register

    @overload
    def periodic(
        self,
        cron: str | None = None,
        *,
        kind: str,
        every: timedelta | None = None,
        tz: str | None = None,
        payload: Mapping[str, Any] | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int | None = None,
        catch_up: timedelta = DEFAULT_CATCH_UP,
        name: str | None = None,
    ) -> Schedule: ...

    @overload
    def periodic(
        self,
        cron: str | None = None,
        *,
        kind: None = None,
        every: timedelta | None = None,
        tz: str | None = None,
        payload: Mapping[str, Any] | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int | None = None,
        catch_up: timedelta = DEFAULT_CATCH_UP,
        name: str | None = None,
    ) -> Callable[[HandlerFn], HandlerFn]: ...

    def periodic(
        self,
        cron: str | None = None,
        *,
        kind: str | None = None,
        every: timedelta | None = None,
        tz: str | None = None,
        payload: Mapping[str, Any] | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int | None = None,
        catch_up: timedelta = DEFAULT_CATCH_UP,
        name: str | None = None,
    ) -> Schedule | Callable[[HandlerFn], HandlerFn]:
        """Enqueue a `kind` job at each tick of a 5-field `cron` expression (in time zone `tz`,
        default UTC) or `every` interval (ticks at multiples of it since the Unix epoch): one
        job per tick, whatever the number of workers (see docs/scheduling.md). A tick found
        late (every worker was down) is still enqueued within `catch_up`; only the latest
        tick is. `name` (default: the kind) identifies the schedule across deploys.

        With `kind=`, the schedule is registered at once and returned. Without it, this is a
        decorator over a handler registered with `@registry.handler` (place it above), whose
        kind it takes. A mistake (a bad expression, an unknown zone) is a ValueError here."""

        if payload is not None and not isinstance(payload, Mapping):
            raise ValueError(
                f"schedule {name or kind or 'of this handler'!r}: payload must be a mapping"
                f" (a JSON object), got {type(payload).__name__}"
            )

        def register(k: str) -> Schedule:
            schedule = Schedule(
                name=k if name is None else name,
                kind=k,
                cron=cron,
                every=every,
                tz=tz,
                payload=dict(payload or {}),
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                catch_up=catch_up,
            )
            if schedule.name in self._schedules:
                raise ValueError(
                    f"a schedule named {schedule.name!r} is already registered; give each"
                    " schedule of one kind its own name="
                )
            if k in self._handlers:
                _check_schedule_payload(schedule, self._handlers[k])
            self._schedules[schedule.name] = schedule
            return schedule

        if kind is not None:
            return register(kind)
        # Checked now, not when the decorator is applied: the mistake is on this line.
        Schedule(name="check" if name is None else name, kind="check", cron=cron, every=every,
                 tz=tz, payload=dict(payload or {}), queue=queue, priority=priority,
                 max_attempts=max_attempts, catch_up=catch_up)  # fmt: skip

        def decorate(fn: HandlerFn) -> HandlerFn:
            handlers = [h for h in self._handlers.values() if h.fn is fn]
            if not handlers:
                raise TypeError(
                    f"@registry.periodic on {_name(fn)}: the function is not a registered"
                    " handler; place @registry.periodic above @registry.handler, or pass kind="
                )
            register(handlers[0].kind)
            return fn

        return decorate

    @property
    def schedules(self) -> list[Schedule]:
        """The periodic schedules declared, by name."""
        return [self._schedules[n] for n in sorted(self._schedules)]

    @property
    def queues(self) -> list[str]:
        """The queues a worker of this registry works unless told otherwise: the default
        queue, and every queue it declares limits for or schedules jobs into."""
        named = set(self._queue_limits) | {s.queue for s in self._schedules.values()}
        return [DEFAULT_QUEUE, *sorted(named - {DEFAULT_QUEUE})]

    def __contains__(self, kind: object) -> bool:
        return kind in self._handlers

    def __getitem__(self, kind: str) -> Handler:
        return self._handlers[kind]

    def __iter__(self) -> Iterator[Handler]:
        return iter(self._handlers.values())

    def __len__(self) -> int:
        return len(self._handlers)

    @property
    def kinds(self) -> list[str]:
        return sorted(self._handlers)
