"""bench.handlers' registry in a process with an OpenTelemetry SDK that records every span and
exports none; run with JOBQ_OTEL=1 (`jobq worker bench.otel_handlers:registry`)."""

from bench.handlers import otel_sdk, registry

otel_sdk()

__all__ = ["registry"]
