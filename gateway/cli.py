"""``medicon-gateway``: run the gateway (``serve``), a complete local setup (``dev``), manage
API tokens (``token create|list|revoke``) and keys (``keys init|rotate|shred|export|join|
gateways``), or bring the database to the current schema (``migrate``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Coroutine, TypeVar

from aiohttp import web

from . import logs
from .config import Config, ConfigError, keyring_path, load_config
from .errors import MediconError
from .http.app import INFLIGHT, create_app
from .http.server import GatewayRunner
from .kubo.node import KuboError, KuboNode, find_binary
from .metrics import register_worker
from .progress import ProgressReport
from .security.keyring import KeyringError, LocalKeyring, read_bundle
from .security.principal import ROLES
from .core.key_provider import KeyringProvider
from .security.tokens import TokenError, parse_duration
from .storage import Storage, TokenStore, migrate, open_storage
from .workers import supervise

log = logging.getLogger("medicon_gateway")
T = TypeVar("T")

# aiohttp's parser limits, kept explicit: a giant header line is refused with 400/431.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190


async def run_server(config: Config, *, announce=None, reuse_port: bool = False) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting and let in-flight requests finish
    within ``server.shutdown_timeout``. ``reuse_port``: one of several workers on the port."""
    app = create_app(config)
    runner = GatewayRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=config.server.shutdown_timeout,
                           header_timeout=config.server.header_timeout,
                           keepalive_timeout=75.0,  # an idle keep-alive connection, as nginx's default
                           max_line_size=MAX_LINE_SIZE, max_field_size=MAX_FIELD_SIZE)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_port=reuse_port or None)
    await site.start()
    port = runner.addresses[0][1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if announce is not None:
        announce(config.server.host, port)
    log.info("medicon-gateway listening on http://%s:%d -> Kubo %s", config.server.host, port,
             config.kubo.api_url)
    try:
        await stop.wait()
        # Drain: stop accepting, let in-flight requests finish (aiohttp's own graceful shutdown
        # stops reading request bodies, which would break uploads in flight), then close.
        log.info("stopping: draining in-flight requests (up to %gs)", config.server.shutdown_timeout)
        await site.stop()
        try:
            await asyncio.wait_for(app[INFLIGHT].idle.wait(), config.server.shutdown_timeout)
        except asyncio.TimeoutError:
            log.warning("%d requests still in flight after %gs; closing them",
                        app[INFLIGHT].count, config.server.shutdown_timeout)
    finally:
        await runner.cleanup()
        log.info("stopped")


def _announce(host: str, port: int) -> None:
    shown = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1", "localhost") else host
    print(f"MEDICON_GATEWAY_URL=http://{shown}:{port}", flush=True)


def run_loop(config: Config, main: Coroutine[Any, Any, T]) -> T:
    """Run the server on the event loop ``server.event_loop`` names."""
    factory = None
    if config.server.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("config key 'server.event_loop' is 'uvloop', but uvloop is not installed "
                              "(pip install 'medicon-gateway[uvloop]')") from None
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=_overrides(args))
    if args.worker is None and config.server.workers > 1:
        return supervise(config, sys.argv[1:], _announce)
    if args.worker is not None:
        register_worker(args.worker)
    run_loop(config, run_server(config, announce=_announce, reuse_port=args.worker is not None))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """A managed local Kubo (offline, loopback, its own repo) with the gateway in front; with
    ``--sites N``, N sites on one PostgreSQL (``gateway.devcluster``)."""
    if args.sites > 1:
        from .devcluster import run_sites
        return run_sites(args.sites, Path(args.data_dir), config_path=args.config, host=args.host, port=args.port,
                         replicas=args.replicas, log_level=args.log_level, log_format=args.log_format)
    data_dir = Path(args.data_dir).resolve()
    node = KuboNode(data_dir / "kubo", binary=find_binary(load_config(args.config).kubo.bin),
                    offline=not args.online)
    node.start()
    print(f"kubo {node.version()} running, repo {node.repo} (API {node.api_url}, not for clients)",
          file=sys.stderr, flush=True)
    try:
        overrides = {"kubo.api_url": node.api_url, "kubo.gateway_url": node.gateway_url,
                     "kubo.api_auth": node.api_secret,
                     "records.data_dir": str(data_dir / "records"), **_overrides(args)}
        config = load_config(args.config, overrides=overrides)
        ring = keyring_path(config)
        if not ring.exists():
            ring.parent.mkdir(parents=True, exist_ok=True)
            LocalKeyring.init(ring)
            print(f"development keyring created: {ring}", file=sys.stderr, flush=True)
        token, info = asyncio.run(_with_tokens(config, _create_dev_token))
        print(f"development token {info.name} ({info.id}, role admin) created; "
              "revoked when dev stops", file=sys.stderr, flush=True)

        def announce(host: str, port: int) -> None:
            _announce(host, port)  # first stdout line: the URL
            print(f"MEDICON_TOKEN={token}", flush=True)

        try:
            run_loop(config, run_server(config, announce=announce))
        finally:
            asyncio.run(_with_tokens(config, lambda store: store.revoke(info.id)))
    finally:
        node.stop()
        print("kubo stopped", file=sys.stderr, flush=True)
    return 0


async def _create_dev_token(store: TokenStore):
    """A fresh admin token for this dev run, named ``dev-<UTC timestamp>``."""
    base = datetime.now(timezone.utc).strftime("dev-%Y%m%dT%H%M%SZ")
    for n in range(1, 100):
        try:
            return await store.create(base if n == 1 else f"{base}-{n}", "admin")
        except TokenError:
            if n == 99:
                raise


# --- token ----------------------------------------------------------------------------------

def _store_config(args: argparse.Namespace) -> Config:
    overrides = {"records.data_dir": args.data_dir} if args.data_dir else {}
    return load_config(args.config, overrides=overrides)


async def _with_tokens(config: Config, use):
    """``await use(token store)`` with the gateway's storage opened (and closed) around it."""
    storage = await open_storage(config)
    try:
        return await use(storage.tokens)
    finally:
        await storage.close()


def _tokens(args: argparse.Namespace, use):
    return asyncio.run(_with_tokens(_store_config(args), use))


def _when(d: datetime | None) -> str:
    return "-" if d is None else d.strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_token_create(args: argparse.Namespace) -> int:
    expires_in = parse_duration(args.expires_in) if args.expires_in else None
    token, info = _tokens(args, lambda store: store.create(
        args.name, args.role, patients=args.patient or None, episodes=args.episode or None,
        expires_in=expires_in))
    print(f"created token {info.name} ({info.id}): role {info.role}, scope {info.scope()}, "
          f"expires {_when(info.expires_at) if info.expires_at else 'never'}", file=sys.stderr)
    print("the token is shown once, on stdout; keep it secret", file=sys.stderr)
    print(f"MEDICON_TOKEN={token}", flush=True)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    infos = _tokens(args, lambda store: store.list(include_revoked=not args.live))
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    head = ("NAME", "ID", "ROLE", "SCOPE", "EXPIRES", "REVOKED", "LAST USED")
    rows = [(i.name, i.id, i.role, i.scope(), _when(i.expires_at) + (" (expired)" if i.status() == "expired" else ""),
             _when(i.revoked_at), _when(i.last_used_at)) for i in infos]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    async def revoke(store: TokenStore):
        return await store.revoke(args.name_or_id), await store.get(args.name_or_id)
    revoked, known = _tokens(args, revoke)
    if revoked:
        print(f"revoked {args.name_or_id}", file=sys.stderr)
        return 0
    if known is not None and known.revoked_at is not None:
        print(f"{args.name_or_id} was already revoked", file=sys.stderr)
        return 0
    print(f"medicon-gateway: error: no live token named or with id {args.name_or_id!r}", file=sys.stderr)
    return 1


# --- check ----------------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    from .core.check import check
    overrides = {"records.data_dir": args.data_dir} if args.data_dir else {}
    with ProgressReport("check") as progress:
        report = asyncio.run(check(load_config(args.config, overrides=overrides), repair=args.repair,
                                   progress=progress))
    print(json.dumps(report, indent=2))
    return 0 if report["clean"] else 1


# --- import ---------------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace) -> int:
    """Records from a file of JSON lines, appended in order, as the local operator (admin)."""
    import getpass
    import uuid

    from .core.access import Caller
    from .core.bulk import import_records
    from .core.service import RecordService
    from .security.principal import Principal

    overrides = {"records.data_dir": args.data_dir} if args.data_dir else {}
    config = load_config(args.config, overrides=overrides)
    path = Path(args.file)
    lines = path.read_text(encoding="utf-8").splitlines()
    caller = Caller(Principal(id=f"cli:{args.as_name or getpass.getuser()}", role="admin", via="cli"),
                    uuid.uuid4().hex, "cli")

    async def run() -> dict:
        async with RecordService.open(config) as service:
            with ProgressReport("import") as progress:
                return await import_records(service, lines, caller, key_prefix=args.key_prefix or path.name,
                                            keep_going=args.keep_going, progress=progress)
    report = asyncio.run(run())
    print(json.dumps(report, indent=2))
    return 0 if not report["failed"] else 1


# --- keys -----------------------------------------------------------------------------------

def _key_config(args: argparse.Namespace) -> Config:
    overrides = {"records.data_dir": args.data_dir} if args.data_dir else {}
    return load_config(args.config, overrides=overrides)


async def with_key_provider(config: Config, use):
    """``await use(provider, storage)`` with the key file attached to the configured key store
    (which moves an old keyring file's data keys into it, and registers this gateway)."""
    storage = await open_storage(config)
    try:
        provider = KeyringProvider(keyring_path(config))
        await provider.attach(storage.keys)
        return await use(provider, storage)
    finally:
        await storage.close()


def cmd_keys_init(args: argparse.Namespace) -> int:
    path = keyring_path(_key_config(args))
    ring = LocalKeyring.init(path, gateway_id=args.gateway_id)
    print(f"keyring created: {path} (mode 0600), gateway {ring.gateway_id}, signing key {ring.key_id}. "
          "Back it up: without it nothing sealed can be read.", file=sys.stderr)
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    async def rotate(provider: KeyringProvider, _storage: Storage) -> str:
        with ProgressReport("keys rotate") as report:
            return await provider.rotate(batch=args.batch, force=args.force,
                                         progress=lambda done, total: report("data keys", done, total))
    kek = asyncio.run(with_key_provider(_key_config(args), rotate))
    print(f"new key-encryption key {kek}: every data key re-wrapped, older KEKs dropped from the key file; "
          "stored data unchanged and readable", file=sys.stderr)
    return 0


def cmd_keys_shred(args: argparse.Namespace) -> int:
    async def shred(provider: KeyringProvider, storage: Storage) -> int:
        return await provider.shred_patient(args.patient, erase=[storage.fhir])
    destroyed = asyncio.run(with_key_provider(_key_config(args), shred))
    print(f"destroyed {destroyed} data key(s): that patient's records and attachments are now "
          "permanently unreadable (410) on every gateway of this key store; the patient's rows of the "
          "FHIR search index are erased", file=sys.stderr)
    return 0


def cmd_keys_export(args: argparse.Namespace) -> int:
    ring = LocalKeyring.load(keyring_path(_key_config(args)))
    out = ring.export(args.out)
    print(f"key bundle written: {out} (mode 0600): the KEKs and the pseudonym key, no signing key. "
          "Carry it to the other site, run `medicon-gateway keys join` there, then destroy it.",
          file=sys.stderr)
    return 0


def cmd_keys_join(args: argparse.Namespace) -> int:
    config = _key_config(args)
    path = keyring_path(config)
    if not path.exists():
        if args.update or args.prune:
            raise KeyringError(f"no key file at {path} to update: leave out --update to create one")
        ring = LocalKeyring.join(path, args.bundle, gateway_id=args.gateway_id)
        print(f"keyring created from {args.bundle}: {path} (mode 0600), gateway {ring.gateway_id}, "
              f"own signing key {ring.key_id}", file=sys.stderr)
    elif not args.update:
        raise KeyringError(f"{path} exists: use --update to take the bundle's key-encryption keys into it")
    else:
        LocalKeyring.load(path).merged(args.bundle, prune=False)
        print(f"keyring {path}: the bundle's key-encryption keys added", file=sys.stderr)

    async def registered(provider: KeyringProvider, _storage: Storage) -> None:
        if args.prune:
            state = await provider.store.state()
            theirs = {k["id"] for k in read_bundle(args.bundle)["keks"]}
            if state.active_kek not in theirs or await provider.store.count(not_wrapped_by=state.active_kek):
                raise KeyringError("not pruning: the bundle lacks the active key-encryption key "
                                   f"{state.active_kek}, or a rotation is still re-wrapping data keys")
            LocalKeyring.load(path).merged(args.bundle, prune=True)
            provider.reload()
            print(f"keyring {path}: only the bundle's key-encryption keys kept", file=sys.stderr)
        await provider.register()  # the key store learns which KEKs this gateway holds
    asyncio.run(with_key_provider(config, registered))
    return 0


def cmd_keys_gateways(args: argparse.Namespace) -> int:
    async def listing(provider: KeyringProvider, storage: Storage):
        return await storage.keys.gateways()
    rows = asyncio.run(with_key_provider(_key_config(args), listing))
    head = ("GATEWAY", "KEY ID", "KEKS", "REGISTERED")
    table = [(g.gateway_id, g.key_id, ",".join(g.kek_ids), g.registered_at) for g in rows]
    widths = [max(len(r[c]) for r in [head, *table]) for c in range(len(head))]
    for row in [head, *table]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


# --- migrate --------------------------------------------------------------------------------

def cmd_migrate(args: argparse.Namespace) -> int:
    """The database's schema first (PostgreSQL), then an old keyring file's data keys into the
    key store (both also happen when the gateway starts)."""
    config = _key_config(args)
    where, applied = asyncio.run(migrate(config))
    print(f"{where}: " + (f"applied {', '.join(applied)}" if applied else "schema up to date"), file=sys.stderr)
    if keyring_path(config).exists():
        async def attached(provider: KeyringProvider, _storage: Storage) -> dict:
            return provider.moved
        moved = asyncio.run(with_key_provider(config, attached))
        print(f"keyring: {moved['keys']} data key(s) and {moved['tombstones']} tombstone(s) moved into the key store",
              file=sys.stderr)
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    out = {}
    if args.host is not None:
        out["server.host"] = args.host
    if args.port is not None:
        out["server.port"] = args.port
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medicon-gateway", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text",
                        help="text (the default) or json: one JSON object a line, for log pipelines")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML config file (default: $MEDICON_CONFIG)")
        p.add_argument("--host", help="listen address (overrides server.host)")
        p.add_argument("--port", type=int, help="listen port, 0 for any free one (overrides server.port)")

    serve = sub.add_parser("serve", help="run the gateway in front of a Kubo node")
    common(serve)
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # one of server.workers (gateway.workers)
    serve.set_defaults(func=cmd_serve)

    dev = sub.add_parser("dev", help="start a managed local Kubo and the gateway in front of it")
    common(dev)
    dev.add_argument("--data-dir", default=".medicon-dev", help="where the dev Kubo repo lives")
    dev.add_argument("--online", action="store_true", help="let the dev Kubo join the IPFS network")
    dev.add_argument("--sites", type=int, default=1, metavar="N",
                     help="N sites: PostgreSQL, N Kubo nodes in a private swarm and N gateways replicating "
                          "to each other (each site's URL and token printed)")
    dev.add_argument("--replicas", type=int, default=None, metavar="R",
                     help="with --sites: nodes a record is pinned on before it is acknowledged (default 2)")
    dev.set_defaults(func=cmd_dev)

    token = sub.add_parser("token", help="create, list or revoke API tokens")
    store_opts = argparse.ArgumentParser(add_help=False)
    # Accepted before or after the action (`token --data-dir D list` or `token list --data-dir D`).
    for p, default in ((token, None), (store_opts, argparse.SUPPRESS)):
        p.add_argument("--config", default=default, help="TOML config file (default: $MEDICON_CONFIG)")
        p.add_argument("--data-dir", default=default,
                       help="the gateway's records.data_dir (default: from the config)")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[store_opts],
                                help="create a token; it is printed once, as MEDICON_TOKEN=... on stdout")
    create.add_argument("name", help="unique name of the token (who or what uses it)")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--patient", action="append", metavar="P",
                        help="restrict to this patient (repeatable; a patient token needs exactly one)")
    create.add_argument("--episode", action="append", metavar="E", help="restrict to this episode (repeatable)")
    create.add_argument("--expires-in", metavar="DURATION", help="e.g. 30d, 12h, 15m, 3600s (default: never)")
    create.set_defaults(func=cmd_token_create)
    lst = actions.add_parser("list", parents=[store_opts], help="list tokens (never their secrets)")
    lst.add_argument("--live", action="store_true", help="leave revoked tokens out")
    lst.add_argument("--json", action="store_true", help="JSON instead of a table")
    lst.set_defaults(func=cmd_token_list)
    revoke = actions.add_parser("revoke", parents=[store_opts], help="revoke a token at once")
    revoke.add_argument("name_or_id")
    revoke.set_defaults(func=cmd_token_revoke)

    chk = sub.add_parser("check", help="compare the head store with Kubo; --repair re-pins and cleans up")
    chk.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    chk.add_argument("--data-dir", default=None, help="the gateway's records.data_dir")
    chk.add_argument("--repair", action="store_true", help="pin unpinned records, unpin orphans left by crashed appends")
    chk.set_defaults(func=cmd_check)

    imp = sub.add_parser("import", help="append the records of a JSON-lines file, in order, with progress")
    imp.add_argument("file", help="one record (a JSON object) a line")
    imp.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    imp.add_argument("--data-dir", default=None, help="the gateway's records.data_dir")
    imp.add_argument("--key-prefix", help="idempotency keys are <prefix>:<line> (default: the file's name): "
                                          "run the same import again to resume it")
    imp.add_argument("--as", dest="as_name", help="the name the records are signed and audited as (cli:<name>; "
                                                  "default: the OS user)")
    imp.add_argument("--keep-going", action="store_true", help="go on after a refused record (report them all)")
    imp.set_defaults(func=cmd_import)

    keys = sub.add_parser("keys", help="the keys: init, rotate, shred, export, join, gateways")
    key_opts = argparse.ArgumentParser(add_help=False)
    key_opts.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    key_opts.add_argument("--data-dir", default=None, help="the gateway's records.data_dir")
    key_actions = keys.add_subparsers(dest="action", required=True)
    init = key_actions.add_parser("init", parents=[key_opts], help="create the key file (0600)")
    init.add_argument("--gateway-id", help="this gateway's name in signatures (default: host name + random)")
    init.set_defaults(func=cmd_keys_init)
    rotate = key_actions.add_parser("rotate", parents=[key_opts],
                                    help="new key-encryption key; data keys re-wrapped in batches")
    rotate.add_argument("--batch", type=int, default=1000, help="data keys re-wrapped per transaction")
    rotate.add_argument("--force", action="store_true",
                        help="rotate even if other registered gateways do not hold the new key yet")
    rotate.set_defaults(func=cmd_keys_rotate)
    shred = key_actions.add_parser("shred", parents=[key_opts],
                                   help="destroy a patient's data key: crypto-shredding, for erasure")
    shred.add_argument("--patient", required=True)
    shred.set_defaults(func=cmd_keys_shred)
    export = key_actions.add_parser("export", parents=[key_opts],
                                    help="write the shared keys (no signing key) for `keys join` at another site")
    export.add_argument("--out", required=True, help="the bundle file to create (0600)")
    export.set_defaults(func=cmd_keys_export)
    join = key_actions.add_parser("join", parents=[key_opts],
                                  help="create this gateway's key file from a bundle (own signing key), "
                                       "or --update one with the bundle's key-encryption keys")
    join.add_argument("bundle", help="a file of `keys export`")
    join.add_argument("--gateway-id", help="this gateway's name in signatures (default: host name + random)")
    join.add_argument("--update", action="store_true", help="take the bundle's KEKs into the existing key file")
    join.add_argument("--prune", action="store_true",
                      help="with --update: keep only the bundle's KEKs (after a rotation finished)")
    join.set_defaults(func=cmd_keys_join)
    key_actions.add_parser("gateways", parents=[key_opts],
                           help="the gateways registered with the key store (who signs records)"
                           ).set_defaults(func=cmd_keys_gateways)

    mig = sub.add_parser("migrate", help="bring the database to this version's schema; move keyring "
                                         "data keys into the key store")
    mig.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    mig.add_argument("--data-dir", default=None, help="the gateway's records.data_dir")
    mig.set_defaults(func=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format, sys.stderr)
    if getattr(args, "config", None) is None:
        args.config = os.environ.get("MEDICON_CONFIG")
    try:
        return args.func(args)
    except (ConfigError, KuboError, KeyringError) as exc:
        print(f"medicon-gateway: error: {exc}", file=sys.stderr)
        return 2
    except MediconError as exc:
        print(f"medicon-gateway: error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"medicon-gateway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
