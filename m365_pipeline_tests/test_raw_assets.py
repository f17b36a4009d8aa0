"""Raw layer: the real clients pull the simulator over HTTP and land exactly what it holds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from m365_pipeline.assets.raw import raw_assets
from m365_pipeline.publishing import CURRENT, export_dir
from m365_pipeline.raw_tables import RAW_TABLES
from m365_pipeline.settings import DUCKDB_FILE, STAGING_DIR
from m365_pipeline.simulator import Simulator

from .helpers import BIN, make_resources, query


def _run(resources, *, raise_on_error=False, instance=None):
    return materialize(raw_assets, resources=resources, raise_on_error=raise_on_error, instance=instance)


def _expected_rows(sim: Simulator) -> dict[str, set]:
    """What the simulator holds, in the shape the raw tables should have."""
    ds = sim.dataset
    users = list(ds.saas_users())
    owners = list(ds.backup_owners())
    tenants = [(str(o["id"]), t) for o in owners for t in ds.backup_tenants(o["id"])]
    return {
        "raw.saas_users": {(u["id"], u["username"], u["email"], u["displayName"]) for u in users},
        "raw.saas_user_subscriptions": {
            (u["id"], s["id"], s["applicationName"], s["name"], s["vendor"])
            for u in users for s in ds.saas_subscriptions(u["id"])
        },
        "raw.backup_organizations": {(str(o["id"]), o["organization_name"]) for o in owners},
        "raw.backup_tenants": {(oid, str(t["id"]), t["domain"], t["type"]) for oid, t in tenants},
        "raw.backup_accounts": {
            (oid, str(t["id"]), a["upn"], a["mailbox"], a["licensed"])
            for oid, t in tenants for a in ds.backup_accounts(oid, t["id"])
        },
    }


LANDED_SQL = {
    "raw.saas_users": "SELECT id, username, email, display_name FROM raw.saas_users",
    "raw.saas_user_subscriptions":
        "SELECT user_id, id, application_name, name, vendor FROM raw.saas_user_subscriptions",
    "raw.backup_organizations": "SELECT id, organization_name FROM raw.backup_organizations",
    "raw.backup_tenants": "SELECT owner_id, id, domain, type FROM raw.backup_tenants",
    "raw.backup_accounts": "SELECT owner_id, tenant_id, upn, mailbox, licensed FROM raw.backup_accounts",
}


def test_every_raw_table_is_compared_with_the_simulator():
    assert set(LANDED_SQL) == {table.qualified for table in RAW_TABLES}


def _assert_landed_exactly(sim: Simulator, db_path: Path) -> None:
    expected = _expected_rows(sim)
    for table, sql in LANDED_SQL.items():
        rows = query(db_path, sql)
        assert len(rows) == len(expected[table]), f"{table}: duplicate or missing rows"
        assert set(rows) == expected[table], table


def test_both_sources_land_exactly_the_rows_the_simulator_holds_across_many_pages(simulator, db_path):
    # Tiny pages force dozens of pages per collection, including the per-owner ones.
    resources = make_resources(simulator, db_path, saas={"page_size": 7}, backup={"per_page": 3})
    result = _run(resources, raise_on_error=True)
    _assert_landed_exactly(simulator, db_path)

    users_meta = result.asset_materializations_for_node("raw__saas_users")[0].metadata
    assert users_meta["pages"].value >= 10
    assert users_meta["dagster/row_count"].value == len(list(simulator.dataset.saas_users()))
    accounts_meta = result.asset_materializations_for_node("raw__backup_accounts")[0].metadata
    assert accounts_meta["vendor_calls"].value > accounts_meta["pages"].value - 1
    assert "elapsed_s" in accounts_meta and "preview" in accounts_meta


def test_raw_tables_keep_vendor_fields_snake_cased_with_collected_at_and_no_tokens(simulator, db_path):
    _run(make_resources(simulator, db_path), raise_on_error=True)
    columns = {(t, c) for t, c in query(
        db_path, "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'raw'")}
    for table in RAW_TABLES:
        assert (table.name, "collected_at") in columns
    assert ("saas_users", "display_name") in columns and ("saas_users", "is_in_review") in columns
    assert not [c for _, c in columns if "token" in c]
    stamps = query(db_path, "SELECT DISTINCT collected_at FROM raw.saas_users")
    assert len(stamps) == 1 and stamps[0][0] is not None


def test_a_rerun_replaces_tables_whole_instead_of_appending(simulator, db_path):
    resources = make_resources(simulator, db_path)
    _run(resources, raise_on_error=True)
    _run(resources, raise_on_error=True)
    _assert_landed_exactly(simulator, db_path)


def test_injected_429s_and_5xx_are_retried_and_every_row_still_lands(start_simulator, db_path):
    sim = start_simulator(rate_429=0.25, retry_after=0, rate_5xx=0.2, reset_rate=0.05, seed=11)
    result = _run(make_resources(sim, db_path, saas={"page_size": 5}, backup={"per_page": 4}),
                  raise_on_error=True)
    _assert_landed_exactly(sim, db_path)

    faults = sim.stats()["faults"]
    assert faults.get("429", 0) > 0 and faults.get("5xx", 0) > 0, faults
    retries = sum(
        m.metadata["vendor_retries"].value
        for node in ("raw__saas_users", "raw__saas_user_subscriptions", "raw__backup_accounts")
        for m in result.asset_materializations_for_node(node)
    )
    assert retries > 0


def _failure_text(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "expected a failed step"
    return "\n".join(str(e.event_specific_data.error.to_string()) for e in failures)


@pytest.mark.parametrize(
    ("source", "override", "variable"),
    [
        ("saas", {"token": "wrong-saas-token-value"}, "SAAS_API_TOKEN"),
        ("backup", {"reseller_token": "wrong-reseller-token-value"}, "BACKUP_RESELLER_TOKEN"),
        ("backup", {"admin_token": "wrong-admin-token-value"}, "BACKUP_ADMIN_TOKEN"),
    ],
)
def test_a_wrong_token_fails_at_once_naming_source_and_variable_never_the_token(
        simulator, db_path, source, override, variable):
    resources = make_resources(simulator, db_path, **{source: override})
    result = _run(resources)
    assert not result.success
    text = _failure_text(result)
    assert variable in text and "401" in text
    assert ("source S" in text) if source == "saas" else ("source B" in text)
    for value in [*override.values(), *simulator.env.values()]:
        if "token" in value:
            assert value not in text


def test_an_unreachable_host_says_which_url(simulator, db_path, unused_port):
    url = f"http://127.0.0.1:{unused_port}/api/saas/consolidated-view/v1"
    resources = make_resources(simulator, db_path, saas={"base_url": url, "max_retries": 1})
    result = _run(resources)
    text = _failure_text(result)
    assert f"cannot reach source S (SaaS management API) at {url}" in text
    assert "Connection refused" in text


def test_a_malformed_json_page_fails_naming_the_endpoint_and_page(start_simulator, db_path):
    sim = start_simulator(malformed_match=r"/tenants\?.*page=2")
    result = _run(make_resources(sim, db_path, backup={"per_page": 1}))
    text = _failure_text(result)
    assert "not valid JSON" in text and "/tenants (page 2)" in text and "source B" in text


def test_a_record_missing_its_key_fails_naming_endpoint_and_page(start_simulator, db_path):
    sim = start_simulator(missing_field_match=r"/consolidated-view/v1/users\?.*page_number=2")
    result = _run(make_resources(sim, db_path, saas={"page_size": 10}))
    text = _failure_text(result)
    assert "source S (SaaS management API) GET /users (page 2)" in text and "has no id" in text


def test_a_failed_pull_leaves_the_previous_raw_table_in_place(start_simulator, db_path):
    good = start_simulator(seed=3)
    _run(make_resources(good, db_path), raise_on_error=True)
    before = query(db_path, "SELECT count(*), min(collected_at) FROM raw.saas_users")[0]

    broken = start_simulator(seed=3, missing_field_match=r"/v1/users\?")
    assert not _run(make_resources(broken, db_path)).success
    assert query(db_path, "SELECT count(*), min(collected_at) FROM raw.saas_users")[0] == before
    assert not list((db_path.parent / STAGING_DIR).glob("*.jsonl")), "staging files must be cleaned up"


def test_an_unconfigured_source_is_skipped_and_its_tables_are_emptied(simulator, db_path):
    _run(make_resources(simulator, db_path), raise_on_error=True)
    result = _run(make_resources(simulator, db_path, sources=("backup",)), raise_on_error=True)
    assert query(db_path, "SELECT count(*) FROM raw.saas_users") == [(0,)]
    assert query(db_path, "SELECT count(*) FROM raw.saas_user_subscriptions") == [(0,)]
    assert query(db_path, "SELECT count(*) FROM raw.backup_accounts")[0][0] > 0
    meta = result.asset_materializations_for_node("raw__saas_users")[0].metadata
    assert "SAAS_API_BASE_URL is not set" in meta["skipped"].value


def test_no_source_configured_fails_with_what_to_set_and_how_to_start_the_simulator(db_path):
    result = _run(make_resources(None, db_path, sources=()))
    text = _failure_text(result)
    for needed in ("SAAS_API_BASE_URL", "BACKUP_API_BASE_URL", "BACKUP_ADMIN_TOKEN", "m365-simulate"):
        assert needed in text


def test_a_base_url_without_token_is_a_configuration_error(simulator, db_path):
    resources = make_resources(simulator, db_path, saas={"token": ""})
    text = _failure_text(_run(resources))
    assert "SAAS_API_TOKEN is empty" in text


def test_no_token_reaches_the_duckdb_file_the_logs_or_errors(start_simulator, db_path, tmp_path):
    sim = start_simulator(seed=5)
    secrets = [v for k, v in sim.env.items() if "TOKEN" in k]
    secrets += [o["authentication_token"] for o in sim.dataset.backup_owners()]
    instance_dir = tmp_path / "dagster_home"
    instance_dir.mkdir()
    with DagsterInstance.local_temp(str(instance_dir)) as instance:
        ok = _run(make_resources(sim, db_path), instance=instance)
        bad = _run(make_resources(sim, db_path, saas={"token": "bad-" + secrets[0]}), instance=instance)
        assert ok.success and not bad.success
        logs = "\n".join(
            str(record.user_message) + str(record.dagster_event)
            for run in (ok, bad) for record in instance.all_logs(run.run_id)
        )
    blobs = {"duckdb": db_path.read_bytes(), "logs": logs.encode()}
    for path in instance_dir.rglob("*"):
        if path.is_file():
            blobs[str(path)] = path.read_bytes()
    for secret in secrets:
        for where, blob in blobs.items():
            assert secret.encode() not in blob, f"a token leaked into {where}"


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["key:raw/*", "*"])
def test_dagster_cli_materializes_against_the_simulator(simulator, tmp_path, selection):
    """The README's `dagster asset materialize -m m365_pipeline.definitions --select ...`."""
    data_dir = tmp_path / "data"
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, **simulator.env, "M365_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(home)}
    proc = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "m365_pipeline.definitions", "--select", selection],
        env=env, cwd=tmp_path, capture_output=True, check=False, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_landed_exactly(simulator, data_dir / DUCKDB_FILE)
    assert (export_dir(data_dir) / CURRENT).exists() is (selection == "*")
