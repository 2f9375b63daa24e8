"""The trace store: runs, routing decisions and activations in one DuckDB file (schema in schema.py)."""
from routelens.errors import StoreError
from routelens.store.connection import connect, session
from routelens.store.schema import SCHEMA_VERSION
from routelens.store.store import RunHandle, Store
from routelens.store.writer import RunWriter, WriterConfig

__all__ = ["Store", "RunWriter", "RunHandle", "WriterConfig", "StoreError", "SCHEMA_VERSION", "connect",
           "session"]
