"""The code location as the Dagster UI and the daemon load it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dagster import AssetKey, AssetsDefinition, DefaultScheduleStatus, Definitions

from m365_pipeline import definitions as code_location

from .helpers import BIN

ROOT = Path(__file__).resolve().parents[1]

EXPECTED_ASSETS = {
    ("raw", "saas_users"), ("raw", "saas_user_subscriptions"), ("raw", "backup_organizations"),
    ("raw", "backup_tenants"), ("raw", "backup_accounts"), ("core", "license_rules"),
    ("core", "license_assignments"), ("core", "users"), ("marts", "org_summary"),
    ("marts", "org_summary_history"), ("marts", "nights"), ("marts", "published_users_history"),
    ("export", "dashboard_api"), ("export", "analytics_db"),
    ("core", "backup_accounts"), ("core", "backup_coverage"), ("marts", "org_backup_coverage"),
    ("marts", "billing_sealed"), ("marts", "org_license_history"),
}


def load_definitions(monkeypatch, tmp_path, **env) -> Definitions:
    """``defs()`` as Dagster calls it, with ``env`` set and a working directory without ``.env``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("M365_DATA_DIR", str(tmp_path / "data"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return code_location.defs()


def test_nightly_job_covers_every_asset_and_runs_in_one_process(monkeypatch, tmp_path):
    defs = load_definitions(monkeypatch, tmp_path)
    job = defs.resolve_job_def("nightly_refresh")
    keys = {tuple(key.path) for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == EXPECTED_ASSETS
    assert {tuple(k.path) for k in job.asset_layer.executable_asset_keys} == EXPECTED_ASSETS
    assert job.executor_def.name == "in_process"
    assert job.tags.get("dagster/max_retries") == "1"


def test_schedule_runs_at_2300_in_utc_by_default_and_is_on(monkeypatch, tmp_path):
    monkeypatch.delenv("M365_SCHEDULE_TIMEZONE", raising=False)
    schedule = load_definitions(monkeypatch, tmp_path).resolve_schedule_def("nightly_refresh_at_2300")
    assert schedule.cron_schedule == "0 23 * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.job_name == "nightly_refresh"
    assert schedule.default_status == DefaultScheduleStatus.RUNNING


def test_schedule_timezone_comes_from_the_environment(monkeypatch, tmp_path):
    defs = load_definitions(monkeypatch, tmp_path, M365_SCHEDULE_TIMEZONE="Europe/Berlin")
    assert defs.resolve_schedule_def("nightly_refresh_at_2300").execution_timezone == "Europe/Berlin"


def test_a_bad_timezone_is_a_clear_configuration_error(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="M365_SCHEDULE_TIMEZONE='Mars/Olympus' is not an IANA time zone"):
        load_definitions(monkeypatch, tmp_path, M365_SCHEDULE_TIMEZONE="Mars/Olympus")


def test_ui_metadata_groups_kinds_descriptions_and_column_schemas(monkeypatch, tmp_path):
    defs = load_definitions(monkeypatch, tmp_path)
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name == key.path[0], key
        assert node.description and "row" in node.description.lower() or key.path[0] == "export", key
        assert node.kinds, key
        if key.path[0] in ("raw", "core", "marts"):
            schema = node.metadata["dagster/column_schema"]
            assert schema.columns, key
            assert node.metadata["dagster/table_name"] == ".".join(key.path)
    for key in (AssetKey(["export", "dashboard_api"]), AssetKey(["export", "analytics_db"])):
        assert graph.get(key).freshness_policy is not None


def test_checks_sit_on_the_assets_they_guard(monkeypatch, tmp_path):
    defs = load_definitions(monkeypatch, tmp_path)
    checks = {(tuple(k.asset_key.path), k.name) for k in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {
        (("core", "users"), "unassigned_users"),
        (("core", "users"), "upn_in_several_organizations"),
        (("core", "license_assignments"), "new_license_names"),
        (("marts", "org_summary"), "contract_invariants"),
        (("marts", "org_summary"), "pull_is_plausible"),
        (("marts", "org_summary"), "no_source_went_missing"),
        (("core", "backup_coverage"), "email_users_not_backed_up"),
        (("core", "backup_coverage"), "backed_up_without_email_license"),
        (("core", "backup_coverage"), "unknown_backup_statuses"),
    }


def test_every_step_that_opens_the_duckdb_file_is_in_the_one_pool_and_keeps_what_its_decorator_said(
        monkeypatch, tmp_path):
    """Issue 25, outcome 6: the single writer as a Dagster concurrency pool, read from the loaded code
    location (the job's steps), not from a list of assets."""
    from m365_pipeline.assets import core, coverage, export, marts, raw

    defs = load_definitions(monkeypatch, tmp_path)
    ops = defs.resolve_job_def("nightly_refresh").graph.node_defs
    writers = [op for op in ops if "duckdb" in op.required_resource_keys]
    assert len(writers) == len(ops) == len({node.op.name for node in [*defs.assets, *defs.asset_checks]})
    assert {op.name: op.pool for op in writers} == {op.name: code_location.DUCKDB_POOL for op in writers}
    # Rebuilt in the pool, each asset and check is otherwise the one its module defined.
    originals = {node.op.name: node for module in (raw, core, marts, coverage, export)
                 for name in dir(module) if isinstance(node := getattr(module, name), AssetsDefinition)}
    pooled = [*defs.assets, *defs.asset_checks]
    assert {node.op.name for node in pooled} <= set(originals)
    for node in pooled:
        before = originals[node.op.name]
        assert (node.keys, node.check_keys, list(node.specs), node.op.description, node.op.tags, node.op.retry_policy,
                node.op.required_resource_keys, node.op.compute_fn) == \
            (before.keys, before.check_keys, list(before.specs), before.op.description, before.op.tags,
             before.op.retry_policy, before.op.required_resource_keys, before.op.compute_fn), node.op.name
        assert before.op.pool is None  # the pool comes from definitions.py alone


def test_the_shipped_instance_gives_the_duckdb_pool_one_slot_per_step(tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    from m365_pipeline.demo import DAGSTER_YAML

    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "dagster.yaml").write_text(DAGSTER_YAML)
    for home in (ROOT / "deploy", dev):  # production and make dev
        config, _ = dagster_instance_config(str(home))
        assert config["concurrency"]["pools"] == {"granularity": "op", "default_limit": 1}, home


def test_tokens_are_configured_as_env_vars_so_the_ui_shows_names_not_values(monkeypatch, tmp_path):
    defs = load_definitions(monkeypatch, tmp_path, SAAS_API_BASE_URL="http://127.0.0.1:1/v1",
                            SAAS_API_TOKEN="do-not-show-me")
    saas = defs.resources["saas"]
    assert "do-not-show-me" not in repr(saas)


def test_a_dotenv_file_configures_the_sources_and_real_variables_win(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("SAAS_API_BASE_URL", "SAAS_API_TOKEN", "BACKUP_API_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "SAAS_API_BASE_URL=http://127.0.0.1:9/from-dotenv\nSAAS_API_TOKEN=dotenv-token\n"
        "BACKUP_API_BASE_URL=http://127.0.0.1:9/dotenv-b\n")
    monkeypatch.setenv("BACKUP_API_BASE_URL", "http://127.0.0.1:9/from-environment")
    defs = load_definitions(monkeypatch, tmp_path)
    assert os.environ["SAAS_API_BASE_URL"] == "http://127.0.0.1:9/from-dotenv"
    assert os.environ["BACKUP_API_BASE_URL"] == "http://127.0.0.1:9/from-environment"
    assert defs.resources["saas"].base_url is not None  # an EnvVar: configured, value not baked in
    # (monkeypatch restores the variables load_dotenv set, since they were recorded as absent above)


# Run in a fresh interpreter, so nothing imported or cached by this test session hides a side effect.
LOAD_AND_CHECK = textwrap.dedent("""
    import os, sys
    data_dir = sys.argv[1]

    def created():
        return ([data_dir] if os.path.exists(data_dir) else []) + os.listdir(".")

    import m365_pipeline.definitions
    assert not created(), f"importing m365_pipeline.definitions created {created()}"
    m365_pipeline.definitions.defs()
    assert not created(), f"defs() created {created()}"
""")


@pytest.mark.parametrize("configured", [True, False], ids=["M365_DATA_DIR-missing-path", "default-./data"])
def test_importing_the_code_location_and_building_defs_create_nothing(tmp_path, configured):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    data_dir = tmp_path / "not-there" / "data" if configured else cwd / "data"
    env = {k: v for k, v in os.environ.items() if k != "M365_DATA_DIR"}
    env["DAGSTER_HOME"] = str(tmp_path / "dagster_home")
    if configured:
        env["M365_DATA_DIR"] = str(data_dir)
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_CHECK, str(data_dir)], cwd=cwd, env=env,
                          capture_output=True, check=False, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not data_dir.exists() and not (tmp_path / "not-there").exists()
    assert list(cwd.iterdir()) == []


def test_dagster_definitions_validate_accepts_the_code_location(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "M365_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([str(BIN / "dagster"), "definitions", "validate", "-m", "m365_pipeline.definitions"],
                          cwd=tmp_path, env=env, capture_output=True, check=False, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.parametrize("reader", [("core", "license_assignments"), ("core", "users"), ("marts", "org_summary"),
                                    ("export", "dashboard_api")])
def test_rule10_every_step_reading_last_collected_runs_after_every_raw_table(monkeypatch, tmp_path, reader):
    """last_collected is the earliest collected_at of all raw tables: a step that reads it before a raw table
    lands fails (or dates the night wrong) once steps run in parallel or wait for the pool."""
    graph = load_definitions(monkeypatch, tmp_path).resolve_asset_graph()
    upstream = graph.get_ancestor_asset_keys(AssetKey(list(reader)))
    raw = {key for key in graph.get_all_asset_keys() if key.path[0] == "raw"}
    assert raw <= upstream, sorted(k.to_user_string() for k in raw - upstream)
