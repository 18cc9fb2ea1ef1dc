"""The `jobq` command: migrate, api, worker, dev, enqueue, enqueue-file, status, prune."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import orjson
import typer

from jobq import db, logs, schema, wire
from jobq.api.schemas import job_to_dict
from jobq.queue import (
    BulkEnqueued,
    IdempotencyConflict,
    InvalidJob,
    NewJob,
    Queue,
    TooManyPaused,
    history,
    validate,
)
from jobq.registry import KeyConflict, PayloadInvalid, Registry
from jobq.settings import Settings, SettingsError, parse_duration

log = logging.getLogger("jobq.cli")

app = typer.Typer(
    help="jobq: a job queue on PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

T = TypeVar("T")

# Exit codes: 1 the environment (database, schema, a bug), 2 what was asked (usage, input).
EXIT_ENVIRONMENT = 1
EXIT_INPUT = 2


class CommandError(Exception):
    """Ends a command with one line on stderr and an exit code, no traceback (see `main`)."""

    exit_code = EXIT_ENVIRONMENT


class InputError(CommandError):
    exit_code = EXIT_INPUT


def _fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    raise (InputError if code == EXIT_INPUT else CommandError)(message)


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        _fail(str(exc))
    logs.configure(settings.log_format, settings.log_level)
    return settings


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is not on every platform
        return asyncio.run(coro)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, for messages: host, port and database, never the password."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = parts.hostname or query.get("host", ["local socket"])[0]
        port = parts.port or query.get("port", [""])[0]
    except ValueError:
        return "the database in DATABASE_URL"
    name = parts.path.lstrip("/") or parts.username or "postgres"
    return f"{host}:{port}/{name}" if port else f"{host}/{name}"


def database_error(exc: BaseException, dsn: str) -> str | None:
    """One line saying what went wrong reaching the database and what to check, or None when
    `exc` is not about reaching it."""
    where = describe_dsn(dsn)
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError) or (
        type(exc) is ValueError and "invalid" in str(exc)
    ):
        return f"DATABASE_URL is not a usable PostgreSQL URL ({_one_line(exc)})"
    if isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
        return (
            f"the database at {where} refused the login ({_one_line(exc)}): check the user "
            "and password in DATABASE_URL"
        )
    if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
        return f"{_one_line(exc)} at {where}: check the database name in DATABASE_URL"
    if db.is_unavailable(exc):
        return (
            f"cannot reach the database at {where} ({_one_line(exc)}): check DATABASE_URL and "
            "that PostgreSQL is running and accepts connections"
        )
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        return f"the database at {where} refused the request: {_one_line(exc)}"
    return None


def _waitable(exc: BaseException) -> bool:
    """An outage worth waiting out, as opposed to a configuration nobody will fix by waiting."""
    return db.is_unavailable(exc) and not isinstance(
        exc, asyncpg.exceptions.ClientConfigurationError
    )


def load_registry(spec: str) -> Registry:
    """`module:attr` naming a Registry."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        _fail(f"expected MODULE:ATTR (e.g. myapp.jobs:registry), got {spec!r}")
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            _fail(f"no module named {module_name!r} (looked in the current directory too)")
        _fail(f"cannot import {module_name}: {_one_line(exc)}")
    except Exception as exc:
        # Registration errors land here: say where, in one line; where in the user's code,
        # not where in jobq's checks.
        frames = traceback.extract_tb(exc.__traceback__)
        own = os.path.dirname(os.path.abspath(__file__)) + os.sep
        frame = next(
            (f for f in reversed(frames)
             if not f.filename.startswith("<") and not os.path.abspath(f.filename).startswith(own)),
            frames[-1],
        )  # fmt: skip
        _fail(
            f"importing {module_name} failed at {os.path.relpath(frame.filename)}:{frame.lineno}: "
            f"{type(exc).__name__}: {_one_line(exc)}"
        )
    if not hasattr(module, attr):
        _fail(f"module {module_name} has no attribute {attr}")
    registry = getattr(module, attr)
    if not isinstance(registry, Registry):
        _fail(f"{spec} is not a jobq Registry (it is a {type(registry).__name__})")
    return registry


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[str]:
    try:
        with db.database(settings) as dsn:
            yield dsn
    except db.EmbeddedPostgresError as exc:
        _fail(_one_line(exc), EXIT_ENVIRONMENT)


def _run_against(dsn: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; what the queue or the database refuse is one line."""
    try:
        return _run(coro)
    except (InvalidJob, IdempotencyConflict) as exc:
        _fail(str(exc))
    except Exception as exc:
        message = database_error(exc, dsn)
        if message is None:
            raise
        _fail(message, EXIT_ENVIRONMENT)


async def _connect(
    dsn: str, *, wait: bool, stopping: asyncio.Event | None = None, waiting: str = ""
) -> asyncpg.Connection | None:
    """A connection to `dsn`. With `wait`, an outage is waited out: one warning line when it
    starts, one when it ends; None when `stopping` is set meanwhile."""
    delay = 0.5
    warned = False
    while True:
        try:
            conn = await db.connect(dsn)
        except Exception as exc:
            if not (wait and _waitable(exc)):
                raise
            if not warned:
                log.warning("%s; %s", database_error(exc, dsn), waiting or "retrying until it is")
                warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((stopping or asyncio.Event()).wait(), delay)
                return None
            delay = min(delay * 2, 5.0)
            continue
        if warned:
            log.warning("the database at %s is reachable again", describe_dsn(dsn))
        return conn


async def _check_schema(conn: asyncpg.Connection, *, migrate: bool) -> None:
    """Apply pending migrations (the embedded database), or refuse to run on a schema that
    lacks a pre-deploy step (pending post-deploy steps are fine: see `schema`)."""
    if migrate:
        await schema.migrate(conn)  # logs each migration it applies
        return
    done = await schema.applied(conn)
    missing = schema.pending_required(done)
    if missing:
        # With a post-deploy step pending, processes of the previous version may still run:
        # `--pre-deploy` applies what this version needs and nothing they rely on.
        post_deploy_pending = any(
            m.post_deploy and m.version not in done for m in schema.available()
        )
        command = "jobq migrate --pre-deploy" if post_deploy_pending else "jobq migrate"
        _fail(
            f"the database schema is not up to date ({len(missing)} migration(s) pending:"
            f" {', '.join(m.label for m in missing)}); run `{command}`",
            EXIT_ENVIRONMENT,
        )


async def _prepare(dsn: str, *, migrate: bool) -> None:
    conn = await _connect(dsn, wait=False)
    assert conn is not None
    try:
        await _check_schema(conn, migrate=migrate)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _queue(dsn: str, settings: Settings, *, max_size: int = 1) -> AsyncIterator[Queue]:
    pool = await db.create_pool(dsn, min_size=1, max_size=max_size)
    try:
        yield Queue(
            pool,
            default_max_attempts=settings.default_max_attempts,
            history_leaf_width=settings.history_leaf_width,
            idempotency_window=settings.idempotency_window,
        )
    finally:
        await pool.close()


def _on_signals(handler: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler)


@app.command()
def migrate(
    pre_deploy: Annotated[
        bool,
        typer.Option(
            "--pre-deploy",
            help="Apply only the pre-deploy steps: run this before deploying a new version,"
            " and `jobq migrate` once every process runs it.",
        ),
    ] = False,
    show_status: Annotated[
        bool,
        typer.Option("--status", help="Print each migration, its kind and whether it is applied."),
    ] = False,
) -> None:
    """Apply pending database migrations (docs/upgrade.md)."""
    settings = _settings()

    async def go(dsn: str) -> list[int]:
        conn = await _connect(dsn, wait=False)
        assert conn is not None
        try:
            done = await schema.applied(conn)
            steps = [
                m
                for m in schema.available()
                if m.version not in done and not (pre_deploy and m.post_deploy)
            ]
            total = len(steps)
            step = iter(range(1, total + 1))

            def progress(m: schema.Migration) -> None:
                typer.echo(f"[{next(step, total)}/{total}] applying {m.label} …")

            def notice(m: schema.Migration, message: str) -> None:
                typer.echo(f"      {message}")

            # A second connection holds the lock for steps that run outside a transaction:
            # sound through a transaction pooler too.
            return await schema.migrate(
                conn,
                progress=progress,
                connect=lambda: db.connect(dsn),
                pre_deploy=pre_deploy,
                notice=notice,
            )
        finally:
            await conn.close()

    with _database(settings) as dsn:
        if show_status:
            for m, done in _run_against(dsn, _status(dsn)):
                kind = "post-deploy" if m.post_deploy else "pre-deploy"
                typer.echo(f"{m.label:<32} {kind:<12} {'applied' if done else 'pending'}")
            return
        try:
            applied = _run_against(dsn, go(dsn))
        except schema.MigrationError as exc:
            _fail(str(exc), EXIT_ENVIRONMENT)
        typer.echo(f"applied {len(applied)} migration(s)" if applied else "schema is up to date")
        if pre_deploy:
            later = [m.label for m, done in _run_against(dsn, _status(dsn)) if not done]
            if later:
                typer.echo(
                    "left for once every process runs this version (`jobq migrate`):"
                    f" {', '.join(later)}"
                )


async def _status(dsn: str) -> list[tuple[schema.Migration, bool]]:
    conn = await _connect(dsn, wait=False)
    assert conn is not None
    try:
        return await schema.status(conn)
    finally:
        await conn.close()


def _uvicorn_server(asgi: Any, host: str, port: int) -> Any:
    from jobq.api import server as http_server

    # Signals are ours: the worker in the same process needs a graceful stop too.
    return http_server.uvicorn_server(asgi, host, port, asgi.state.settings)


def _warn_open(settings: Settings, host: str) -> None:
    if not settings.api_tokens and host not in {"127.0.0.1", "localhost", "::1"}:
        log.warning(
            "JOBQ_API_TOKENS is not set and the API listens on %s: anyone who can reach it "
            "can enqueue and cancel jobs",
            host,
        )


HOST = typer.Option(metavar="ADDRESS", help="Address to bind.")
PORT = typer.Option(envvar="PORT", metavar="PORT", help="Port to bind.")
APP = typer.Option(
    "--app", metavar="MODULE:ATTR", help="A Registry: check kinds and payloads as the API does."
)


@app.command()
def api(
    host: Annotated[str, HOST] = "127.0.0.1",
    port: Annotated[int, PORT] = 8000,
    app_spec: Annotated[str | None, APP] = None,
) -> None:
    """Serve the HTTP API. While the database is unreachable it serves anyway: /readyz and
    the job routes answer 503 with Retry-After until the database is back."""
    from jobq.api import create_app

    settings = _settings()
    registry = load_registry(app_spec) if app_spec else None
    _warn_open(settings, host)
    migrate_first = settings.database_url is None
    with _database(settings) as dsn:

        async def go() -> None:
            # Reachable now: a stale schema stops the API before it binds. Unreachable: serve
            # (not ready) and check the schema once the database is back.
            try:
                await _prepare(dsn, migrate=migrate_first)
                reachable = True
            except Exception as exc:
                if not _waitable(exc):
                    raise
                reachable = False
            server = _uvicorn_server(create_app(settings, dsn=dsn, registry=registry), host, port)
            stopping = asyncio.Event()
            failure: list[CommandError] = []

            def stop() -> None:
                server.should_exit = True
                stopping.set()

            async def check_when_reachable() -> None:
                conn = await _connect(
                    dsn,
                    wait=True,
                    stopping=stopping,
                    waiting="serving anyway: /readyz and job routes answer 503 until it is",
                )
                if conn is None:
                    return
                try:
                    await _check_schema(conn, migrate=migrate_first)
                except CommandError as exc:
                    failure.append(exc)
                    stop()
                finally:
                    await conn.close()

            _on_signals(stop)
            checker = None if reachable else asyncio.create_task(check_when_reachable())
            try:
                await server.serve()
            finally:
                if checker is not None:
                    checker.cancel()
                    await asyncio.gather(checker, return_exceptions=True)
            if failure:
                raise failure[0]

        _run_against(dsn, go())


def _queue_names(queues: str) -> list[str]:
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        _fail(f"--queues names no queue ({queues!r}); e.g. --queues default,mail")
    for name in names:
        try:
            validate(NewJob(kind="-", queue=name))
        except InvalidJob as exc:
            _fail(f"--queues: {name!r}: {exc.message}")
    return names


@app.command()
def worker(
    app_spec: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="The Registry to run.")],
    concurrency: Annotated[int, typer.Option(min=1, metavar="N", help="Jobs in flight.")] = 10,
    queues: Annotated[
        str | None,
        typer.Option(
            metavar="NAMES",
            help="Comma-separated queues to work (default: default, and every queue the "
            "registry declares limits for or schedules jobs into).",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(metavar="PORT", help="Serve Prometheus metrics on this port.")
    ] = None,
    shutdown_grace: Annotated[
        float,
        typer.Option(min=0, metavar="SECONDS", help="Time in-flight jobs get on SIGTERM."),
    ] = 30.0,
    pool_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            metavar="N",
            help="Most database connections of the worker's pool (default 4; 2 + concurrency/50 "
            "from concurrency 150, at most 10); the listener holds one more.",
        ),
    ] = None,
) -> None:
    """Run a worker. While the database is unreachable it waits (one log line), then starts."""
    from jobq.worker import Worker

    settings = _settings()
    registry = load_registry(app_spec)
    queue_names = None if queues is None else _queue_names(queues)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    with _database(settings) as dsn:

        async def go() -> None:
            stopping = asyncio.Event()
            _on_signals(stopping.set)
            conn = await _connect(dsn, wait=True, stopping=stopping)
            if conn is None:
                return  # stopped while waiting for the database
            try:
                await _check_schema(conn, migrate=settings.database_url is None)
            finally:
                await conn.close()
            w = Worker(
                dsn,
                registry,
                concurrency=concurrency,
                queues=queue_names,
                settings=settings,
                shutdown_grace=shutdown_grace,
                pool_size=pool_size,
            )
            # First signal: graceful stop. Second: no more grace.
            _on_signals(w.request_stop)
            if stopping.is_set():
                return
            # What start-up made (modules, the registry and what the app imported) lives as
            # long as the process: out of the collector's reach, each full collection walks
            # only what runs make, not the whole heap again (a no-op drain ~5 % faster).
            gc.collect()
            gc.freeze()
            await w.run()

        _run_against(dsn, go())


@app.command()
def dev(
    app_spec: Annotated[
        str, typer.Argument(metavar="[MODULE:ATTR]", help="The Registry to run.")
    ] = "jobq.examples:registry",
    host: Annotated[str, HOST] = "127.0.0.1",
    port: Annotated[int, PORT] = 8000,
    concurrency: Annotated[int, typer.Option(min=1, metavar="N", help="Jobs in flight.")] = 10,
) -> None:
    """Database, migrations, API and a worker in one process. Ctrl-C stops everything."""
    from jobq.api import create_app
    from jobq.worker import Worker

    settings = _settings()
    registry = load_registry(app_spec)
    _warn_open(settings, host)
    with _database(settings) as dsn:

        async def go() -> None:
            await _prepare(dsn, migrate=True)
            server = _uvicorn_server(create_app(settings, dsn=dsn, registry=registry), host, port)
            w = Worker(dsn, registry, concurrency=concurrency, settings=settings)

            def stop() -> None:
                server.should_exit = True
                w.request_stop()

            _on_signals(stop)
            worker_task = asyncio.create_task(w.run())
            base = f"http://{host}:{port}"
            where = (
                describe_dsn(dsn)
                if settings.database_url
                else f"embedded PostgreSQL in {settings.data_dir}/"
            )
            typer.echo(
                f"\njobq is running (Ctrl-C to stop)\n"
                f"  API       {base}/jobs\n"
                f"  docs      {base}/docs\n"
                f"  dashboard {base}/ui\n"
                f"  metrics   {base}/metrics\n"
                f"  worker    kinds: {', '.join(registry.kinds)}\n"
                f"  database  {where}\n"
            )
            try:
                await server.serve()
            finally:
                if not w.stopping:
                    w.request_stop()
                await worker_task

        _run_against(dsn, go())


def _parse_run_at(value: object, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(f"{where}: must be {wire.RFC3339_HINT}")
    try:
        return wire.parse_rfc3339(value)  # exactly what the API accepts
    except wire.WireError as exc:
        _fail(f"{where}: {exc.message}")


def _parse_json(text: str, what: str) -> Any:
    # The API's reading (jobq.wire): no duplicate keys, no number that would be rounded.
    try:
        return wire.loads(text, what=what)
    except wire.WireError as exc:
        if exc.column is not None:
            _fail(f"{what} is not JSON: {exc.reason} at column {exc.column}")
        _fail(exc.message)


def _check_with_registry(registry: Registry | None, job: NewJob, where: str) -> NewJob:
    """What the API checks with a registry: a known kind and a payload that fits it; and the
    job's concurrency key as the handler derives it (a conflicting one given is refused)."""
    if registry is None:
        return job
    if job.kind not in registry:
        _fail(f"{where}no handler for kind {job.kind!r}; known kinds: {', '.join(registry.kinds)}")
    handler = registry[job.kind]
    try:
        handler.parse_payload(job.payload)
    except PayloadInvalid as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors
        )
        _fail(f"{where}the payload does not fit {job.kind!r}: {problems}")
    try:
        key = handler.job_key(job.payload, job.concurrency_key)
    except KeyConflict as exc:
        _fail(f"{where}--concurrency-key {exc.message}")
    except InvalidJob as exc:
        _fail(f"{where}concurrency key: {exc.message}")
    return dataclasses.replace(job, concurrency_key=key)


@app.command()
def enqueue(
    kind: Annotated[str, typer.Argument(metavar="KIND", help="The job kind.")],
    payload: Annotated[str, typer.Option(metavar="JSON", help="A JSON object.")] = "{}",
    queue: Annotated[str, typer.Option(metavar="NAME")] = "default",
    priority: Annotated[int, typer.Option(metavar="N", help="Lower runs first.")] = 0,
    max_attempts: Annotated[int | None, typer.Option(metavar="N")] = None,
    run_at: Annotated[
        str | None,
        typer.Option(metavar="TIME", help="When the job is due: RFC 3339 with an offset."),
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option(metavar="KEY")] = None,
    concurrency_key: Annotated[
        str | None,
        typer.Option(metavar="KEY", help="Tenant or account: per-key limits and fair share."),
    ] = None,
    app_spec: Annotated[str | None, APP] = None,
) -> None:
    """Enqueue one job and print it as JSON."""
    settings = _settings()
    registry = load_registry(app_spec) if app_spec else None
    new = NewJob(
        kind=kind,
        payload=_parse_json(payload, "--payload"),
        queue=queue,
        priority=priority,
        max_attempts=max_attempts,
        run_at=_parse_run_at(run_at, "--run-at"),
        idempotency_key=idempotency_key,
        concurrency_key=concurrency_key,
    )
    try:
        validate(new)
    except InvalidJob as exc:
        what = "KIND" if exc.field == "kind" else f"--{exc.field.replace('_', '-')}"
        _fail(f"{what}: {exc.message}")
    new = _check_with_registry(registry, new, "")
    with _database(settings) as dsn:

        async def go() -> dict[str, Any]:
            await _prepare(dsn, migrate=settings.database_url is None)
            async with _queue(dsn, settings) as q:
                result = await q.enqueue(new)
            return job_to_dict(result.job)

        job = _run_against(dsn, go())
    typer.echo(orjson.dumps(job, option=orjson.OPT_INDENT_2).decode())


_ENQUEUE_FILE_HELP = 'JSON lines, one job a line: {"kind": ..., "payload": ...}; - reads stdin.'


def _read_jobs(lines: Iterable[bytes], registry: Registry | None) -> tuple[list[NewJob], list[int]]:
    """The jobs of a JSON-lines file, and the line number of each."""
    jobs: list[NewJob] = []
    numbers: list[int] = []
    for number, raw in enumerate(lines, start=1):
        # Decoded line by line, so that an error names the line it is on.
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(f"line {number} column {exc.start + 1}: not valid UTF-8")
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte order mark some editors write
        if not line.strip():
            continue
        job = _job_from_line(line.rstrip("\r\n"), number)
        job = _check_with_registry(registry, job, f"line {number}: ")
        jobs.append(job)
        numbers.append(number)
    return jobs, numbers


def _conflict_on_line(exc: IdempotencyConflict, numbers: list[int]) -> str:
    if exc.index is None:
        return str(exc)
    where = f"line {numbers[exc.index]}: idempotency key {exc.key!r}"
    if exc.first_index is not None:
        return f"{where} is also on line {numbers[exc.first_index]}, for a different job"
    return f"{where} was already used for job {exc.job_id} with a different request"


@app.command("enqueue-file")
def enqueue_file(
    path: Annotated[typer.FileBinaryRead, typer.Argument(metavar="FILE", help=_ENQUEUE_FILE_HELP)],
    batch_size: Annotated[
        int, typer.Option(min=1, max=10_000, metavar="N", help="Jobs per insert.")
    ] = 500,
    app_spec: Annotated[str | None, APP] = None,
) -> None:
    """Enqueue many jobs from a file, showing progress. All or nothing: every line is
    checked first, and every job is stored in one transaction, so nothing is stored when a
    line is invalid or an idempotency key conflicts, and re-running a fixed file is safe."""
    settings = _settings()
    registry = load_registry(app_spec) if app_spec else None
    jobs, numbers = _read_jobs(path, registry)
    with _database(settings) as dsn:

        async def go() -> list[BulkEnqueued]:
            await _prepare(dsn, migrate=settings.database_url is None)
            async with _queue(dsn, settings) as q:
                try:
                    if not sys.stderr.isatty():  # a log or a pipe gets the result line only
                        return await q.enqueue_all(jobs, batch_size=batch_size)
                    with typer.progressbar(
                        length=len(jobs), label="enqueueing", file=sys.stderr
                    ) as bar:
                        return await q.enqueue_all(jobs, batch_size=batch_size, on_batch=bar.update)
                except IdempotencyConflict as exc:
                    _fail(_conflict_on_line(exc, numbers))

        stored = _run_against(dsn, go())
    created = sum(s.created for s in stored)
    replayed = len(stored) - created
    typer.echo(
        f"enqueued {created} job(s)"
        + (f"; {replayed} already stored with the same idempotency key" if replayed else "")
    )


_JOB_FIELDS = {
    "kind", "payload", "queue", "priority", "max_attempts", "run_at", "idempotency_key",
    "concurrency_key",
}  # fmt: skip


def _job_from_line(line: str, number: int) -> NewJob:
    where = f"line {number}"
    try:
        obj = wire.loads(line, what=where)  # the API's reading: see _parse_json
    except wire.WireError as exc:
        if exc.column is not None:
            _fail(f"{where} column {exc.column}: not JSON: {exc.reason}")
        _fail(exc.message)
    if not isinstance(obj, dict):
        _fail(f"{where}: each line must be a JSON object")
    unknown = set(obj) - _JOB_FIELDS
    if unknown:
        _fail(f"{where}: unknown field(s): {', '.join(sorted(unknown))}")
    if "kind" not in obj:
        _fail(f"{where}: kind is required")
    job = NewJob(
        kind=obj["kind"],
        payload=obj.get("payload", {}),
        queue=obj.get("queue", "default"),
        priority=obj.get("priority", 0),
        max_attempts=obj.get("max_attempts"),
        run_at=_parse_run_at(obj.get("run_at"), f"{where}: run_at"),
        idempotency_key=obj.get("idempotency_key"),
        concurrency_key=obj.get("concurrency_key"),
    )
    try:
        validate(job)  # before anything is stored
    except (InvalidJob, TypeError) as exc:
        _fail(f"{where}: {exc}")
    return job


@app.command()
def status(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, metavar="SECONDS", help="Time between refreshes.")
    ] = 2.0,
) -> None:
    """Jobs by queue and status, the oldest due job, throughput, failing kinds, workers."""
    from jobq import stats

    settings = _settings()
    with _database(settings) as dsn:

        async def go() -> None:
            await _prepare(dsn, migrate=False)
            # One connection for each of the overview's concurrent queries.
            async with _queue(dsn, settings, max_size=6) as q:
                while True:
                    report = stats.render_text(await stats.collect(q))
                    if not watch:
                        typer.echo(report)
                        return
                    typer.echo("\x1b[H\x1b[2J" + report, nl=True)
                    await asyncio.sleep(interval)

        with contextlib.suppress(KeyboardInterrupt):
            _run_against(dsn, go())


# How long `jobq prune` waits for a pass of a worker's cleaner (or another prune) to end.
PRUNE_LOCK_WAIT_SECONDS = 60.0


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _prune_lines(report: history.Report) -> list[str]:
    dry = report.dry_run
    lines = []
    for removed in report.leaves:
        leaf = removed.leaf
        rows = f"~{removed.rows:,} rows (estimated)" if dry else f"{removed.rows:,} rows"
        what = ", ".join(leaf.statuses)
        lines.append(
            f"{'would remove' if dry else 'removed'} {leaf.name} ({what} finished "
            f"{_utc(leaf.lower)} to {_utc(leaf.upper)}): {rows}, {removed.bytes / 1e6:,.1f} MB"
        )
    for d in report.deleted:
        batches = f"in {d.batches} batch(es) of at most {history.BATCH_SIZE:,}"
        lines.append(
            f"{'would delete' if dry else 'deleted'} {d.rows:,} {'/'.join(d.statuses)} rows "
            f"finished before {_utc(d.horizon)} from {d.leaf.name}, {batches}"
        )
    if report.keys:
        lines.append(
            f"{'would remove' if dry else 'removed'} {report.keys:,} idempotency key(s) past "
            "their window whose job is gone"
        )
    total = f"{len(report.leaves)} leaf(s), {report.rows:,} row(s), {report.bytes / 1e6:,.1f} MB"
    if dry:
        lines.append(f"dry run: would remove {total}; nothing was changed")
    else:
        lines.append(f"removed {total}" if report.removed_anything else "nothing to remove")
    return lines


@app.command()
def prune(
    older_than: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Remove jobs that finished longer ago than this (90s, 15m, 12h, 7d); "
            "default: JOBQ_RETENTION, and JOBQ_RETENTION_FAILED for failed_permanent.",
        ),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            metavar="STATUS",
            help="Only jobs that ended so: succeeded, cancelled or failed_permanent.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be removed; change nothing.")
    ] = False,
) -> None:
    """Remove finished jobs past retention (or --older-than), and idempotency keys past
    their window whose job is gone. Whole history leaves go at once (detached without
    blocking writers, then dropped); the rest of a leaf the horizon cuts through is deleted in
    batches of 10,000 rows. Prints what it removed, or with --dry-run would remove."""
    settings = _settings()
    keep = None
    if older_than is not None:
        try:
            keep = parse_duration(older_than)
        except ValueError as exc:
            _fail(f"--older-than: {exc}")
    if status is not None and status not in history.CLASS_OF_STATUS:
        _fail(
            f"--status must be one of {', '.join(history.CLASS_OF_STATUS)} (only finished jobs "
            f"are pruned), got {status!r}"
        )
    retention = {
        "done": keep or settings.retention,
        "failed": keep or settings.retention_failed,
    }
    with _database(settings) as dsn:

        async def go() -> tuple[history.Report, list[history.Target]]:
            await _prepare(dsn, migrate=settings.database_url is None)
            # Two connections: the retention lock's and the one that detaches.
            async with _queue(dsn, settings, max_size=2) as q:
                retention_run = history.Retention(q.pool)
                targets = history.retention_targets(
                    await retention_run.now(),
                    retention,
                    statuses=None if status is None else [status],
                )
                deadline = time.monotonic() + PRUNE_LOCK_WAIT_SECONDS
                while True:
                    report = await retention_run.run(targets, cut=True, dry_run=dry_run)
                    if report is not None:
                        return report, targets
                    if time.monotonic() > deadline:
                        _fail(
                            f"another session held the retention lock for "
                            f"{PRUNE_LOCK_WAIT_SECONDS:g}s (a worker's cleaner, or another "
                            "jobq prune); try again",
                            EXIT_ENVIRONMENT,
                        )
                    await asyncio.sleep(0.5)

        report, targets = _run_against(dsn, go())
    if not targets:
        typer.echo(
            "JOBQ_RETENTION and JOBQ_RETENTION_FAILED are off"
            if status is None
            else f"retention is off for {status}"
        )
        typer.echo("history is kept forever; give --older-than to remove some")
    for line in _prune_lines(report):
        typer.echo(line)


@app.command()
def chaos(
    jobs: Annotated[
        int, typer.Option("--jobs", "-n", min=1, metavar="N", help="Jobs to run.")
    ] = 2000,
    workers: Annotated[
        int, typer.Option(min=1, metavar="N", help="Worker processes at any time.")
    ] = 4,
    concurrency: Annotated[
        int, typer.Option(min=1, metavar="N", help="Jobs in flight per worker.")
    ] = 2,
    kill_interval: Annotated[
        float, typer.Option(min=0.05, metavar="SECONDS", help="Mean time between SIGKILLs.")
    ] = 1.0,
    restart_database: Annotated[bool, typer.Option(help="Restart PostgreSQL once mid-run.")] = True,
    timeout: Annotated[
        float, typer.Option(min=1, metavar="SECONDS", help="Give up after this long.")
    ] = 600,
    seed: Annotated[
        int | None, typer.Option(metavar="N", help="Random seed, to replay a run.")
    ] = None,
) -> None:
    """Kill workers and restart a database of its own while jobs run; check nothing is lost.

    Exits 1 when a job was lost, stuck, failed, or ran twice without a killed worker or an
    expired lease to explain it.
    """
    from jobq import chaos as chaos_run

    logs.configure("text", "WARNING")
    report = chaos_run.main_sync(
        jobs,
        workers=workers,
        concurrency=concurrency,
        kill_interval=kill_interval,
        restart_database=restart_database,
        timeout=timeout,
        seed=seed,
        progress=typer.echo,
    )
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


_KIND_FLAG = typer.Option(
    "--kind", help="NAME is a job kind: pause (or resume) its jobs in every queue."
)


def _flow(name: str, kind: bool, resume: bool, by: str | None = None) -> None:
    settings = _settings()
    scope = "kind" if kind else "queue"
    with _database(settings) as dsn:

        async def go() -> dict[str, Any]:
            await _prepare(dsn, migrate=settings.database_url is None)
            async with _queue(dsn, settings) as q:
                if resume:
                    state = await q.resume(scope, name)
                else:
                    try:
                        state = await q.pause(scope, name, by=by, max_paused=settings.max_paused)
                    except TooManyPaused as exc:
                        _fail(str(exc))
            return {
                scope: state.name,
                "paused": state.paused,
                "paused_at": state.paused_at,
                "paused_by": state.paused_by,
            }

        out = _run_against(dsn, go())
    typer.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


@app.command()
def pause(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The queue (or, with --kind, kind).")],
    kind: Annotated[bool, _KIND_FLAG] = False,
    by: Annotated[
        str | None,
        typer.Option(
            "--by", help="Who pauses (1 to 200 printable characters): shown as paused_by."
        ),
    ] = None,
) -> None:
    """Pause a queue: no worker on any host claims its jobs from now on; running ones finish,
    enqueue goes on. Stored until resumed. A queue with no jobs yet can be paused."""
    _flow(name, kind, resume=False, by=by)


@app.command()
def resume(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The queue (or, with --kind, kind).")],
    kind: Annotated[bool, _KIND_FLAG] = False,
) -> None:
    """Resume a paused queue (or kind): workers claim its jobs again."""
    _flow(name, kind, resume=True)


def main() -> None:
    try:
        app()
    except CommandError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
