"""Outside services (a Ray cluster, an MLflow server or store): checked before any work, so that an
address nothing answers at, or a store that cannot be written, is one line within seconds instead of a
client library's minutes of retries, or a success that vanishes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from featcache.errors import FeatcacheError


def reachable(address: str, option: str, advice: str, timeout_s: float = 5.0) -> None:
    """Refuse at once, in one line, an address nothing answers at (a client library would retry for
    minutes): ``[scheme://]host:port``; addresses without a port are left to the client."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        host, port = parts.hostname, parts.port or default
    except ValueError:
        raise FeatcacheError(f"{option} {address}: not an address (host:port); {advice}") from None
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise FeatcacheError(f"{option} {address}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
                             f"{advice}") from None


def check_tracking_uri(uri: str | None, cache_root: Path) -> None:
    """Refuse an MLflow tracking URI that would hang, fail late, or lose the runs: a server nothing answers
    at, a SQLite file in a folder that cannot be written, or an in-memory SQLite store (``sqlite://``,
    ``sqlite:///``, ``:memory:``), which vanishes when the command ends."""
    if uri is None:  # the default store, in the cache
        folder = Path(cache_root)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise FeatcacheError(f"--mlflow: the default store {Path(cache_root) / 'mlflow.db'} cannot be written "
                                 f"({folder} is read-only); pass --mlflow-uri or --cache with a writable folder")
        return
    if uri.startswith("sqlite:"):
        path = uri.removeprefix("sqlite:").removeprefix("///").removeprefix("//")
        if path in ("", "/", ":memory:"):
            raise FeatcacheError(f"--mlflow-uri {uri}: an in-memory SQLite store vanishes when the command ends; "
                                 "give a file, e.g. sqlite:///runs.db")
        folder = Path("/" + path.lstrip("/") if uri.startswith("sqlite:////") else path).expanduser().parent
        folder = folder if str(folder) else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise FeatcacheError(f"--mlflow-uri {uri}: the folder {folder} does not exist or cannot be written; "
                                 "give a SQLite file in a writable folder")
        return
    if uri.startswith(("http://", "https://")):
        reachable(uri, "--mlflow-uri", "start the MLflow server (`mlflow server`) or check the address")
