"""``medicon-gateway``: run the gateway (``serve``) or a complete local setup (``dev``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from .app import create_app
from .config import Config, ConfigError, load_config
from .kubo import KuboError, KuboNode

log = logging.getLogger("medicon_gateway")

# aiohttp's parser limits, kept explicit: a giant header line is refused with 400/431.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190


async def run_server(config: Config, *, announce=None) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting and let in-flight requests finish
    within ``server.shutdown_timeout``."""
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=config.server.shutdown_timeout,
                           max_line_size=MAX_LINE_SIZE, max_field_size=MAX_FIELD_SIZE)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port)
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
    finally:
        log.info("shutting down")
        await runner.cleanup()


def _announce(host: str, port: int) -> None:
    shown = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1", "localhost") else host
    print(f"MEDICON_GATEWAY_URL=http://{shown}:{port}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=_overrides(args))
    asyncio.run(run_server(config, announce=_announce))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """A managed local Kubo (offline, loopback, its own repo) with the gateway in front."""
    data_dir = Path(args.data_dir).resolve()
    node = KuboNode(data_dir / "kubo", offline=not args.online)
    node.start()
    print(f"kubo {node.version()} running, repo {node.repo} (API {node.api_url}, not for clients)",
          file=sys.stderr, flush=True)
    try:
        overrides = {"kubo.api_url": node.api_url, "kubo.gateway_url": node.gateway_url,
                     "records.data_dir": str(data_dir / "records"), **_overrides(args)}
        config = load_config(args.config, overrides=overrides)
        asyncio.run(run_server(config, announce=_announce))
    finally:
        node.stop()
        print("kubo stopped", file=sys.stderr, flush=True)
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
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML config file (default: $MEDICON_CONFIG)")
        p.add_argument("--host", help="listen address (overrides server.host)")
        p.add_argument("--port", type=int, help="listen port, 0 for any free one (overrides server.port)")

    serve = sub.add_parser("serve", help="run the gateway in front of a Kubo node")
    common(serve)
    serve.set_defaults(func=cmd_serve)

    dev = sub.add_parser("dev", help="start a managed local Kubo and the gateway in front of it")
    common(dev)
    dev.add_argument("--data-dir", default=".medicon-dev", help="where the dev Kubo repo lives")
    dev.add_argument("--online", action="store_true", help="let the dev Kubo join the IPFS network")
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.config is None:
        args.config = os.environ.get("MEDICON_CONFIG")
    try:
        return args.func(args)
    except (ConfigError, KuboError) as exc:
        print(f"medicon-gateway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
