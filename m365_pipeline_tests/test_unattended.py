"""Running unattended: configuration cannot drop a source, a missing source holds publishing back,
one writer at a time. Each test drives the real ``dagster`` CLI or real processes against the simulator."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
import yaml
from dagster import DagsterEventType, DagsterRunStatus, build_schedule_context, instance_for_test, materialize

from m365_pipeline import definitions as code_location
from m365_pipeline.assets.export import remove_stale_copies
from m365_pipeline.assets.marts import missing_sources
from m365_pipeline.definitions import NIGHTLY_TAGS
from m365_pipeline.publishing import CURRENT, export_dir, published_manifest
from m365_pipeline.resources import PublishPolicy, SaasApiResource
from m365_pipeline.run_lock import LOCK_FILE, run_lock
from m365_pipeline.settings import ANALYTICS_FILE, DUCKDB_FILE
from m365_pipeline.simulator import Simulator, ground_truth

from .helpers import BIN, SOURCE_VARIABLES, all_definitions, make_resources, run_pipeline

# Tests marked slow start the dagster CLI (seconds to load) and run the whole job, some several times.


def cli_env(tmp_path: Path, sim: Simulator | None, **extra: str) -> dict[str, str]:
    """The environment a service unit gives the CLI: the simulator's variables, a data dir, a DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in SOURCE_VARIABLES}
    return {**env, **(sim.env if sim else {}), "DAGSTER_HOME": str(home),
            "M365_DATA_DIR": str(tmp_path / "data"), **extra}


def materialize_args(config: dict[str, Any] | None = None) -> list[str]:
    """The README's CLI run, ``dagster asset materialize --select '*'``, as an operator types it."""
    args = [str(BIN / "dagster"), "asset", "materialize", "-m", "m365_pipeline.definitions", "--select", "*"]
    return args + (["--config-json", json.dumps(config)] if config is not None else [])


def materialize_all(env: dict[str, str], cwd: Path, config: dict[str, Any] | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(materialize_args(config), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def published_summary(data_dir: Path) -> dict[str, Any]:
    return json.loads((export_dir(data_dir) / CURRENT / "summary.json").read_bytes())


@pytest.mark.slow
def test_run_config_tuning_one_setting_keeps_base_urls_and_tokens_bound_to_the_environment(
        start_simulator, tmp_path):
    sim = start_simulator(orgs=5, users_per_org=8, seed=3)
    proc = materialize_all(cli_env(tmp_path, sim), tmp_path,
                       {"resources": {"saas": {"config": {"concurrency": 4}},
                                      "backup": {"config": {"per_page": 7}}}})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "skipped" not in output, "a source was skipped although its variables are set"
    truth = ground_truth(sim.dataset)
    summary = published_summary(tmp_path / "data")
    assert summary["totals"] == truth["totals"]
    assert summary["organizations"] == truth["organizations"]
    assert sim.config.saas_token not in output and sim.config.admin_token not in output


@pytest.mark.slow
def test_a_source_that_contributed_to_the_last_published_night_and_is_unset_tonight_holds_publishing_back(
        start_simulator, tmp_path):
    sim = start_simulator(orgs=5, users_per_org=8, seed=4)
    env = cli_env(tmp_path, sim)
    good = materialize_all(env, tmp_path)
    assert good.returncode == 0, (good.stdout + good.stderr)[-4000:]
    data_dir = tmp_path / "data"
    first = published_manifest(export_dir(data_dir))
    assert first["sources"] == ["SAAS_API_BASE_URL", "BACKUP_API_BASE_URL"]

    # Tonight the service unit lost source S's URL (say, a misspelled variable name).
    tonight = {k: v for k, v in env.items() if k != "SAAS_API_BASE_URL"}
    tonight["SAAS_API_BASE_URL_TYPO"] = sim.env["SAAS_API_BASE_URL"]
    held = materialize_all(tonight, tmp_path)
    output = held.stdout + held.stderr
    assert held.returncode != 0, "a night without source S was published"
    assert "no_source_went_missing" in output
    assert "SAAS_API_BASE_URL is not set tonight" in output
    assert published_manifest(export_dir(data_dir))["version"] == first["version"]
    assert published_summary(data_dir)["totals"] == ground_truth(sim.dataset)["totals"]

    # Retiring source S on purpose is an explicit, documented choice.
    allowed = materialize_all(tonight, tmp_path,
                              {"resources": {"publish_policy": {"config": {"allow_missing_sources": True}}}})
    assert allowed.returncode == 0, (allowed.stdout + allowed.stderr)[-4000:]
    after = published_manifest(export_dir(data_dir))
    assert after["version"] != first["version"]
    assert after["sources"] == ["BACKUP_API_BASE_URL"]
    totals, truth = published_summary(data_dir)["totals"], ground_truth(sim.dataset)["totals"]
    assert totals["total_organizations"] == truth["total_organizations"]  # organizations come from source B
    assert totals != truth  # and the counts now lack source S's licenses


@pytest.mark.parametrize(("last_published", "tonight", "missing"), [
    ([], ["SAAS_API_BASE_URL"], []),  # first night, or a manifest from before sources were recorded
    (["SAAS_API_BASE_URL", "BACKUP_API_BASE_URL"], ["SAAS_API_BASE_URL", "BACKUP_API_BASE_URL"], []),
    (["SAAS_API_BASE_URL", "BACKUP_API_BASE_URL"], ["BACKUP_API_BASE_URL"], ["SAAS_API_BASE_URL"]),
    (["BACKUP_API_BASE_URL"], ["SAAS_API_BASE_URL", "BACKUP_API_BASE_URL"], []),  # a source added is fine
    (["SAAS_API_BASE_URL", "BACKUP_API_BASE_URL"], [], ["SAAS_API_BASE_URL", "BACKUP_API_BASE_URL"]),
])
def test_missing_sources_are_those_the_last_published_night_had_and_tonight_lacks(last_published, tonight, missing):
    assert missing_sources(last_published, tonight) == missing


def test_a_night_held_back_by_a_blocking_check_or_a_clock_set_back_is_not_retried_but_an_outage_is(
        start_simulator, tmp_path, unused_port):
    sim = start_simulator(orgs=4, users_per_org=6, seed=5)
    data_dir = tmp_path / "data"
    run_pipeline(sim, data_dir)  # a good night from both sources

    def night(resources, error: str | None = None) -> str:
        """A run with the nightly job's retry tags, failing (with ``error``, a class name, if given);
        returns Dagster's own verdict on retrying it."""
        with instance_for_test(overrides={"run_retries": {"enabled": True}}) as instance:
            result = materialize(all_definitions(), instance=instance, tags=NIGHTLY_TAGS, raise_on_error=False,
                                 resources={**resources, "publish_policy": PublishPolicy()})
            assert not result.success
            if error:
                assert error in [e.step_failure_data.error.cls_name for e in result.get_step_failure_events()]
            return instance.get_run_by_id(result.run_id).tags.get("dagster/will_retry")

    # Held back: source S is missing tonight; retrying cannot change that.
    assert night(make_resources(sim, data_dir / DUCKDB_FILE, sources=("backup",))) == "false"
    # An outage: source S's host does not answer. Worth another try later.
    outage = make_resources(sim, data_dir / DUCKDB_FILE, saas={"max_retries": 0})
    outage["saas"] = SaasApiResource(base_url=f"http://127.0.0.1:{unused_port}/v1", token="t", max_retries=0)
    assert night(outage) == "true"
    # A clock set back before a kept night (rule 11, NightOutOfOrder): it fails the same way minutes later.
    ahead = tmp_path / "ahead"
    ahead.mkdir()
    with time_machine.travel(datetime.now(UTC) + timedelta(days=3)):
        run_pipeline(sim, ahead)  # the kept night, dated three days from now
    assert night(make_resources(sim, ahead / DUCKDB_FILE), "NightOutOfOrder") == "false"


def wait_for_line(log: Path, proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"the run ended before logging {text!r}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the run never logged {text!r}: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def step_intervals(instance, run_id: str) -> list[tuple[float, float, str]]:
    """(start, end, step) of each step of the run, from its event log."""
    starts: dict[str, float] = {}
    intervals = []
    for entry in instance.all_logs(run_id):
        kind = entry.dagster_event_type
        if kind == DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            intervals.append((starts[entry.step_key], entry.timestamp, entry.step_key))
    return intervals


@pytest.mark.slow
def test_two_overlapping_cli_runs_on_one_instance_take_turns_at_the_duckdb_file_through_the_pool(
        start_simulator, tmp_path):
    from dagster import DagsterInstance

    from m365_pipeline.demo import DAGSTER_YAML

    # Source S's user list answers after 10 s (the first two times): the first run is surely mid-pull.
    sim = start_simulator(orgs=4, users_per_org=6, seed=6, slow_match=r"/users\?page_size", slow_ms=10_000)
    env, data_dir = cli_env(tmp_path, sim), tmp_path / "data"
    (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text(DAGSTER_YAML)  # the make dev instance: pool of 1
    # A night before: while a step waits for the pool, the in-process executor runs another ready one, and
    # core.license_assignments reads raw.backup_accounts without declaring it (a first night would fail).
    assert materialize_all(env, tmp_path).returncode == 0
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    runs = []
    try:
        for log in logs:  # the second starts while the first pulls source S's users
            if runs:
                wait_for_line(logs[0], runs[0], 'Started execution of step "raw__saas_users"')
            with log.open("w") as out:
                runs.append(subprocess.Popen(materialize_args(), cwd=tmp_path, env=env, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True))
        for run, log in zip(runs, logs, strict=True):
            assert run.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    # Rule: one writer at a time. The second run's pull started while the first's held the pool's one
    # slot, so it waited for it; no step of one run overlapped a step of the other.
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        first, second = (step_intervals(instance, record.dagster_run.run_id)
                         for record in reversed(instance.get_run_records(limit=2)))
    assert len(first) == len(second) > 15
    overlaps = [(a, b) for a in first for b in second if a[0] < b[1] and b[0] < a[1]]
    assert overlaps == []
    assert "m365_duckdb" in logs[1].read_text()  # it said what it waited for
    assert published_summary(data_dir)["totals"] == ground_truth(sim.dataset)["totals"]


MULTIPROCESS_LOCATION = """
from dagster import Definitions, multiprocess_executor

from m365_pipeline import definitions

def multiprocess(night: Definitions) -> Definitions:
    return Definitions(assets=night.assets, asset_checks=night.asset_checks, resources=night.resources,
                       executor=multiprocess_executor.configured({"max_concurrent": 3}))


defs = multiprocess(definitions.defs())
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_multiprocess_executor_runs_the_night_with_steps_in_parallel_processes_and_no_lock_refusal(
        start_simulator, tmp_path):
    # The lock was taken at the resource's start-up, which each step process of this executor runs:
    # parallel steps refused each other. Taken by a step while it has the file open, they take turns.
    sim = start_simulator(orgs=4, users_per_org=6, seed=8)
    env, data_dir = cli_env(tmp_path, sim), tmp_path / "data"
    (tmp_path / "multiprocess_location.py").write_text(MULTIPROCESS_LOCATION)
    # A night before (in one process): core.license_assignments reads raw.backup_accounts without declaring
    # it, so with steps in parallel a first night could run it before that table exists.
    assert materialize_all(env, tmp_path).returncode == 0
    proc = subprocess.run([str(BIN / "dagster"), "asset", "materialize", "-f", "multiprocess_location.py",
                           "--select", "*"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Launching subprocess for" in output  # each step in its own process
    assert "another run is writing" not in output
    assert published_summary(data_dir)["totals"] == ground_truth(sim.dataset)["totals"]


def lock_wait(data_dir: Path, seconds: int) -> dict[str, Any]:
    """Run config for the ``duckdb`` resource's lock wait (run config for a resource replaces all its settings)."""
    return {"resources": {"duckdb": {"config": {"database": str(data_dir / DUCKDB_FILE),
                                                "writer_lock_wait_seconds": seconds}}}}


@pytest.mark.slow
def test_a_writer_outside_the_instance_makes_a_step_wait_for_the_lock_then_fail_naming_it_and_a_kill_frees_it(
        start_simulator, tmp_path):
    sim = start_simulator(orgs=4, users_per_org=6, seed=6)
    env, data_dir = cli_env(tmp_path, sim), tmp_path / "data"
    assert materialize_all(env, tmp_path).returncode == 0
    published = published_manifest(export_dir(data_dir))["version"]

    # Another writer (a second DAGSTER_HOME, execute_in_process) has the file: a step waits, then goes on.
    log = tmp_path / "waiting.log"
    with run_lock(data_dir, "the-other-writer"), log.open("w") as out:
        waiting = subprocess.Popen(materialize_args(), cwd=tmp_path, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_line(log, waiting, f"waiting up to 600 s for another run writing to {data_dir}: "
                                    "run the-other-writer, writing since")
        assert published_manifest(export_dir(data_dir))["version"] == published
    assert waiting.wait(timeout=300) == 0, log.read_text()[-4000:]
    assert published_manifest(export_dir(data_dir))["version"] != published

    # Held past the configured wait: the run fails naming the holder, and what was published stays.
    published = published_manifest(export_dir(data_dir))["version"]
    with run_lock(data_dir, "the-other-writer"):
        holder = json.loads((data_dir / LOCK_FILE).read_bytes())
        refused = materialize_all(env, tmp_path, lock_wait(data_dir, 1))
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert (f"another run is writing to {data_dir}: run the-other-writer, writing since {holder['started_at']} "
            f"(pid {os.getpid()}) (waited 1 s)") in output, output[-3000:]
    assert published_manifest(export_dir(data_dir))["version"] == published

    # A writer killed while it holds the lock: the kernel drops it, the next run needs no cleanup.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from pathlib import Path\nfrom m365_pipeline.run_lock import run_lock\n"
                               "with run_lock(Path(sys.argv[1]), 'killed'):\n    print('held', flush=True)\n"
                               "    time.sleep(600)", str(data_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.kill()
    holder.wait()
    again = materialize_all(env, tmp_path, lock_wait(data_dir, 0))
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert published_summary(data_dir)["totals"] == ground_truth(sim.dataset)["totals"]


def test_stale_analytics_copy_cleanup_removes_only_copies_whose_writer_is_gone(tmp_path):
    alive = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        others = [f".{ANALYTICS_FILE}.{alive.pid}.tmp", f".{ANALYTICS_FILE}.{alive.pid}.tmp.wal"]
        stale = [f".{ANALYTICS_FILE}.{dead.pid}.tmp", f".{ANALYTICS_FILE}.{dead.pid}.tmp.wal"]
        for name in others + stale:
            (tmp_path / name).write_bytes(b"x")
        assert sorted(remove_stale_copies(tmp_path)) == sorted(stale)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)  # another run's copy is left alone
    finally:
        alive.kill()
        alive.wait()


def test_the_schedule_skips_its_tick_while_a_run_is_in_progress_and_fires_otherwise(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("M365_DATA_DIR", str(tmp_path / "data"))
    schedule = code_location.defs().resolve_schedule_def(code_location.NIGHTLY_SCHEDULE)
    with instance_for_test() as instance:
        idle = schedule.evaluate_tick(build_schedule_context(instance=instance))
        assert len(idle.run_requests or []) == 1 and not idle.skip_message
        running = instance.create_run_for_job(job_def=code_location.defs().resolve_job_def(code_location.NIGHTLY_JOB),
                                              status=DagsterRunStatus.STARTED)
        busy = schedule.evaluate_tick(build_schedule_context(instance=instance))
        assert not busy.run_requests
        assert f"run {running.run_id} of nightly_refresh (STARTED" in busy.skip_message
        instance.report_run_failed(running)
        again = schedule.evaluate_tick(build_schedule_context(instance=instance))
        assert len(again.run_requests or []) == 1


ROOT = Path(__file__).resolve().parents[1]
ONE_RUN_PER_LOCATION = [{"key": "dagster/code_location", "value": "m365_pipeline", "limit": 1}]


def test_shipped_and_dev_instances_queue_runs_one_at_a_time_under_the_one_code_location_name(tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    from m365_pipeline.demo import DAGSTER_YAML

    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "dagster.yaml").write_text(DAGSTER_YAML)
    for home in (ROOT / "deploy", dev):
        config, _ = dagster_instance_config(str(home))  # validates against Dagster's schema
        assert config["concurrency"]["runs"]["tag_concurrency_limits"] == ONE_RUN_PER_LOCATION, home
        assert config["run_retries"]["enabled"] and config["telemetry"]["enabled"] is False
    # The limit's value is the code location name, which the daemon ([tool.dagster]) and the
    # webserver (workspace.yaml) must both use.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dagster"]
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    assert pyproject["code_location_name"] == workspace["location_name"] == ONE_RUN_PER_LOCATION[0]["value"]
    assert pyproject["module_name"] == workspace["module_name"]
    for unit in ("m365-dagster-webserver.service", "m365-dagster-daemon.service"):
        exec_start = re.search(r"^ExecStart=(.*)$", (ROOT / "deploy" / unit).read_text(), re.M)[1]
        assert " -w workspace.yaml" in exec_start, unit  # both load the location under that one name


def test_the_make_dev_instance_loads_with_the_shipped_run_monitoring_so_a_dead_run_cannot_block_the_schedule(
        tmp_path):
    from dagster import DagsterInstance

    from m365_pipeline.demo import prepare_environment

    env = prepare_environment(tmp_path)  # what `make dev` does when DAGSTER_HOME is unset
    shipped = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())["run_monitoring"]
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:  # loads and validates it, as dagster dev does
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_runtime_seconds == shipped["max_runtime_seconds"]
        assert instance.run_monitoring_start_timeout_seconds == shipped["start_timeout_seconds"]
        # and tells a dead run worker within a poll (test_killed_run.py), not only at the 4 h limit
        assert instance.run_launcher.supports_check_run_worker_health
        assert instance.run_monitoring_poll_interval_seconds == shipped["poll_interval_seconds"]
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == \
            shipped["free_slots_after_run_end_seconds"]
        assert instance.get_concurrency_config().run_queue_config.tag_concurrency_limits == ONE_RUN_PER_LOCATION
