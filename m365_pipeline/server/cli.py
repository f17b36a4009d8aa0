"""``m365-serve``: the Dashboard API and page on port 5400, over HTTP or HTTPS.

granian (a Rust HTTP server) carries the connections, so idle, slow and TLS clients never
hold up others; the Python app answers from precomputed bytes (``/changes`` and ``/history?org``
are made from the published version's files, see ``server/app.py``).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import ssl
import sys
from pathlib import Path

from m365_pipeline import settings
from m365_pipeline.publishing import current_version_dir, export_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m365-serve", description="Serve the M365 Usage Dashboard API and page.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5400, help="port (default: 5400)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory holding export/ (default: $M365_DATA_DIR or ./data)")
    parser.add_argument("--certfile", type=Path, help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--keyfile", type=Path, help="PEM private key for --certfile")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    return parser


def _fail(message: str) -> None:
    print(f"m365-serve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_port(host: str, port: int) -> None:
    """Fail early and plainly when the port is taken, instead of deep inside the server."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                _fail(f"port {port} on {host} is already in use; stop the other server or pass --port")
            _fail(f"cannot listen on {host}:{port}: {exc.strerror}")


def check_tls(certfile: Path | None, keyfile: Path | None) -> None:
    if certfile is None and keyfile is None:
        return
    if certfile is None or keyfile is None:
        _fail("HTTPS needs both --certfile and --keyfile")
    for label, path in (("certificate", certfile), ("key", keyfile)):
        if not path.is_file() or not os.access(path, os.R_OK):
            _fail(f"cannot read the {label} file {path}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, ValueError) as exc:
        _fail(f"the certificate {certfile} and key {keyfile} cannot be used together: {exc}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if not 0 < args.port < 65536:
        _fail(f"--port must be between 1 and 65535, got {args.port}")
    if args.workers < 1:
        _fail("--workers must be at least 1")
    data_dir = args.data_dir.resolve() if args.data_dir else settings.data_dir()
    try:  # a mistyped path would otherwise serve "nothing published yet" forever
        settings.existing_data_dir(data_dir, "--data-dir" if args.data_dir else settings.DATA_DIR_VARIABLE)
    except settings.DataDirError as exc:
        _fail(str(exc))
    check_tls(args.certfile, args.keyfile)
    check_port(args.host, args.port)

    from granian.constants import Interfaces, SSLProtocols
    from granian.http import HTTP1Settings
    from granian.server import Server

    # The factory reads these inside each worker process.
    os.environ["M365_DATA_DIR"] = str(data_dir)
    os.environ["M365_ACCESS_LOG"] = "0" if args.no_access_log else "1"
    scheme = "https" if args.certfile else "http"
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    published = current_version_dir(export_dir(data_dir))
    print(f"m365-serve: serving {scheme}://{shown_host}:{args.port}/ (dashboard) and /api/m365/* from "
          f"{export_dir(data_dir)}", flush=True)
    if published is None:
        print("m365-serve: nothing published yet; the API answers 404 until a pipeline run publishes",
              flush=True)
    server = Server(
        "m365_pipeline.server.app:create_app",
        address=args.host,
        port=args.port,
        interface=Interfaces.RSGI,
        factory=True,
        workers=args.workers,
        backlog=2048,
        # Our own access log (app.py) escapes what clients send; granian's would not.
        log_access=False,
        http1_settings=HTTP1Settings(header_read_timeout=10_000),
        ssl_cert=args.certfile.resolve() if args.certfile else None,
        ssl_key=args.keyfile.resolve() if args.keyfile else None,
        websockets=False,
        ssl_protocol_min=SSLProtocols.tls12,
    )
    server.serve()


if __name__ == "__main__":
    main()
