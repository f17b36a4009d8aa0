"""A bad night never changes what users see: vendor faults, killed runs, broken pulls, secrets.

Each case starts from a published good night (seed 1), then runs the next night against a
simulator with other data (seed 2), so publishing anything would show. Either the run lands
every row and publishes tonight's numbers, or it fails saying where, and the served API and
the analysts' copy are byte-for-byte what they were.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from m365_pipeline.crashpoints import POINTS
from m365_pipeline.processes import free_port
from m365_pipeline.publishing import CURRENT, MANIFEST, VERSIONS, export_dir
from m365_pipeline.settings import ANALYTICS_FILE, STAGING_DIR
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig, ground_truth

from .helpers import BIN, run_pipeline, token_leaks, written_bytes

pytestmark = pytest.mark.slow  # each runs the whole pipeline two or three times

GOOD, NEXT = 1, 2
SIZE = {"orgs": 6, "users_per_org": 8}


@dataclass
class Night:
    data_dir: Path
    base_url: str


def snapshot(night: Night) -> dict[str, bytes | str]:
    """Everything a user can see: the served responses, the published files, the analytics copy."""
    export = export_dir(night.data_dir)
    current = (export / CURRENT).resolve()
    state: dict[str, bytes | str] = {"current": os.readlink(export / CURRENT)}
    for path in sorted(current.rglob("*")):
        if path.is_file():
            state[f"file:{path.relative_to(current)}"] = path.read_bytes()
    state[ANALYTICS_FILE] = (night.data_dir / ANALYTICS_FILE).read_bytes()
    summary = requests.get(night.base_url + "/api/m365/summary", timeout=10)
    state["api:summary"] = summary.content
    first_org = summary.json()["organizations"][0]["organization_name"]
    state["api:users"] = requests.get(night.base_url + "/api/m365/users", params={"org": first_org},
                                      timeout=10).content
    state["api:export"] = requests.get(night.base_url + "/api/m365/export?format=csv", timeout=10).content
    return state


@pytest.fixture
def night(start_simulator, start_server, tmp_path) -> Night:
    data_dir = tmp_path / "data"
    run_pipeline(start_simulator(seed=GOOD, **SIZE), data_dir)
    return Night(data_dir, start_server(data_dir).base_url)


def served_summary(night: Night) -> dict:
    return requests.get(night.base_url + "/api/m365/summary", timeout=10).json()


def failure_text(result) -> str:
    return "\n".join(e.event_specific_data.error.to_string() for e in result.all_events
                     if e.event_type_value == "STEP_FAILURE")


def assert_no_leftovers(data_dir: Path) -> None:
    assert not list((data_dir / STAGING_DIR).glob("*.jsonl")), "staging files left behind"
    versions = export_dir(data_dir) / VERSIONS
    unfinished = [v.name for v in versions.iterdir() if not (v / MANIFEST).exists()]
    assert not unfinished, f"unfinished versions left behind: {unfinished}"
    assert not list(export_dir(data_dir).glob(f".{CURRENT}.*")), "a half-swapped link left behind"
    assert not list(data_dir.glob(f".{ANALYTICS_FILE}.*")), "a half-written analytics copy left behind"


# -- vendor faults that retries absorb: every row lands, tonight's numbers are published -------

ABSORBED = {
    "bursts of 429 with Retry-After": ({"rate_429": 0.4, "retry_after": 1}, {}, "429"),
    "a vendor rate limit of 20 requests/s per token": ({"rate_limit": 20, "latency_ms": 20}, {}, "rate_limit"),
    "5xx on some pages": ({"rate_5xx": 0.3}, {}, "5xx"),
    "connection resets": ({"reset_rate": 0.25}, {}, "reset"),
    "responses slower than the client timeout": (
        {"slow_match": r"/tenants|/users\?", "slow_ms": 1500}, {"timeout_s": 0.5}, "slow"),
}


@pytest.mark.parametrize("case", list(ABSORBED))
def test_transient_vendor_faults_are_retried_and_every_row_lands(night, start_simulator, case):
    faults, client, kind = ABSORBED[case]
    sim = start_simulator(seed=NEXT, **SIZE, **faults)
    result = run_pipeline(sim, night.data_dir, saas=client, backup=client, raise_on_error=False)
    assert result.success, failure_text(result)
    assert sim.stats()["faults"].get(kind, 0) > 0, f"the simulator never injected {kind}"
    truth = ground_truth(sim.dataset)
    summary = served_summary(night)
    assert summary["organizations"] == truth["organizations"] and summary["totals"] == truth["totals"]


# -- vendor faults that must fail the run: nothing published changes --------------------------

FATAL = {
    "a malformed JSON page": (
        {"malformed_match": r"/tenants\?"}, {}, ["source B", "/tenants (page 1)", "not valid JSON"]),
    "a record missing required fields": (
        {"missing_field_match": r"/v1/users\?.*page_number=2"}, {"page_size": 10},
        ["source S", "GET /users (page 2)", "has no id"]),
    "a source down mid-pull": (
        {"down_after": 40, "down_scope": "saas"}, {},
        ["source S", "/subscriptions (page 1)", "HTTP 503"]),
}


@pytest.mark.parametrize("case", list(FATAL))
def test_fatal_vendor_faults_fail_saying_where_and_change_nothing_served(night, start_simulator, case):
    faults, saas_client, expected = FATAL[case]
    before = snapshot(night)
    sim = start_simulator(seed=NEXT, **SIZE, **faults)
    result = run_pipeline(sim, night.data_dir, saas=saas_client, raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    for fragment in expected:
        assert fragment in text, text
    assert snapshot(night) == before


def test_a_source_down_from_the_start_fails_naming_its_url_and_changes_nothing(night, start_simulator):
    before = snapshot(night)
    dead = f"http://127.0.0.1:{free_port()}/api"
    result = run_pipeline(start_simulator(seed=NEXT, **SIZE), night.data_dir,
                          backup={"base_url": dead, "max_retries": 1}, raise_on_error=False)
    assert not result.success
    assert f"cannot reach source B (M365 backup reseller API) at {dead}" in failure_text(result)
    assert snapshot(night) == before


# -- killed runs: SIGKILL anywhere, the previous version stays, the next run needs no cleanup ----

@pytest.mark.parametrize("point", POINTS)
def test_a_run_killed_at_any_phase_leaves_last_night_served_and_the_next_run_recovers(
        night, start_simulator, tmp_path, point):
    before = snapshot(night)
    sim = start_simulator(seed=NEXT, **SIZE)
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, **sim.env, "M365_DATA_DIR": str(night.data_dir), "DAGSTER_HOME": str(home),
           "M365_CRASH_AT": point}
    killed = subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "m365_pipeline.definitions",
                             "-j", "nightly_refresh"], env=env, capture_output=True, check=False, text=True,
                            timeout=240)
    assert killed.returncode == -9, f"the run was not killed at {point}: {killed.stderr[-2000:]}"
    after = snapshot(night)
    if point == "analytics":
        # The API was already published (a whole, checked version) when the copy was being made:
        # the API moves on, the analysts' file stays last night's until the next run.
        assert after[ANALYTICS_FILE] == before[ANALYTICS_FILE]
        assert after["current"] != before["current"]
    else:
        assert after == before

    result = run_pipeline(sim, night.data_dir, raise_on_error=False)
    assert result.success, failure_text(result)
    truth = ground_truth(sim.dataset)
    assert served_summary(night)["organizations"] == truth["organizations"]
    assert_no_leftovers(night.data_dir)


# -- an outage masquerading as data is held back, and says why --------------------------------

def test_far_fewer_organizations_than_last_night_are_not_published(night, start_simulator):
    before = snapshot(night)
    result = run_pipeline(start_simulator(seed=NEXT, orgs=2, users_per_org=8), night.data_dir,
                          raise_on_error=False)
    assert not result.success
    checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    plausible = next(c for c in checks if c.check_name == "pull_is_plausible")
    assert not plausible.passed
    assert "organizations fell from" in plausible.description and "previous data stays published" in \
        plausible.description
    assert snapshot(night) == before


# -- secrets: distinctive tokens appear nowhere a run writes ----------------------------------

def test_no_token_appears_in_any_file_log_or_event_of_a_whole_run(tmp_path):
    tokens = {"saas_token": "Zq9-SAAS-needle-7a1", "reseller_token": "Zq9-RESELLER-needle-4b2",
              "admin_token": "Zq9-ADMIN-needle-9c3"}
    config = SimulatorConfig(orgs=4, users_per_org=6, seed=8, faults=FaultConfig(), **tokens)
    data_dir, home = tmp_path / "data", tmp_path / "dagster_home"
    home.mkdir()
    with Simulator(config, host="127.0.0.1", port=0) as sim:
        secrets = [*tokens.values(), *(o["authentication_token"] for o in sim.dataset.backup_owners())]
        base = {**os.environ, **sim.env, "M365_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(home)}
        command = [str(BIN / "dagster"), "job", "execute", "-m", "m365_pipeline.definitions", "-j",
                   "nightly_refresh"]
        ok = subprocess.run(command, env=base, capture_output=True, check=False, text=True, timeout=240)
        assert ok.returncode == 0, ok.stderr[-2000:]
        # and a failing night: a wrong token must not echo either
        wrong = {**base, "BACKUP_ADMIN_TOKEN": "Zq9-WRONG-needle-0d4"}
        secrets.append(wrong["BACKUP_ADMIN_TOKEN"])
        bad = subprocess.run(command, env=wrong, capture_output=True, check=False, text=True, timeout=240)
        assert bad.returncode != 0 and "BACKUP_ADMIN_TOKEN" in bad.stdout + bad.stderr
    # DuckDB files, export, analytics copy, event log, compute logs
    blobs = {"stdout+stderr": (ok.stdout + ok.stderr + bad.stdout + bad.stderr).encode(),
             **written_bytes(data_dir, home)}
    assert any(p.endswith(ANALYTICS_FILE) for p in blobs) and len(blobs) > 20
    leaks = token_leaks(secrets, blobs)
    assert not leaks, f"a token leaked into {leaks}"

