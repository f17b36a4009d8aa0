"""Alerts reach a webhook on 127.0.0.1: a failed night, a held-back night, a missed night; never a token."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dagster import build_sensor_context

from m365_pipeline.alerts import FORMATS, WEBHOOK_VARIABLE, Alert, payload, reason_text, send
from m365_pipeline.definitions import NIGHTLY_JOB
from m365_pipeline.demo import DAGSTER_YAML
from m365_pipeline.publishing import CURRENT, MANIFEST, VERSIONS, export_dir
from m365_pipeline.scrub import remember_secret
from m365_pipeline.sensors import FAILURE_SENSOR, alert_on_missed_night

from .helpers import BIN, Receiver, forward_proxy, make_certificate
from .test_unattended import ROOT, cli_env, materialize_all

UI = "http://127.0.0.1:3999/dagster"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.server.shutdown()


def run_id_of(proc: subprocess.CompletedProcess) -> str:
    match = re.search(r" - ([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}) - ", proc.stderr + proc.stdout)
    assert match, (proc.stdout + proc.stderr)[-2000:]
    return match[1]


@contextlib.contextmanager
def daemon_watching(env: dict[str, str], tmp_path: Path) -> Iterator[None]:
    """A dagster-daemon on env's instance, past its failure sensor's first tick (it only sees runs after it)."""
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while FAILURE_SENSOR not in log.read_text():
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)


@pytest.mark.slow
def test_the_daemon_alerts_once_for_a_held_back_and_a_failed_cli_night_and_never_for_a_good_one(
        start_simulator, tmp_path, receiver, unused_port):
    sim = start_simulator(orgs=4, users_per_org=6, seed=8)
    env = cli_env(tmp_path, sim, M365_ALERT_WEBHOOK_URL=receiver.url, M365_DAGSTER_UI_URL=UI + "/",
                  M365_ALERT_FORMAT="json")
    (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text(DAGSTER_YAML)
    with daemon_watching(env, tmp_path):
        good = materialize_all(env, tmp_path)
        assert good.returncode == 0, (good.stdout + good.stderr)[-3000:]
        without_s = {k: v for k, v in env.items() if k != "SAAS_API_BASE_URL"}
        held = materialize_all(without_s, tmp_path)
        assert held.returncode != 0
        down = materialize_all({**env, "SAAS_API_BASE_URL": f"http://127.0.0.1:{unused_port}/v1"}, tmp_path,
                               {"resources": {"saas": {"config": {"max_retries": 0}}}})
        assert down.returncode != 0

        messages = receiver.wait_for(2, timeout=120)
        time.sleep(35)  # one more sensor interval: nothing else (the good night) may arrive
        messages = receiver.messages()
    assert [m["kind"] for m in messages] == ["held_back", "failed"], messages
    held_alert, failed_alert = messages
    assert held_alert["run_id"] == run_id_of(held) and failed_alert["run_id"] == run_id_of(down)
    assert held_alert["link"] == f"{UI}/runs/{held_alert['run_id']}"
    assert "no_source_went_missing" in held_alert["reason"] and "SAAS_API_BASE_URL" in held_alert["reason"]
    assert held_alert["step"] == "marts__org_summary_no_source_went_missing"
    assert failed_alert["step"] == "raw__saas_users" and "cannot reach source S" in failed_alert["reason"]
    raw = b"".join(receiver.bodies).decode()
    for token in (sim.config.saas_token, sim.config.reseller_token, sim.config.admin_token):
        assert token not in raw


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_night_that_does_not_fit_its_time_limit_is_stopped_and_named_in_the_alert(
        start_simulator, tmp_path, receiver):
    import yaml
    from dagster import DagsterInstance

    sim = start_simulator(orgs=4, users_per_org=100, seed=8, latency_ms=3000)  # a pull of about a minute
    env = cli_env(tmp_path, sim, M365_ALERT_WEBHOOK_URL=receiver.url, M365_ALERT_FORMAT="json")
    home = Path(env["DAGSTER_HOME"])
    dev = yaml.safe_load(DAGSTER_YAML)  # make dev's instance, run monitoring polling every 2 s
    dev["run_monitoring"]["poll_interval_seconds"] = 2
    (home / "dagster.yaml").write_text(yaml.safe_dump(dev))
    with daemon_watching(env, tmp_path):
        # The scheduled night's path: queued, launched by the daemon in its code server, with a 10 s limit.
        launch = subprocess.run([str(BIN / "dagster"), "job", "launch", "-w", "workspace.yaml", "-j", NIGHTLY_JOB,
                                 "--tags", json.dumps({"dagster/max_runtime_seconds": "10"})],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert launch.returncode == 0, (launch.stdout + launch.stderr)[-3000:]
        messages = receiver.wait_for(1, timeout=180)
        with DagsterInstance.from_config(str(home)) as instance:
            run = instance.get_run_records(limit=1)[0].dagster_run
            assert run.status.value == "FAILURE"
    assert [m["kind"] for m in messages] == ["failed"] and messages[0]["run_id"] == run.run_id, messages
    reason = messages[0]["reason"]
    assert "did not fit in its time limit" in reason and "after 10 s" in reason, reason
    assert "max_runtime_seconds" in reason and "How long a night takes" in reason, reason
    assert messages[0]["step"].startswith("raw__"), messages  # stopped mid-pull (either source), named where
    assert not (export_dir(tmp_path / "data") / CURRENT).exists()  # nothing half-made was published


def _publish_old_version(data_dir: Path, version: str, published_at: str) -> None:
    root = export_dir(data_dir)
    (root / VERSIONS / version).mkdir(parents=True)
    (root / VERSIONS / version / MANIFEST).write_text(json.dumps({"version": version, "published_at": published_at}))
    (root / CURRENT).symlink_to(Path(VERSIONS) / version)


def test_a_missed_night_is_alerted_once_per_published_version(tmp_path, monkeypatch, receiver):
    monkeypatch.setenv("M365_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("M365_ALERT_WEBHOOK_URL", receiver.url)
    fresh = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    _publish_old_version(tmp_path / "data", "v-fresh", fresh)
    assert "last published 1.0 h ago" in alert_on_missed_night(build_sensor_context()).skip_message
    (export_dir(tmp_path / "data") / CURRENT).unlink()
    _publish_old_version(tmp_path / "data", "v-old", "2026-01-01T23:00:00Z")
    first = alert_on_missed_night(build_sensor_context())
    assert receiver.messages()[0]["kind"] == "missed" and "v-old" in receiver.messages()[0]["reason"]
    assert "sent" in first.skip_message
    again = alert_on_missed_night(build_sensor_context(cursor="v-old"))
    assert "already alerted" in again.skip_message and len(receiver.bodies) == 1


def test_alert_payloads_fit_slack_and_teams_incoming_webhooks_and_carry_no_token(monkeypatch):
    monkeypatch.setenv("SAAS_API_TOKEN", "sekret-token-123")
    monkeypatch.setenv("M365_DAGSTER_UI_URL", UI)
    alert = Alert("failed", "GET /users failed with sekret-token-123 in it", "nightly_refresh", "r-1", "raw__x")
    slack = payload(alert, "slack")
    assert set(slack) == {"text"} and "the nightly run failed" in slack["text"]
    assert f"<{UI}/runs/r-1|Open the run in Dagster>" in slack["text"]
    teams = payload(alert, "teams")
    attachment = teams["attachments"][0]
    assert teams["type"] == "message" and attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert attachment["content"]["type"] == "AdaptiveCard"
    assert attachment["content"]["actions"][0]["url"] == f"{UI}/runs/r-1"
    for body in (slack, teams, payload(alert, "json")):
        assert "sekret-token-123" not in json.dumps(body) and "[SAAS_API_TOKEN]" in json.dumps(body)
    assert reason_text("x" * 5000).endswith(" ...")


@pytest.mark.parametrize("fmt", FORMATS)
def test_alert_payloads_in_every_format_scrub_each_configured_and_learned_token(start_simulator, monkeypatch, fmt):
    """Rule 19: the reason is what a vendor's debug page sent back (the simulator's, over HTTP: every request
    header and X-Debug-Request-Token), plus the admin token in an echoed Basic header; no token survives in the
    JSON, Slack or Teams payload, and each is named by its variable or as an owner token."""
    sim = start_simulator(orgs=3, users_per_org=4, echo_headers_on_error=True, rate_5xx=1.0, scope="backup",
                          max_faults_per_url=100)
    configured = {"SAAS_API_TOKEN": sim.config.saas_token, "BACKUP_RESELLER_TOKEN": sim.config.reseller_token,
                  "BACKUP_ADMIN_TOKEN": sim.config.admin_token}
    for name, value in configured.items():
        monkeypatch.setenv(name, value)
    owner = sim.dataset.owners[0]
    remember_secret(owner.token)  # as the client does when GET /users/{id} hands it over
    page = requests.get(f"{sim.backup_base_url}/users/{owner.id}/tenants", timeout=10, headers={
        "X-Reseller-Token": sim.config.reseller_token, "X-Access-Token": owner.token,
        "Authorization": f"Bearer {sim.config.saas_token}"})
    assert page.status_code >= 500 and owner.token in page.text and sim.config.reseller_token in page.text
    basic = base64.b64encode(f"admin:{sim.config.admin_token}".encode()).decode()
    reason = (f"GET /users/{owner.id}/tenants answered HTTP {page.status_code}: {page.text} "
              f"(X-Debug-Request-Token: {page.headers['X-Debug-Request-Token']}; Authorization: Basic {basic})")
    shown = json.dumps(payload(Alert("failed", reason, "nightly_refresh", "r-1", "raw__backup_tenants"), fmt))
    for value in (*configured.values(), owner.token, basic):
        assert value not in shown
    for label in (*configured, "owner token"):
        assert f"[{label}]" in shown
    assert f"/users/{owner.id}/tenants answered HTTP {page.status_code}" in shown  # the rest still reads


def test_a_token_straddling_the_reason_cut_is_scrubbed_before_the_cut(monkeypatch):
    token = "tok-" + "9" * 40
    monkeypatch.setenv("BACKUP_ADMIN_TOKEN", token)
    shown = reason_text("x" * 1480 + token + " and more")
    assert "9" * 8 not in shown and shown.endswith(" ...") and "[BACKUP_ADMIN_TOKEN]" in shown


# -- alerts behind an egress proxy (issue 24): a real tinyproxy process -------------------------------------

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


@pytest.fixture
def no_proxy_settings(monkeypatch):
    for name in PROXY_VARIABLES:
        for variant in (name, name.lower()):
            monkeypatch.delenv(variant, raising=False)


def _send(monkeypatch, url: str) -> bool:
    monkeypatch.setenv(WEBHOOK_VARIABLE, url)
    return send(Alert("failed", "the night failed", "nightly_refresh", "r-1", "raw__saas_users"))


@pytest.mark.parametrize("tls", [False, True], ids=["http-webhook", "https-webhook-through-connect"])
def test_the_webhook_is_reached_through_the_proxy_and_no_proxy_bypasses_it(tmp_path, monkeypatch,
                                                                          no_proxy_settings, tls):
    certificate = make_certificate(tmp_path) if tls else None
    hook = Receiver(certificate)
    if certificate:
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # the test's own CA, as an MSP's would be
    try:
        with forward_proxy(tmp_path / "proxy") as proxy:
            monkeypatch.setenv("HTTPS_PROXY" if tls else "HTTP_PROXY", proxy.url)
            assert _send(monkeypatch, hook.url)
            through = f"CONNECT 127.0.0.1:{hook.server.server_address[1]}" if tls else f"POST {hook.url}"
            assert proxy.requests() == [through] and hook.messages()[0]["kind"] == "failed"
            monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
            assert _send(monkeypatch, hook.url)
            assert proxy.requests() == [through] and len(hook.bodies) == 2  # straight to the webhook
    finally:
        hook.server.shutdown()


@pytest.mark.parametrize("tls", [False, True], ids=["http-webhook", "https-webhook-through-connect"])
def test_proxy_credentials_are_sent_to_the_proxy_and_never_shown(tmp_path, monkeypatch, no_proxy_settings, tls):
    certificate = make_certificate(tmp_path) if tls else None
    hook = Receiver(certificate)
    if certificate:
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    variable = "HTTPS_PROXY" if tls else "HTTP_PROXY"
    try:
        with forward_proxy(tmp_path / "proxy", credentials=("alice", "pr0xy-pa55")) as proxy:
            monkeypatch.setenv(variable, proxy.url)
            assert _send(monkeypatch, hook.url) and len(hook.bodies) == 1
            monkeypatch.setenv(variable, proxy.url.replace("pr0xy-pa55", "wr0ng-pa55"))
            with pytest.raises(RuntimeError) as refused:
                _send(monkeypatch, hook.url)
    finally:
        hook.server.shutdown()
    message = str(refused.value)
    assert variable in message and len(hook.bodies) == 1
    if tls:  # the CONNECT's refusal (tinyproxy: 401 for wrong credentials, 407 for none); refusing a POST it
        assert re.search(r"Tunnel connection failed: 40[17]", message)  # closes before reading it: a reset
    assert "pa55" not in message and "alice" not in message and "/hook" not in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_a_proxy_nobody_answers_fails_naming_the_variable(monkeypatch, no_proxy_settings, unused_port, caplog):
    monkeypatch.setenv("HTTP_PROXY", f"http://bob:hunter22@127.0.0.1:{unused_port}")
    with pytest.raises(RuntimeError) as failure:
        _send(monkeypatch, "http://127.0.0.1:9/secret-hook-path")
    message = str(failure.value)
    assert "could not be reached through the proxy HTTP_PROXY names" in message and WEBHOOK_VARIABLE in message
    assert "hunter22" not in message and "secret-hook-path" not in message
    retried = [record.getMessage() for record in caplog.records if record.name.startswith("urllib3")]
    assert len(retried) == 3 and all(f"[{WEBHOOK_VARIABLE}]" in line for line in retried)  # urllib3's own log
    assert not any("secret-hook-path" in line or "hunter22" in line for line in retried)


@pytest.mark.parametrize("proxy", ["socks5://bob:hunter22@127.0.0.1:1080", "http://"])
def test_a_proxy_setting_that_is_not_a_proxy_url_is_one_line_naming_the_variable(monkeypatch, no_proxy_settings,
                                                                                  proxy):
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    with pytest.raises(ValueError, match="^HTTPS_PROXY is not a proxy URL") as failure:
        _send(monkeypatch, "https://hooks.example.invalid/x")
    assert "hunter22" not in str(failure.value)
