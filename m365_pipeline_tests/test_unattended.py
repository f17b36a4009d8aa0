"""Running unattended: configuration cannot drop a source, a missing source holds publishing back,
one writer at a time. Each test drives the real ``dagster`` CLI or real processes against the simulator."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dagster import instance_for_test, materialize

from m365_pipeline.assets.marts import missing_sources
from m365_pipeline.definitions import NIGHTLY_TAGS
from m365_pipeline.publishing import CURRENT, export_dir, published_manifest
from m365_pipeline.resources import PublishPolicy, SaasApiResource
from m365_pipeline.settings import DUCKDB_FILE
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


def materialize_all(env: dict[str, str], cwd: Path, config: dict[str, Any] | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """The README's CLI run, ``dagster asset materialize --select '*'``, as an operator types it."""
    args = [str(BIN / "dagster"), "asset", "materialize", "-m", "m365_pipeline.definitions", "--select", "*"]
    if config is not None:
        args += ["--config-json", json.dumps(config)]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


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


def test_a_night_held_back_by_a_blocking_check_is_not_retried_but_an_outage_is(start_simulator, tmp_path,
                                                                                unused_port):
    sim = start_simulator(orgs=4, users_per_org=6, seed=5)
    data_dir = tmp_path / "data"
    run_pipeline(sim, data_dir)  # a good night from both sources

    def night(resources) -> str:
        """A run with the nightly job's retry tags; returns Dagster's own verdict on retrying it."""
        with instance_for_test(overrides={"run_retries": {"enabled": True}}) as instance:
            result = materialize(all_definitions(), instance=instance, tags=NIGHTLY_TAGS, raise_on_error=False,
                                 resources={**resources, "publish_policy": PublishPolicy()})
            assert not result.success
            return instance.get_run_by_id(result.run_id).tags.get("dagster/will_retry")

    # Held back: source S is missing tonight; retrying cannot change that.
    assert night(make_resources(sim, data_dir / DUCKDB_FILE, sources=("backup",))) == "false"
    # An outage: source S's host does not answer. Worth another try later.
    outage = make_resources(sim, data_dir / DUCKDB_FILE, saas={"max_retries": 0})
    outage["saas"] = SaasApiResource(base_url=f"http://127.0.0.1:{unused_port}/v1", token="t", max_retries=0)
    assert night(outage) == "true"
