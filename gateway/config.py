"""Gateway configuration: one TOML file plus ``MEDICON_*`` environment overrides.

Every key is declared once, with its type, bounds and default, in the pydantic models below; a
typo or a wrong type in a file or in the environment fails at start with a message naming the
key, instead of being silently ignored. File values must have the declared type (``port = 80``,
not ``"80"``); environment values are text, read as the declared type (``MEDICON_SERVER_PORT=80``,
lists comma-separated, tables as ``k=v,k2=v2``).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_origin
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr,
                      TypeAdapter, ValidationError)

ENV_PREFIX = "MEDICON_"
# MEDICON_* variables that are not config keys: the config file's path, what `dev` prints, the
# deploy scripts' binary path and a joining site's key bundle and name (medicon-entrypoint.sh),
# the test suite's knobs, and plugins' own settings (jwt_auth).
NOT_CONFIG = frozenset({"CONFIG", "TOKEN", "GATEWAY_URL", "GATEWAY_BIN", "GATEWAY_ID", "KEY_BUNDLE", "CHAOS",
                        "FUZZ_EXAMPLES", "TEST_STORAGE"})
NOT_CONFIG_PREFIXES = ("JWT_", "SITE")  # MEDICON_SITE<n>_URL/_TOKEN: what `dev --sites N` prints
# Older names kept working: MEDICON_TRACE_HOOKS is plugins.trace_hooks.
ENV_ALIASES = {"TRACE_HOOKS": ("plugins", "trace_hooks")}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


Strings = Annotated[tuple[str, ...], BeforeValidator(_tuple)]
HttpURL = Annotated[str, AfterValidator(_http_url)]
Seconds = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 5080
    # Browser origins allowed to call the RPC API (Kubo's CSRF rule, enforced here because
    # the gateway strips Origin/Referer before forwarding).
    allowed_origins: Strings = ()
    # Seconds a SIGTERM waits for in-flight requests before closing.
    shutdown_timeout: Seconds = 30.0
    # Requests served at once; over it: 503 with Retry-After (health probes are exempt).
    max_concurrent_requests: Count = 512
    # Seconds a client may stay silent while sending a request body; past it: 408.
    body_timeout: Seconds = 30.0
    # Seconds a client has to send a request's headers (from connect, or from the first byte
    # of the next request on a keep-alive connection); past it: 408 and the connection closed.
    header_timeout: Seconds = 10.0
    # Largest request body accepted, in bytes as received (multipart framing included), on
    # every door that carries bytes to Kubo; over it: 413, and nothing of it stays in Kubo.
    max_body_size: Count = 4 * 1024 ** 3
    # The event loop: "asyncio" (measured faster for large streams, as fast for small requests)
    # or "uvloop" (pip install 'medicon-gateway[uvloop]').
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    # Gateway processes serving the port (SO_REUSEPORT; each uses one core). More than one
    # needs a storage backend several processes share: PostgreSQL (storage.url).
    workers: Annotated[int, Field(ge=1, le=64)] = 1


class KuboConfig(Section):
    api_url: HttpURL = "http://127.0.0.1:5001"
    gateway_url: HttpURL = "http://127.0.0.1:8080"
    # Seconds to open a connection to Kubo; past it the client gets 502.
    connect_timeout: Seconds = 5.0
    # Seconds Kubo may stay silent (before its headers, or between two body chunks);
    # past it the client gets 504, or the stream is aborted.
    read_timeout: Seconds = 120.0
    max_connections: Count = 100
    # The secret of Kubo's API.Authorizations entry for the gateway: sent as
    # "Authorization: Bearer <secret>" on every RPC call, so no other process on the host can
    # use Kubo's RPC. Empty: Kubo's RPC is open (only for a Kubo nobody else can reach).
    api_auth: str = ""
    # ... or a file holding it (a Docker/Kubernetes secret, a systemd credential).
    api_auth_file: str = ""
    # The `ipfs` binary of a node the gateway manages (`dev`); empty: .tools/bin/ipfs, then PATH.
    bin: str = ""


    def rpc_secret(self) -> str:
        """The secret of Kubo's API.Authorizations, from ``api_auth`` or ``api_auth_file``."""
        if not self.api_auth_file:
            return self.api_auth
        try:
            return Path(self.api_auth_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"config key 'kubo.api_auth_file': cannot read {self.api_auth_file}: "
                              f"{exc.strerror}") from None


class ReplicaService(Section):
    """A remote IPFS Pinning Service API asked to pin every record (another site's gateway at
    ``/pinning/v1``, or any spec-compliant pinning service): it receives CIDs of sealed blocks."""

    # A short name for errors, logs and `check` (never a secret).
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    # The service's base URL (Kubo's `pin remote service add` form: without the trailing /pins).
    endpoint: HttpURL
    # Its access token (Authorization: Bearer …), or a file holding it.
    key: SecretStr = SecretStr("")
    key_file: str = ""

    def access_token(self) -> str:
        if not self.key_file:
            return self.key.get_secret_value()
        try:
            return Path(self.key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"replica service {self.name!r}: cannot read its key_file {self.key_file}: "
                              f"{exc.strerror}") from None


class RecordsConfig(Section):
    # Where the embedded stores (SQLite) and the default keyring live.
    data_dir: str = ".medicon-data"
    # Link-chaining policy by name ("strict": the client's prev must be the head; "auto":
    # the gateway fills prev in), and per-schema exceptions {schema $id: policy}.
    chain_policy: str = "auto"
    chain_policy_by_schema: dict[str, str] = Field(default_factory=dict)
    # Extra folders of JSON Schemas, beside the built-in schemas/.
    schema_dirs: Strings = ()
    # Largest record accepted, in bytes of JSON; larger JSON is treated as a blob.
    max_record_size: Count = 1024 * 1024
    # Most files in one add of records.
    max_parts: Count = 1000
    # FHIR R4 resources embedded in records (any object with a resourceType): "enforce" refuses
    # a record whose resources are not valid FHIR R4 (400 naming the resource and the path),
    # "warn" accepts it and logs a warning, "off" does not look. Enforce by default: records are
    # never rewritten, and the FHIR facade serves what was stored to other FHIR software.
    fhir_validation: Literal["off", "warn", "enforce"] = "enforce"
    # Seconds a record's recorded_at may lie ahead of the gateway's clock (later: 400). An
    # episode's times never go backwards, so one writer's fast clock would otherwise hold every
    # other writer's appends off (409) until that time has passed.
    max_clock_skew: Seconds = 300.0
    # Kubo nodes a record is pinned on before it is acknowledged: this gateway's own node, plus
    # (replicas - 1) of replica_services reporting it pinned. 1: no replication.
    replicas: Count = 1
    replica_services: Annotated[tuple[ReplicaService, ...], BeforeValidator(_tuple)] = ()
    # Seconds an append waits for the replica services to report its record pinned; past it:
    # 504, and nothing is acknowledged (the head does not move).
    replica_timeout: Seconds = 30.0
    # Appends to an episode chained while earlier ones are on their way to Kubo, their blocks
    # written and pinned many to a call (true; an append alone on its episode still goes the
    # serial way), or each append one Kubo round trip under its episode's lock (false, the
    # serial path). Off by default: with it on, Kubo's repository
    # filling up mid-burst can leave Kubo's pin store failing until Kubo restarts (see
    # bench/README.md, "Pipelined appends").
    pipeline: bool = False


def _database_url(value: SecretStr) -> SecretStr:
    """A PostgreSQL URL, or empty for the embedded SQLite stores. The error never repeats the
    value: it may hold a password."""
    text = value.get_secret_value()
    if not text:
        return value
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("expected a postgresql://user:password@host:port/database URL "
                         "(the value given does not parse; it is not repeated here)") from None
    if parts.scheme not in ("postgresql", "postgres") or not (parts.hostname or "host=" in parts.query):
        raise ValueError("expected a postgresql://user:password@host:port/database URL, or empty "
                         "for the embedded SQLite stores (the value given is not repeated here)")
    return value


class StorageConfig(Section):
    # Where heads, tokens, audit and wrapped keys live: empty for the embedded SQLite files in
    # records.data_dir (one gateway), or postgresql://user:password@host:port/db for a database
    # several gateways share. A secret (it may hold a password): never logged nor shown.
    url: Annotated[SecretStr, AfterValidator(_database_url)] = SecretStr("")
    # ... or a file holding that URL (a Docker/Kubernetes secret, a systemd credential).
    url_file: str = ""
    # Connections the gateway keeps to PostgreSQL (at least, at most).
    pool_min: Annotated[int, Field(ge=0)] = 2
    pool_max: Count = 10
    # Seconds to connect to PostgreSQL, and for one statement; past it: 503.
    connect_timeout: Seconds = 10.0
    command_timeout: Seconds = 30.0
    # Apply pending schema migrations at start (under an advisory lock, so several gateways
    # starting together migrate once); false: refuse to start until `medicon-gateway migrate`.
    migrate_on_start: bool = True

    def database_url(self) -> str:
        """The PostgreSQL URL, from ``url`` or ``url_file``; empty for the SQLite stores."""
        if not self.url_file:
            return self.url.get_secret_value()
        try:
            text = Path(self.url_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"config key 'storage.url_file': cannot read {self.url_file}: {exc.strerror}") from None
        try:
            _database_url(SecretStr(text))
        except ValueError as exc:
            raise ConfigError(f"config key 'storage.url_file': {exc}") from None
        return text


# Values never shown in errors (they may carry credentials).
SECRET_KEYS = frozenset({"storage.url"})


class SecurityConfig(Section):
    # The local keyring (`medicon-gateway keys init`); empty: <records.data_dir>/keyring.json.
    keyring: str = ""
    # Seal record bodies and attachments before they reach Kubo.
    encrypt: bool = True


class PluginsConfig(Section):
    # Plugin modules to load by import path, beside the entry-point group `medicon_gateway`.
    modules: Strings = ()
    # Log every hook call with its arguments and results (pluggy's tracing).
    trace_hooks: bool = False


class Config(Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    kubo: KuboConfig = Field(default_factory=KuboConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)


SECTIONS: dict[str, type[Section]] = {name: field.annotation for name, field in Config.model_fields.items()}


def keyring_path(config: Config) -> Path:
    return Path(config.security.keyring or Path(config.records.data_dir) / "keyring.json")


def _from_env(annotation: Any, text: str) -> Any:
    """An environment value (text) as the field's type: lists comma-separated, tables as
    ``k=v`` pairs, everything else as pydantic reads text in lax mode."""
    origin = get_origin(annotation)
    if origin is tuple and text.lstrip().startswith("["):  # a list of tables, as JSON
        return tuple(json.loads(text))
    if origin is tuple:
        return tuple(v.strip() for v in text.split(",") if v.strip())
    if origin is dict:
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"expected k=v pairs separated by commas, got {text!r}")
        return {k.strip(): v.strip() for k, v in pairs}
    return TypeAdapter(annotation).validate_python(text, strict=False)


def _env_key(name: str) -> tuple[str, str] | None:
    """(section, key) of a ``MEDICON_*`` variable; None if it is not meant as config.
    An unknown section is an error: a misspelt variable must not be silently ignored."""
    rest = name[len(ENV_PREFIX):]
    if rest in NOT_CONFIG or rest.startswith(NOT_CONFIG_PREFIXES):
        return None
    if rest in ENV_ALIASES:
        return ENV_ALIASES[rest]
    section, _, key = rest.lower().partition("_")
    if section not in SECTIONS or not key:
        raise ConfigError(f"unknown environment variable {name!r}: not a config key "
                          f"(sections: {', '.join(SECTIONS)})")
    return section, key


def _describe(err: ValidationError, secret: bool = False) -> str:
    first = err.errors()[0]
    shown = "input" in first and not isinstance(first["input"], dict) and not secret
    return first["msg"].removeprefix("Value error, ") + (f", got {first['input']!r}" if shown else "")


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
    origins: dict[str, str] = {}  # dotted key -> how to name it in an error

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
            raw[section].update(values)

    for name, text in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        found = _env_key(name)
        if found is None:
            continue
        section, key = found
        fields = SECTIONS[section].model_fields
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r} (known: {', '.join(sorted(fields))})")
        try:
            raw[section][key] = _from_env(fields[key].annotation, text)
        except (ValidationError, ValueError) as exc:
            secret = f"{section}.{key}" in SECRET_KEYS
            why = _describe(exc, secret) if isinstance(exc, ValidationError) else str(exc)
            raise ConfigError(f"config key '{section}.{key}' ({name}): {why}") from None
        origins[f"{section}.{key}"] = name

    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}")
        raw[section][key] = _tuple(value)

    built = {}
    for section, model in SECTIONS.items():
        unknown = sorted(set(raw[section]) - set(model.model_fields))
        if unknown:
            raise ConfigError(f"unknown config key '{section}.{unknown[0]}' "
                              f"(known: {', '.join(sorted(model.model_fields))})")
        try:
            built[section] = model.model_validate(raw[section])
        except ValidationError as err:
            key = f"{section}.{err.errors()[0]['loc'][0]}"
            named = f"'{key}'" + (f" ({origins[key]})" if key in origins else "")
            raise ConfigError(f"config key {named}: {_describe(err, key in SECRET_KEYS)}") from None
    config = Config(**built)
    if config.server.workers > 1 and not (config.storage.url.get_secret_value() or config.storage.url_file):
        named = "'server.workers'" + (f" ({origins['server.workers']})" if "server.workers" in origins else "")
        raise ConfigError(f"config key {named}: {config.server.workers} workers need storage.url (PostgreSQL); "
                          "the embedded SQLite stores belong to one process")
    if config.server.workers > 1 and config.records.pipeline:
        named = "'records.pipeline'" + (f" ({origins['records.pipeline']})" if "records.pipeline" in origins else "")
        raise ConfigError(f"config key {named}: pipelined appends take no turns between processes, so with "
                          f"server.workers = {config.server.workers} appends to one episode from several workers "
                          "could be refused (409); turn one of them off")
    return config
