"""Shared test helpers (no fixtures; those live in conftest.py): resources wired to a simulator,
whole-graph runs, reading DuckDB files, a webhook receiver, starting ``m365-serve``, making certificates and
a forward proxy."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import duckdb

from m365_pipeline.definitions import pipeline_resources
from m365_pipeline.resources import BackupApiResource, SaasApiResource
from m365_pipeline.settings import DUCKDB_FILE
from m365_pipeline.simulator import Simulator

# The venv's console scripts (dagster, m365-serve, duckdb, ...), next to the running interpreter.
BIN = Path(sys.executable).parent

# Every variable a source reads (resources fall back to them when their config leaves a field empty).
SOURCE_VARIABLES = (*SaasApiResource.env_fields.values(), *BackupApiResource.env_fields.values())

# Small, fast retry settings so fault tests finish in seconds.
FAST_HTTP = {"timeout_s": 5.0, "max_retries": 4, "backoff_factor": 0.01, "retry_after_max_s": 1}


def rule9(text: str) -> tuple[str, str]:
    """The contract's order (docs/RULES.md, rule 9): lower-cased, then the string itself, by code point."""
    return (text.lower(), text)


def rule16(cell: str) -> str:
    """A CSV text cell as docs/RULES.md rule 16 writes it (read here, not from api_bodies): a leading ' when
    it starts with = + - @, a tab or a CR."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


# -- resources and runs -------------------------------------------------------------------------

def make_resources(sim: Simulator | None, db_path: Path, *, saas: dict[str, Any] | None = None,
                   backup: dict[str, Any] | None = None, sources: tuple[str, ...] = ("saas", "backup")
                   ) -> dict[str, Any]:
    """The resources a run gets, pointing at ``sim``; ``sources`` chooses which vendors are configured.
    The run makes ``db_path``'s directory (its parent must exist), as a night does."""
    env = sim.env if sim else {}
    saas_cfg: dict[str, Any] = {**FAST_HTTP, **(saas or {})}
    backup_cfg: dict[str, Any] = {**FAST_HTTP, **(backup or {})}
    if "saas" in sources:
        saas_cfg = {"base_url": env["SAAS_API_BASE_URL"], "token": env["SAAS_API_TOKEN"], **saas_cfg}
    if "backup" in sources:
        backup_cfg = {"base_url": env["BACKUP_API_BASE_URL"], "reseller_token": env["BACKUP_RESELLER_TOKEN"],
                      "admin_token": env["BACKUP_ADMIN_TOKEN"], **backup_cfg}
    # The code location's own resources (its run lock and data-directory checks included), not look-alikes.
    return pipeline_resources(SaasApiResource(**saas_cfg), BackupApiResource(**backup_cfg), db_path)


def all_definitions() -> list[Any]:
    """Every asset and check of the code location (what the nightly job materializes)."""
    from m365_pipeline.assets.core import core_assets, core_checks
    from m365_pipeline.assets.coverage import coverage_assets, coverage_checks
    from m365_pipeline.assets.export import export_assets
    from m365_pipeline.assets.marts import marts_assets, marts_checks
    from m365_pipeline.assets.raw import raw_assets

    return [*raw_assets, *core_assets, *marts_assets, *coverage_assets, *export_assets, *core_checks, *marts_checks,
            *coverage_checks]


def run_pipeline(sim: Simulator | None, data_dir: Path, *, raise_on_error: bool = True, **kwargs: Any):
    """Materialize every asset and check into ``data_dir`` (as the nightly job does)."""
    from dagster import materialize

    policy = kwargs.pop("policy", None)
    resources = make_resources(sim, data_dir / DUCKDB_FILE, **kwargs)
    if policy is not None:
        resources["publish_policy"] = policy
    return materialize(all_definitions(), resources=resources, raise_on_error=raise_on_error)


# -- reading DuckDB files -----------------------------------------------------------------------

def query(db_path: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db_path), read_only=True) as conn:
        return conn.execute(sql, params or []).fetchall()


def dicts(db_path: Path, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """Like ``query``, each row a dict by column name."""
    with duckdb.connect(str(db_path), read_only=True) as conn:
        cursor = conn.execute(sql, params or [])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


# -- a webhook receiver ------------------------------------------------------------------------

class Receiver:
    """A webhook on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self, certificate: tuple[Path, Path] | None = None) -> None:
        """``certificate`` (cert, key) serves HTTPS instead, as a Slack or Teams webhook does."""
        self.bodies: list[bytes] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if certificate:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*certificate)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if certificate else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def messages(self) -> list[dict]:
        return [json.loads(body) for body in self.bodies]

    def wait_for(self, count: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        return self.messages()


# -- published data and a running m365-serve ----------------------------------------------------

@dataclass
class Published:
    data_dir: Path
    truth: dict[str, Any]


@dataclass
class Served:
    base_url: str
    port: int
    process: subprocess.Popen
    log_path: Path


def spawn_serve(data_dir: Path, port: int, log: IO[str], *extra: str) -> subprocess.Popen:
    """A real ``m365-serve`` process over ``data_dir`` on 127.0.0.1:``port``, output to ``log``."""
    return subprocess.Popen([str(BIN / "m365-serve"), "--port", str(port), "--data-dir", str(data_dir), *extra],
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def make_certificate(directory: Path, names: str = "IP:127.0.0.1,DNS:localhost") -> tuple[Path, Path]:
    """A self-signed certificate for ``names`` (subjectAltName), made by the test, valid one day."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", f"subjectAltName={names}", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


# -- nights at chosen dates ---------------------------------------------------------------------

_NIGHT_RUNNER = """
import json, os, sys, types
from pathlib import Path
from m365_pipeline_tests.helpers import run_pipeline
sim = types.SimpleNamespace(env=json.loads(os.environ["M365_TEST_SIM_ENV"]))
sys.exit(0 if run_pipeline(sim, Path(sys.argv[1]), raise_on_error=False).success else 3)
"""


def run_pipeline_at(sim: Simulator, data_dir: Path, moment: str, crash_at: str | None = None,
                    package_dir: Path | None = None) -> bool:
    """The whole graph in a child process whose clock starts at ``moment`` (UTC, libfaketime), as a
    night on that date would run; True when the run succeeded. The pipeline itself is unchanged.
    ``crash_at`` names a crash point (m365_pipeline.crashpoints) where the run is SIGKILLed.
    ``package_dir``: a directory holding a copy of the m365_pipeline package (with an edited
    license_rules.csv, say) that the child imports instead of the repository's."""
    import json
    import os

    path = [*([str(package_dir)] if package_dir else []), str(Path(__file__).resolve().parents[1]),
            os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "TZ": "UTC", "M365_TEST_SIM_ENV": json.dumps(sim.env), "PYTHONPATH": os.pathsep.join(path),
           "FAKETIME_DONT_FAKE_MONOTONIC": "1", **({"M365_CRASH_AT": crash_at} if crash_at else {})}
    done = subprocess.run(["faketime", "-f", f"@{moment}", sys.executable, "-c", _NIGHT_RUNNER, str(data_dir)],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=package_dir)  # python -c puts its working directory first on the path
    if crash_at and "Caught Killed" in done.stderr:  # faketime's word for its child's SIGKILL
        return False
    if done.returncode not in (0, 3):
        raise RuntimeError(f"night run at {moment} crashed: {done.stderr[-3000:]}")
    return done.returncode == 0


# -- rule 12, read independently of the SQL ------------------------------------------------------

def expected_changes(a: dict[str, dict], b: dict[str, dict]) -> list[dict[str, Any]]:
    """Rule 12, read independently of the SQL: each UPN's first applicable change, in rule 12's order."""
    rows = []
    for upn in a.keys() | b.keys():
        before, after = a.get(upn), b.get(upn)
        if before is None:
            kind = "added"
        elif after is None:
            kind = "removed"
        elif before["organization_name"] != after["organization_name"]:
            kind = "moved"
        elif before["has_email_license"] != after["has_email_license"]:
            kind = "email_gained" if after["has_email_license"] else "email_lost"
        elif before["licenses"] != after["licenses"]:
            kind = "licenses_changed"
        else:
            continue
        shown = after or before
        rows.append({
            "organization_name": shown["organization_name"],
            "previous_organization_name": before["organization_name"] if kind == "moved" else None,
            "user_principal_name": upn, "display_name": shown["display_name"], "change": kind,
            "licenses_before": before and before["licenses"], "licenses_after": after and after["licenses"],
            "has_email_license_before": before and before["has_email_license"],
            "has_email_license_after": after and after["has_email_license"],
        })
    return sorted(rows, key=lambda r: (rule9(r["organization_name"]), rule9(r["user_principal_name"])))


# -- a forward proxy ----------------------------------------------------------------------------

@dataclass
class ForwardProxy:
    """A running tinyproxy on 127.0.0.1. ``url`` carries the credentials when it requires them."""

    port: int
    log_path: Path
    credentials: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.credentials[0]}:{self.credentials[1]}@" if self.credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """``METHOD target`` of every request it was sent, from its own log (``CONNECT host:port`` for HTTPS)."""
        import re

        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [f"{method} {target}" for method, target in
                re.findall(r"Request \(file descriptor \d+\): (\S+) (\S+)", text)]


@contextlib.contextmanager
def forward_proxy(directory: Path, credentials: tuple[str, str] | None = None) -> Iterator[ForwardProxy]:
    """A real forward proxy process (Debian's ``tinyproxy``, scripts/system-packages.sh) on a free loopback
    port: it forwards plain HTTP and tunnels CONNECT to any port; with ``credentials`` (user, password) it
    answers 407 without them. Stopped when the block ends."""
    from m365_pipeline.processes import free_port, wait_for_port

    directory.mkdir(parents=True, exist_ok=True)
    port, log_path = free_port(), directory / "tinyproxy.log"
    lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 30", f'LogFile "{log_path}"', "LogLevel Info",
             "MaxClients 64", "Allow 127.0.0.1", *([f"BasicAuth {credentials[0]} {credentials[1]}"] if credentials
                                                 else [])]
    config = directory / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    with (directory / "tinyproxy.out").open("w") as out:
        proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, timeout=15)
        yield ForwardProxy(port, log_path, credentials)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- secrets: where a token could have been written -----------------------------------------------

def spellings(secret: str) -> set[bytes]:
    """The byte strings a leaked ``secret`` shows as: as is, URL-encoded, JSON-escaped, and the part of its
    base64 that holds at every alignment (an ``Authorization: Basic`` header, say). Computed here, not with the
    scrubber's own list of forms (m365_pipeline/scrub.py), so a form the scrubber forgot is still caught."""
    import base64
    from urllib.parse import quote

    forms = {secret, quote(secret, safe=""), json.dumps(secret)[1:-1]}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret.encode()).decode()
        core = encoded[4 if offset else 0: len(encoded) - (4 if (offset + len(secret.encode())) % 3 else 0)]
        if len(core) >= 8:  # long enough not to turn up by chance
            forms |= {core, core.replace("+", "-").replace("/", "_")}
    return {form.encode() for form in forms}


def written_bytes(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` as bytes (SQLite files and their WAL read raw, so deleted rows count too),
    plus what compression hides: gzip files inflated, and each DuckDB or Parquet file's rows as text (DuckDB
    compresses strings in its pages)."""
    import gzip

    blobs: dict[str, bytes] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file():
                continue
            blobs[str(path)] = data = path.read_bytes()
            if path.suffix == ".gz":
                blobs[f"{path} (inflated)"] = gzip.decompress(data)
            elif path.suffix in (".duckdb", ".parquet") and data:
                blobs[f"{path} (rows)"] = _rows_as_text(path).encode()
    return blobs


def _rows_as_text(path: Path) -> str:
    if path.suffix == ".parquet":
        with duckdb.connect() as conn:
            return repr(conn.execute("SELECT * FROM read_parquet(?)", [str(path)]).fetchall())
    with duckdb.connect(str(path), read_only=True) as conn:
        tables = conn.execute("SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = "
                              "current_database()").fetchall()
        quoted = ('"{}"."{}"'.format(*(name.replace('"', '""') for name in names)) for names in tables)
        return "\n".join(repr(conn.execute(f"SELECT * FROM {name}").fetchall()) for name in quoted)


def token_leaks(secrets: list[str], blobs: dict[str, bytes]) -> dict[str, list[str]]:
    """Secret -> where any of its ``spellings`` was found (empty when nothing leaked)."""
    found = {secret: [where for where, blob in blobs.items() if any(form in blob for form in spellings(secret))]
             for secret in secrets}
    return {secret: where for secret, where in found.items() if where}
