"""Storage: the interfaces the core sees (``base``) and their backends: embedded SQLite
(``sqlite``, the default) and PostgreSQL (``postgres``, shared by several gateways)."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..metrics import Metrics
from .base import AuditStore, HeadStore, KeyStore, Storage, TokenStore
from .sqlite import open_sqlite_storage

__all__ = ["AuditStore", "HeadStore", "KeyStore", "Storage", "TokenStore", "open_storage", "migrate"]


async def open_storage(config: Config, metrics: Metrics | None = None) -> Storage:
    """The stores the configuration names: PostgreSQL if ``storage.url`` is set (migrated to
    the current schema first, unless ``storage.migrate_on_start`` is off), else the embedded
    SQLite files in ``records.data_dir``; reporting to ``metrics`` if given."""
    cfg = config.storage
    url = cfg.database_url()
    if not url:
        return await open_sqlite_storage(Path(config.records.data_dir), metrics)
    from .postgres import open_postgres_storage
    return await open_postgres_storage(url, pool_min=cfg.pool_min, pool_max=cfg.pool_max,
                                       connect_timeout=cfg.connect_timeout, command_timeout=cfg.command_timeout,
                                       migrate_on_start=cfg.migrate_on_start, metrics=metrics)


async def migrate(config: Config) -> tuple[str, list[str]]:
    """Bring the configured database to the current schema: (where it is, what was applied).
    The embedded SQLite stores create their tables when opened: nothing to do for them."""
    url = config.storage.database_url()
    if not url:
        return f"embedded SQLite in {config.records.data_dir}", []
    from .postgres import migrate_database
    return await migrate_database(url, connect_timeout=config.storage.connect_timeout)
