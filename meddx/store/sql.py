"""The query engine that joins listings against the index: DuckDB, in this process,
within a fixed memory budget (what does not fit spills to a temporary folder), with no
extension ever downloaded or loaded. Tables come in as Arrow streams, results go out as
Arrow tables."""

from __future__ import annotations

import os
import tempfile

import duckdb

MEMORY_LIMIT = os.environ.get("MEDDX_SQL_MEMORY", "256MB")  # DuckDB's own budget


def connect() -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB: two threads at most, MEMORY_LIMIT, spilling to the
    system's temporary folder, no extensions, no progress bar."""
    con = duckdb.connect(
        config={
            "memory_limit": MEMORY_LIMIT,
            "threads": min(2, os.cpu_count() or 1),
            "temp_directory": os.path.join(tempfile.gettempdir(), "meddx-sql"),
            "preserve_insertion_order": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
    )
    con.execute("SET enable_progress_bar = false").fetchall()  # the CLI alone writes there
    return con
