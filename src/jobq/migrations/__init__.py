"""Versioned SQL migrations, applied in order by `jobq.schema.migrate`."""
