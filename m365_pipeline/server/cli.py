"""``m365-serve``: the Dashboard API and page on port 5400, over HTTP or HTTPS.

granian (a Rust HTTP server) carries the connections, so idle, slow and TLS clients never
hold up others; the Python app answers from precomputed bytes (``/changes`` and ``/history?org``
are made from the published version's files, see ``server/routes.py``); idle connections are closed
by ``server/connections.py``.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import re
import resource
import socket
import ssl
import sys
from pathlib import Path

from m365_pipeline import settings
from m365_pipeline.publishing import current_version_dir, export_dir

from .access import CORS_ORIGINS_VARIABLE, TOKENS_FILE_VARIABLE, TokensFileError, add_token, read_tokens
from .connections import HEAD_TIMEOUT_S, KEEP_ALIVE_TIMEOUT_S, MAX_CONNECTIONS_PER_CLIENT, WATCH_VARIABLE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m365-serve", description="Serve the M365 Usage Dashboard API and page.",
                                     epilog="m365-serve token add NAME --tokens-file PATH: make a token (rule 17)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5400, help="port (default: 5400)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory holding export/ (default: $M365_DATA_DIR or ./data)")
    parser.add_argument("--certfile", type=Path, help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--keyfile", type=Path, help="PEM private key for --certfile")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    who = parser.add_argument_group("who may read (rule 17)")
    who.add_argument("--tokens-file", type=Path, default=None, metavar="PATH",
                     help=f"every request needs a token of this file (default: ${TOKENS_FILE_VARIABLE}); make "
                          "one with `m365-serve token add NAME --tokens-file PATH`")
    who.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                     help="with tokens, a web origin (https://host[:port]) whose pages may read the API; "
                          "repeatable (without tokens every origin may)")
    who.add_argument("--allow-anonymous", action="store_true",
                     help="serve anyone who reaches a --host that is not a loopback address, without tokens")
    limits = parser.add_argument_group("connections (rule 18)")
    limits.add_argument("--head-timeout", type=float, default=HEAD_TIMEOUT_S, metavar="SECONDS",
                        help="close a connection that has not sent a complete request head in this time "
                             f"(default: {HEAD_TIMEOUT_S:g})")
    limits.add_argument("--keep-alive-timeout", type=float, default=KEEP_ALIVE_TIMEOUT_S, metavar="SECONDS",
                        help=f"close a kept-alive connection idle this long (default: {KEEP_ALIVE_TIMEOUT_S:g})")
    limits.add_argument("--max-connections-per-client", type=int, default=MAX_CONNECTIONS_PER_CLIENT, metavar="N",
                        help="connections one client address may hold; the excess is closed, idle ones first; "
                             f"0: no bound, e.g. behind a reverse proxy that bounds them (default: "
                             f"{MAX_CONNECTIONS_PER_CLIENT})")
    return parser


def _token_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m365-serve token", description="Manage the tokens m365-serve accepts.")
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="make a random token, store its SHA-256 and print the token once")
    add.add_argument("name", metavar="NAME", help="who or what the token is for, e.g. billing-laptop")
    add.add_argument("--tokens-file", type=Path, default=None, metavar="PATH",
                     help=f"the tokens file (default: ${TOKENS_FILE_VARIABLE}); created 0600")
    return parser


def token_main(argv: list[str]) -> None:
    args = _token_parser().parse_args(argv)
    path = args.tokens_file or (Path(os.environ[TOKENS_FILE_VARIABLE]) if os.environ.get(TOKENS_FILE_VARIABLE)
                                else None)
    if path is None:
        _fail(f"m365-serve token add needs --tokens-file PATH (or {TOKENS_FILE_VARIABLE})")
    try:
        token = add_token(path, args.name)
    except TokensFileError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write the tokens file {path}: {exc.strerror}")
    print(token)  # the only line on stdout, shown once: only its digest is kept
    print(f"m365-serve: token {args.name} added to {path}; it is in force within a second. Keep it now: "
          "it is not stored and cannot be shown again.", file=sys.stderr)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(args: argparse.Namespace) -> Path | None:
    """The tokens file in force, checked; refuses an anonymous listener beyond loopback (rule 17)."""
    path = args.tokens_file or (Path(os.environ[TOKENS_FILE_VARIABLE]) if os.environ.get(TOKENS_FILE_VARIABLE)
                                else None)
    if path is None:
        if not is_loopback(args.host) and not args.allow_anonymous:
            _fail(f"--host {args.host} is not a loopback address, so anyone who reaches it could read every "
                  f"customer's users: give --tokens-file PATH (or {TOKENS_FILE_VARIABLE}) so that every request "
                  "needs a token, or --allow-anonymous to serve without tokens")
        if args.cors_origin:
            _fail("--cors-origin narrows CORS when tokens are on; without --tokens-file every origin may read")
        return None
    try:
        tokens = read_tokens(path)
    except TokensFileError as exc:
        _fail(str(exc))
    if not tokens:
        _fail(f"the tokens file {path} holds no token; add one with `m365-serve token add NAME --tokens-file {path}`")
    for origin in args.cors_origin:
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
            _fail(f"--cors-origin {origin!r} is not an origin: scheme and host (and port), e.g. https://intranet.example")
    return path.resolve()


def _fail(message: str) -> None:
    print(f"m365-serve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _raise_open_files_limit() -> int:
    """The soft limit of open files raised to the hard one (systemd's default soft limit is 1024); the
    connections granian may hold, with room for the files being served."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return max(64, min(soft, 1 << 20) - 256)


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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        token_main(argv[1:])
        return
    args = _parser().parse_args(argv)
    if not 0 < args.port < 65536:
        _fail(f"--port must be between 1 and 65535, got {args.port}")
    if args.workers < 1:
        _fail("--workers must be at least 1")
    for option, value in (("--head-timeout", args.head_timeout), ("--keep-alive-timeout", args.keep_alive_timeout)):
        if not 0 < value <= 3600:
            _fail(f"{option} must be more than 0 and at most 3600 seconds, got {value:g}")
    if args.max_connections_per_client < 0:
        _fail(f"--max-connections-per-client must be 0 or more, got {args.max_connections_per_client}")
    data_dir = args.data_dir.resolve() if args.data_dir else settings.data_dir()
    try:  # a mistyped path would otherwise serve "nothing published yet" forever
        settings.existing_data_dir(data_dir, "--data-dir" if args.data_dir else settings.DATA_DIR_VARIABLE)
    except settings.DataDirError as exc:
        _fail(str(exc))
    tokens_file = check_access(args)
    check_tls(args.certfile, args.keyfile)
    check_port(args.host, args.port)

    from granian.constants import Interfaces, SSLProtocols
    from granian.http import HTTP1Settings
    from granian.server import Server

    # The factory reads these inside each worker process.
    os.environ["M365_DATA_DIR"] = str(data_dir)
    os.environ["M365_ACCESS_LOG"] = "0" if args.no_access_log else "1"
    os.environ[WATCH_VARIABLE] = (f"{args.port},{args.head_timeout},{args.keep_alive_timeout},"
                                  f"{args.max_connections_per_client}")
    if tokens_file is not None:
        os.environ[TOKENS_FILE_VARIABLE] = str(tokens_file)
    else:
        os.environ.pop(TOKENS_FILE_VARIABLE, None)
    os.environ[CORS_ORIGINS_VARIABLE] = "\n".join(args.cors_origin)
    connection_slots = _raise_open_files_limit() // args.workers
    scheme = "https" if args.certfile else "http"
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    published = current_version_dir(export_dir(data_dir))
    print(f"m365-serve: serving {scheme}://{shown_host}:{args.port}/ (dashboard) and /api/m365/* from "
          f"{export_dir(data_dir)}", flush=True)
    if tokens_file is not None:
        print(f"m365-serve: every request needs a token of {tokens_file}", flush=True)
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
        # granian stops accepting when this many connections are open: as many as descriptors allow, so
        # idle ones are closed by the connection watch (server/connections.py) before they can starve others.
        backpressure=connection_slots,
        # Our own access log (app.py) escapes what clients send; granian's would not.
        log_access=False,
        # hyper's head timer runs from the end of an answer on a kept-alive connection (so it is the keep-alive
        # timeout), and on a new one only from the first byte: a new connection's head is the watch's.
        http1_settings=HTTP1Settings(header_read_timeout=int(args.keep_alive_timeout * 1000), keep_alive=True),
        ssl_cert=args.certfile.resolve() if args.certfile else None,
        ssl_key=args.keyfile.resolve() if args.keyfile else None,
        websockets=False,
        ssl_protocol_min=SSLProtocols.tls12,
    )
    server.serve()


if __name__ == "__main__":
    main()
