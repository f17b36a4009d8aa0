"""Rule 19: a vendor whose error pages echo the request's headers (tokens included) leaks no token.

The simulator's ``echo_headers_on_error`` answers every error like a vendor's debug page: the request's
headers in the body, its token in ``X-Debug-Request-Token``. A good night meets it on 5xx that are retried;
the next night meets it on a source that goes down mid-pull, so the vendor's echoed page is the failure the
run and the alert report. The real nightly job runs twice from the CLI into a real ``DAGSTER_HOME`` (SQLite
storage, compute logs), with ``dagster-daemon`` sending the failure alert to a webhook on 127.0.0.1; then no
token, in any spelling, is in the data directory, ``DAGSTER_HOME``, the runs' output, the daemon's log or the
alert, and the good night is still what is published.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from m365_pipeline.demo import DAGSTER_YAML
from m365_pipeline.publishing import CURRENT, export_dir
from m365_pipeline.settings import ANALYTICS_FILE
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig

from .helpers import BIN, Receiver, token_leaks, written_bytes
from .test_alerts import run_id_of
from .test_unattended import ROOT, cli_env

pytestmark = pytest.mark.slow  # two nightly runs and a daemon's sensor ticks: about a minute

TOKENS = {"saas_token": "Zq9-SAAS-echo-needle-7a1", "reseller_token": "Zq9-RESELLER-echo-needle-4b2",
          "admin_token": "Zq9-ADMIN-echo-needle-9c3"}
SIZE = {"orgs": 3, "users_per_org": 4, "seed": 8}
# Retried 5xx on source S only, so source B's calls are counted exactly for ``down_after``.
FLAKY_S = {"echo_headers_on_error": True, "rate_5xx": 0.3, "scope": "saas"}
# The simulator's outage does not end: step and run retries would only wait (minutes) for the same failure,
# as the demo's runs turn them off. Short backoff keeps the client's own retries to seconds.
RUN_CONFIG = {"execution": {"config": {"retries": {"disabled": {}}}},
              "resources": {source: {"config": {"backoff_factor": 0.05}} for source in ("saas", "backup")}}
NO_RUN_RETRY = {"dagster/max_retries": "0"}


def nightly(env: dict[str, str], config: Path) -> subprocess.CompletedProcess:
    """The nightly job, run once from the CLI as an operator would."""
    return subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "m365_pipeline.definitions",
                           "-j", "nightly_refresh", "-c", str(config), "--tags", json.dumps(NO_RUN_RETRY)],
                          cwd=config.parent, env=env, capture_output=True, text=True,
                          timeout=180, check=False)


def published(data_dir: Path) -> dict[str, bytes | str]:
    """What is served: the current version's files, the link to it, the analysts' copy."""
    export = export_dir(data_dir)
    current = (export / CURRENT).resolve()
    state: dict[str, bytes | str] = {"current": os.readlink(export / CURRENT),
                                     ANALYTICS_FILE: (data_dir / ANALYTICS_FILE).read_bytes()}
    state.update({str(p.relative_to(current)): p.read_bytes() for p in sorted(current.rglob("*")) if p.is_file()})
    return state


def test_rule19_error_pages_echoing_request_headers_leave_no_token_in_files_sqlite_output_or_the_alert(tmp_path):
    config = tmp_path / "run_config.json"
    config.write_text(json.dumps(RUN_CONFIG))
    hook = Receiver()
    flaky = Simulator(SimulatorConfig(**SIZE, faults=FaultConfig(**FLAKY_S), **TOKENS), host="127.0.0.1", port=0)
    with contextlib.ExitStack() as stack:
        stack.callback(hook.server.shutdown)
        stack.enter_context(flaky)
        env = cli_env(tmp_path, flaky, M365_ALERT_WEBHOOK_URL=hook.url, M365_ALERT_FORMAT="json")
        home, data_dir = Path(env["DAGSTER_HOME"]), Path(env["M365_DATA_DIR"])
        (home / "dagster.yaml").write_text(DAGSTER_YAML)  # `make dev`'s instance: SQLite, run monitoring
        owners = list(flaky.dataset.backup_owners())
        secrets = [*TOKENS.values(), *(str(o["authentication_token"]) for o in owners)]
        good = nightly(env, config)
        assert good.returncode == 0, (good.stdout + good.stderr)[-3000:]
        assert flaky.stats()["faults"].get("echo_headers", 0) > 0, flaky.stats()
        before = published(data_dir)

        # Started once the run has created the instance's SQLite storage: two processes creating it at once
        # can leave its schema version table with two heads, and neither starts again.
        log = tmp_path / "daemon.log"
        with log.open("w") as out:
            daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT,
                                      env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # Source B answers its organizations step (GET /users, one detail per owner), then goes down from
            # the next step's first call: each failed call's echoed headers
            # hold an owner's token.
            down = FaultConfig(**FLAKY_S, down_after=1 + len(owners) + 1)
            with Simulator(SimulatorConfig(**SIZE, faults=down, **TOKENS), host="127.0.0.1", port=0) as sim:
                deadline = time.monotonic() + 150  # the failure sensor only sees runs after its first tick
                while "alert_on_failed_night" not in log.read_text():
                    assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
                bad = nightly({**env, **sim.env}, config)
                faults = sim.stats()["faults"]
            assert bad.returncode != 0, (bad.stdout + bad.stderr)[-3000:]
            messages = hook.wait_for(1, timeout=180)
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=60)

    # The echo really happened and its text is what the run and the alert report, scrubbed.
    assert faults.get("down", 0) > 0 and faults.get("echo_headers", 0) >= faults["down"], faults
    output = bad.stdout + bad.stderr
    assert "raw.backup_tenants: source B" in output and '"request_headers"' in output, output[-3000:]
    assert '"x-reseller-token":"[BACKUP_RESELLER_TOKEN]"' in output
    assert '"authorization":"Bearer [SAAS_API_TOKEN]"' in output  # source S went down as well
    assert [m["kind"] for m in messages] == ["failed"], messages
    alert = messages[0]
    assert alert["run_id"] == run_id_of(bad), (alert, output[-2000:])
    assert '"request_headers"' in alert["reason"] and "answered HTTP 503" in alert["reason"], alert
    assert "[BACKUP_RESELLER_TOKEN]" in alert["reason"] or "[SAAS_API_TOKEN]" in alert["reason"], alert

    # No token anywhere: files (SQLite event logs and run storage read raw, compute logs, DuckDB rows, the
    # export inflated), both runs' output, the daemon's log, the alert's bytes.
    blobs = {"good run output": (good.stdout + good.stderr).encode(), "bad run output": output.encode(),
             "daemon log": log.read_bytes(), **{f"alert {i}": body for i, body in enumerate(hook.bodies)},
             **written_bytes(data_dir, home)}
    assert any(p.endswith(".db") for p in blobs) and any("compute_logs" in p for p in blobs), sorted(blobs)
    assert any(p.endswith(ANALYTICS_FILE) for p in blobs), sorted(blobs)
    leaks = token_leaks(secrets, blobs)
    assert not leaks, f"a token leaked: {leaks}"

    # The failed night published nothing: the good night is still served.
    assert published(data_dir) == before
