"""Gateway configuration: one TOML file plus ``MEDICON_*`` environment overrides.

Every key is declared once in ``FIELDS`` with its type and default, so a typo or a wrong
type in a file or in the environment fails at start with a message naming the key, instead
of being silently ignored.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

ENV_PREFIX = "MEDICON_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5080
    # Browser origins allowed to call the RPC API (Kubo's CSRF rule, enforced here because
    # the gateway strips Origin/Referer before forwarding).
    allowed_origins: tuple[str, ...] = ()
    # Seconds a SIGTERM waits for in-flight requests before closing.
    shutdown_timeout: float = 30.0
    # Requests served at once; over it: 503 with Retry-After (health probes are exempt).
    max_concurrent_requests: int = 512
    # Seconds a client may stay silent while sending a request body; past it: 408.
    body_timeout: float = 30.0
    # Seconds a client has to send a request's headers (from connect, or from the first byte
    # of the next request on a keep-alive connection); past it: 408 and the connection closed.
    header_timeout: float = 10.0
    # Largest request body accepted, in bytes as received (multipart framing included), on
    # every door that carries bytes to Kubo; over it: 413, and nothing of it stays in Kubo.
    max_body_size: int = 4 * 1024 ** 3
    # The event loop: "asyncio" (measured faster for large streams, as fast for small requests)
    # or "uvloop" (pip install 'medicon-gateway[uvloop]').
    event_loop: str = "asyncio"


@dataclass(frozen=True)
class KuboConfig:
    api_url: str = "http://127.0.0.1:5001"
    gateway_url: str = "http://127.0.0.1:8080"
    # Seconds to open a connection to Kubo; past it the client gets 502.
    connect_timeout: float = 5.0
    # Seconds Kubo may stay silent (before its headers, or between two body chunks);
    # past it the client gets 504, or the stream is aborted.
    read_timeout: float = 120.0
    max_connections: int = 100


@dataclass(frozen=True)
class RecordsConfig:
    # Where the head store (SQLite) lives.
    data_dir: str = ".medicon-data"
    # Link-chaining policy by name ("strict": the client's prev must be the head; "auto":
    # the gateway fills prev in), and per-schema exceptions {schema $id: policy}.
    chain_policy: str = "auto"
    chain_policy_by_schema: dict = field(default_factory=dict)
    # Extra folders of JSON Schemas, beside the built-in schemas/.
    schema_dirs: tuple[str, ...] = ()
    # Largest record accepted, in bytes of JSON; larger JSON is treated as a blob.
    max_record_size: int = 1024 * 1024
    # Most files in one add of records.
    max_parts: int = 1000


@dataclass(frozen=True)
class SecurityConfig:
    # The local keyring (`medicon-gateway keys init`); empty: <records.data_dir>/keyring.json.
    keyring: str = ""
    # Seal record bodies and attachments before they reach Kubo.
    encrypt: bool = True


@dataclass(frozen=True)
class PluginsConfig:
    # Plugin modules to load by import path, beside the entry-point group `medicon_gateway`.
    modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    kubo: KuboConfig = field(default_factory=KuboConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)


SECTIONS: dict[str, type] = {"server": ServerConfig, "kubo": KuboConfig, "records": RecordsConfig,
                             "security": SecurityConfig, "plugins": PluginsConfig}


def keyring_path(config: Config) -> Path:
    return Path(config.security.keyring or Path(config.records.data_dir) / "keyring.json")


def _coerce(key: str, value: Any, default: Any, from_env: bool) -> Any:
    """Return ``value`` converted to the type of ``default``, or raise naming ``key``."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if from_env and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return str(value).lower() in ("1", "true", "yes", "on")
            raise TypeError
        if kind is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int) or from_env:
                return int(value)
            raise TypeError
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, (int, float)) or from_env:
                return float(value)
            raise TypeError
        if kind is str:
            if isinstance(value, str):
                return value
            raise TypeError
        if kind is dict:
            if from_env:
                pairs = [item.split("=", 1) for item in str(value).split(",") if item.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError
                return {k.strip(): v.strip() for k, v in pairs}
            if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
                return dict(value)
            raise TypeError
        if kind is tuple:
            if from_env:
                return tuple(v.strip() for v in str(value).split(",") if v.strip())
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise TypeError
    except (TypeError, ValueError):
        pass
    expected = {tuple: "list of strings", dict: "table of strings"}.get(kind, kind.__name__)
    raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}")


def _check(config: Config) -> Config:
    for key in ("kubo.api_url", "kubo.gateway_url"):
        url = getattr(config.kubo, key.split(".")[1])
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"config key {key!r}: expected an http(s) URL, got {url!r}")
    if config.server.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError(f"config key 'server.event_loop': expected 'uvloop' or 'asyncio', "
                          f"got {config.server.event_loop!r}")
    for key in ("server.port",):
        if not 0 <= config.server.port <= 65535:
            raise ConfigError(f"config key {key!r}: port out of range: {config.server.port}")
    for key in ("kubo.connect_timeout", "kubo.read_timeout", "server.shutdown_timeout", "server.body_timeout",
                "server.header_timeout"):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) <= 0:
            raise ConfigError(f"config key {key!r}: must be > 0")
    for key in ("kubo.max_connections", "records.max_record_size", "records.max_parts",
                "server.max_concurrent_requests", "server.max_body_size"):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 1:
            raise ConfigError(f"config key {key!r}: must be >= 1")
    return config


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a validated ``Config`` from defaults, a TOML file, the environment and overrides.

    Later sources win. Environment keys are ``MEDICON_<SECTION>_<KEY>`` (``MEDICON_KUBO_API_URL``);
    ``overrides`` uses dotted keys (``{"server.port": 0}``) and serves the CLI and tests.
    """
    env = os.environ if env is None else env
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    sources: dict[str, bool] = {}  # dotted key -> value came from the environment

    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section {section!r} in {path}")
            if not isinstance(values, dict):
                raise ConfigError(f"config key {section!r}: expected a table")
            for key, value in values.items():
                raw[section][key] = value
                sources[f"{section}.{key}"] = False

    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS:
            continue  # other MEDICON_* variables (tokens, URLs printed by `dev`) are not config
        raw[section][key] = value
        sources[f"{section}.{key}"] = True

    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}")
        raw[section][key] = value
        sources[dotted] = False

    built = {}
    for section, cls in SECTIONS.items():
        defaults = cls()
        known = set(cls.__dataclass_fields__)
        values = {}
        for key, value in raw[section].items():
            dotted = f"{section}.{key}"
            if key not in known:
                origin = f"{ENV_PREFIX}{section.upper()}_{key.upper()}" if sources[dotted] else dotted
                raise ConfigError(f"unknown config key {origin!r} (known: {', '.join(sorted(known))})")
            values[key] = _coerce(dotted, value, getattr(defaults, key), sources[dotted])
        built[section] = cls(**values)
    return _check(Config(**built))
