"""The `jobq` command: migrate, api, worker, dev, enqueue, enqueue-file, status."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import datetime
from typing import Annotated, Any, TypeVar

import orjson
import typer

from jobq import db, logs, schema
from jobq.api.schemas import job_to_dict
from jobq.queue import InvalidJob, NewJob, Queue, validate
from jobq.registry import Registry
from jobq.settings import Settings, SettingsError

log = logging.getLogger("jobq.cli")

app = typer.Typer(
    help="jobq: a job queue on PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    logs.configure(settings.log_format, settings.log_level)
    return settings


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is not on every platform
        return asyncio.run(coro)


def load_registry(spec: str) -> Registry:
    """`module:attr` naming a Registry."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise typer.BadParameter(f"expected module:attr, got {spec!r}")
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise typer.BadParameter(f"cannot import {module_name!r}: {exc}") from None
    registry = getattr(module, attr, None)
    if not isinstance(registry, Registry):
        raise typer.BadParameter(f"{spec!r} is not a jobq Registry")
    return registry


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[str]:
    try:
        with db.database(settings) as dsn:
            yield dsn
    except db.EmbeddedPostgresError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


async def _prepare(dsn: str, *, migrate: bool) -> None:
    conn = await db.connect(dsn)
    try:
        if migrate:
            await schema.migrate(
                conn, progress=lambda m: typer.echo(f"applying migration {m.version:04d}_{m.name}")
            )
            return
        pending = {m.version for m in schema.available()} - await schema.applied(conn)
        if pending:
            typer.echo(
                f"error: the database schema is not up to date ({len(pending)} migration(s) "
                "pending); run `jobq migrate`",
                err=True,
            )
            raise typer.Exit(1)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _queue(dsn: str, settings: Settings, *, max_size: int = 1) -> AsyncIterator[Queue]:
    pool = await db.create_pool(dsn, min_size=1, max_size=max_size)
    try:
        yield Queue(pool, default_max_attempts=settings.default_max_attempts)
    finally:
        await pool.close()


def _on_signals(handler: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler)


@app.command()
def migrate() -> None:
    """Apply pending database migrations."""
    settings = _settings()

    async def go(dsn: str) -> list[int]:
        conn = await db.connect(dsn)
        try:
            total = len({m.version for m in schema.available()} - await schema.applied(conn))
            step = iter(range(1, total + 1))

            def progress(m: schema.Migration) -> None:
                typer.echo(f"[{next(step, total)}/{total}] applying {m.version:04d}_{m.name} …")

            return await schema.migrate(conn, progress=progress)
        finally:
            await conn.close()

    with _database(settings) as dsn:
        applied = _run(go(dsn))
    typer.echo(f"applied {len(applied)} migration(s)" if applied else "schema is up to date")


def _uvicorn_server(asgi: Any, host: str, port: int) -> Any:
    import uvicorn

    from jobq.api import server as http_server

    class Server(uvicorn.Server):
        # Signals are ours: the worker in the same process needs a graceful stop too.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(http_server.uvicorn_config(asgi, host, port, asgi.state.settings))


def _warn_open(settings: Settings, host: str) -> None:
    if not settings.api_tokens and host not in {"127.0.0.1", "localhost", "::1"}:
        log.warning(
            "JOBQ_API_TOKENS is not set and the API listens on %s: anyone who can reach it "
            "can enqueue and cancel jobs",
            host,
        )


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PORT", help="Port to bind.")] = 8000,
    app_spec: Annotated[
        str | None,
        typer.Option("--app", help="module:attr of a Registry: check kinds and payloads."),
    ] = None,
) -> None:
    """Serve the HTTP API."""
    from jobq.api import create_app

    settings = _settings()
    registry = load_registry(app_spec) if app_spec else None
    _warn_open(settings, host)
    with _database(settings) as dsn:

        async def go() -> None:
            await _prepare(dsn, migrate=settings.database_url is None)
            server = _uvicorn_server(create_app(settings, dsn=dsn, registry=registry), host, port)
            _on_signals(lambda: setattr(server, "should_exit", True))
            await server.serve()

        _run(go())


@app.command()
def worker(
    app_spec: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="The Registry to run.")],
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs in flight at once.")] = 10,
    queues: Annotated[str, typer.Option(help="Comma-separated queues to work.")] = "default",
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.")
    ] = None,
    shutdown_grace: Annotated[
        float, typer.Option(min=0, help="Seconds in-flight jobs get to finish on SIGTERM.")
    ] = 30.0,
) -> None:
    """Run a worker."""
    from jobq.worker import Worker

    settings = _settings()
    registry = load_registry(app_spec)
    queue_names = [q.strip() for q in queues.split(",") if q.strip()]
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    with _database(settings) as dsn:

        async def go() -> None:
            await _prepare(dsn, migrate=settings.database_url is None)
            w = Worker(
                dsn,
                registry,
                concurrency=concurrency,
                queues=queue_names,
                settings=settings,
                shutdown_grace=shutdown_grace,
            )
            # First signal: graceful stop. Second: no more grace.
            _on_signals(w.request_stop)
            await w.run()

        _run(go())


@app.command()
def dev(
    app_spec: Annotated[
        str, typer.Argument(metavar="[MODULE:ATTR]", help="The Registry to run.")
    ] = "jobq.examples:registry",
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PORT", help="Port to bind.")] = 8000,
    concurrency: Annotated[int, typer.Option(min=1)] = 10,
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
            typer.echo(
                f"\njobq is running (Ctrl-C to stop)\n"
                f"  API       {base}/jobs\n"
                f"  docs      {base}/docs\n"
                f"  dashboard {base}/ui\n"
                f"  metrics   {base}/metrics\n"
                f"  worker    kinds: {', '.join(registry.kinds)}\n"
            )
            try:
                await server.serve()
            finally:
                if not w.stopping:
                    w.request_stop()
                await worker_task

        _run(go())


@app.command()
def enqueue(
    kind: Annotated[str, typer.Argument(help="The job kind.")],
    payload: Annotated[str, typer.Option(help="JSON object.")] = "{}",
    queue: Annotated[str, typer.Option()] = "default",
    priority: Annotated[int, typer.Option(help="Lower runs first.")] = 0,
    max_attempts: Annotated[int | None, typer.Option()] = None,
    run_at: Annotated[datetime | None, typer.Option(help="When the job is due (ISO 8601).")] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Enqueue one job and print it as JSON."""
    settings = _settings()
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise typer.BadParameter(f"--payload is not JSON: {exc}") from None
    new = NewJob(
        kind=kind,
        payload=body,
        queue=queue,
        priority=priority,
        max_attempts=max_attempts,
        run_at=run_at,
        idempotency_key=idempotency_key,
    )
    with _database(settings) as dsn:

        async def go() -> dict[str, Any]:
            await _prepare(dsn, migrate=settings.database_url is None)
            async with _queue(dsn, settings) as q:
                result = await q.enqueue(new)
            return job_to_dict(result.job)

        try:
            job = _run(go())
        except InvalidJob as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    typer.echo(orjson.dumps(job, option=orjson.OPT_INDENT_2).decode())


_ENQUEUE_FILE_HELP = 'JSON lines, one job a line: {"kind": ..., "payload": ...}; - reads stdin.'


@app.command("enqueue-file")
def enqueue_file(
    path: Annotated[typer.FileText, typer.Argument(help=_ENQUEUE_FILE_HELP)],
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Jobs per insert.")] = 500,
) -> None:
    """Enqueue many jobs from a file, showing progress. Nothing is stored if a line is invalid."""
    settings = _settings()
    jobs: list[NewJob] = []
    for number, line in enumerate(path, start=1):
        if not line.strip():
            continue
        try:
            jobs.append(_job_from_line(line))
        except (ValueError, TypeError) as exc:
            typer.echo(f"error: line {number}: {exc}", err=True)
            raise typer.Exit(2) from None
    with _database(settings) as dsn:

        async def go() -> int:
            await _prepare(dsn, migrate=settings.database_url is None)
            done = 0
            async with _queue(dsn, settings) as q:
                with typer.progressbar(
                    length=len(jobs), label="enqueueing", file=sys.stderr
                ) as bar:
                    for start in range(0, len(jobs), batch_size):
                        chunk = jobs[start : start + batch_size]
                        done += len(await q.enqueue_many(chunk))
                        bar.update(len(chunk))
            return done

        try:
            count = _run(go())
        except InvalidJob as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    typer.echo(f"enqueued {count} job(s)")


_JOB_FIELDS = {"kind", "payload", "queue", "priority", "max_attempts", "run_at", "idempotency_key"}


def _job_from_line(line: str) -> NewJob:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    unknown = set(obj) - _JOB_FIELDS
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "kind" not in obj:
        raise ValueError("kind is required")
    run_at = obj.get("run_at")
    job = NewJob(
        kind=obj["kind"],
        payload=obj.get("payload", {}),
        queue=obj.get("queue", "default"),
        priority=obj.get("priority", 0),
        max_attempts=obj.get("max_attempts"),
        run_at=datetime.fromisoformat(run_at) if isinstance(run_at, str) else run_at,
        idempotency_key=obj.get("idempotency_key"),
    )
    validate(job)  # raises InvalidJob (a ValueError) before anything is stored
    return job


@app.command()
def status(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
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
            _run(go())


@app.command()
def chaos(
    jobs: Annotated[int, typer.Option("--jobs", "-n", min=1, help="Jobs to run.")] = 2000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes at any time.")] = 4,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs in flight per worker.")] = 2,
    kill_interval: Annotated[
        float, typer.Option(min=0.05, help="Mean seconds between SIGKILLs.")
    ] = 1.0,
    restart_database: Annotated[bool, typer.Option(help="Restart PostgreSQL once mid-run.")] = True,
    timeout: Annotated[float, typer.Option(min=1, help="Give up after this many seconds.")] = 600,
    seed: Annotated[int | None, typer.Option(help="Random seed, to replay a run.")] = None,
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
