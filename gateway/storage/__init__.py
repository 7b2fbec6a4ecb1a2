"""Storage: the interfaces the core sees (``base``) and their backends (``sqlite``)."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..metrics import Metrics
from .base import AuditStore, HeadStore, Storage, TokenStore
from .sqlite import open_sqlite_storage

__all__ = ["AuditStore", "HeadStore", "Storage", "TokenStore", "open_storage"]


async def open_storage(config: Config, metrics: Metrics | None = None) -> Storage:
    """The stores the configuration names (embedded SQLite in ``records.data_dir``), reporting
    to ``metrics`` if given."""
    return await open_sqlite_storage(Path(config.records.data_dir), metrics)
