"""Analysts read analytics.duckdb without ever blocking the nightly run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb

from m365_pipeline.settings import ANALYTICS_FILE, DUCKDB_FILE

from .helpers import BIN, run_pipeline

READER = textwrap.dedent("""
    import sys, duckdb
    conn = duckdb.connect(sys.argv[1], read_only=True)
    sql = "SELECT count(*), sum(m365_licensed_user_count) FROM marts.org_summary"
    print(conn.execute(sql).fetchone(), flush=True)
    sys.stdin.readline()                      # the test runs the pipeline meanwhile
    print(conn.execute(sql).fetchone(), flush=True)
""")


def test_an_open_analyst_session_does_not_block_the_run_and_keeps_its_snapshot(start_simulator, tmp_path):
    data_dir = tmp_path / "data"
    run_pipeline(start_simulator(orgs=6, users_per_org=8, seed=1), data_dir)
    analytics = data_dir / ANALYTICS_FILE

    reader = subprocess.Popen([sys.executable, "-c", READER, str(analytics)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = reader.stdout.readline().strip()
        assert before.startswith("(6,"), reader.stderr.read()
        # Another night with more organizations, while the analyst's session stays open.
        result = run_pipeline(start_simulator(orgs=9, users_per_org=8, seed=1), data_dir)
        assert result.success
        reader.stdin.write("\n")
        reader.stdin.flush()
        after = reader.stdout.readline().strip()
    finally:
        reader.kill()
        reader.wait()
    assert after == before  # one consistent snapshot for the whole session
    with duckdb.connect(str(analytics), read_only=True) as fresh:
        assert fresh.execute("SELECT count(*) FROM marts.org_summary").fetchone()[0] == 9


def test_analytics_copy_has_the_same_schemas_and_tables_as_the_working_file(start_simulator, tmp_path):
    data_dir = tmp_path / "data"
    run_pipeline(start_simulator(orgs=4, users_per_org=6, seed=2), data_dir)
    listing = ("SELECT table_schema, table_name FROM information_schema.tables "
               "WHERE table_catalog = current_database() ORDER BY ALL")
    with duckdb.connect(str(data_dir / DUCKDB_FILE), read_only=True) as working:
        tables = working.execute(listing).fetchall()
        counts = {t: working.execute(f"SELECT count(*) FROM {t[0]}.{t[1]}").fetchone() for t in tables}
    with duckdb.connect(str(data_dir / ANALYTICS_FILE), read_only=True) as copy:
        assert copy.execute(listing).fetchall() == tables
        assert {t: copy.execute(f"SELECT count(*) FROM {t[0]}.{t[1]}").fetchone() for t in tables} == counts
    assert {schema for schema, _ in tables} == {"raw", "core", "marts"}


def test_the_readme_analyst_command_opens_the_copy(start_simulator, tmp_path):
    """`duckdb -readonly data/analytics.duckdb` (the CLI the venv ships) reads tonight's summary."""
    data_dir = tmp_path / "data"
    run_pipeline(start_simulator(orgs=5, users_per_org=6, seed=3), data_dir)
    out = subprocess.run(
        [str(BIN / "duckdb"), "-readonly", str(data_dir / ANALYTICS_FILE), "-csv", "-c",
         "SELECT count(*) AS orgs FROM marts.org_summary"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert out.split() == ["orgs", "5"]
