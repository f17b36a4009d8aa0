"""The coverage files of GET /api/m365/coverage are joined from rows DuckDB formats (assets/coverage.py).
Whatever the text, each file must be byte for byte what the reference encoders write from the same rows:
json.dumps (as json_bytes) and Python's csv module (as csv_bytes), which the API's contract tests read."""

from __future__ import annotations

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m365_pipeline.api_bodies import COVERAGE_ORG_FIELDS, COVERAGE_USER_FIELDS, coverage_key, csv_bytes, json_bytes
from m365_pipeline.assets.coverage import write_coverage_files
from m365_pipeline.publishing import VersionWriter

STATUSES = ("active", "excluded", "available", "none")
# Any text a vendor could send: every plane, control characters, quotes, commas, CR/LF, markup.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)
ROW = st.tuples(st.sampled_from(("Acme", 'Q&A, "Labs"\r\n', "Zeta\x1f")), TEXT, st.one_of(st.none(), TEXT),
                st.booleans(), st.booleans(), st.sampled_from(STATUSES))


def published(tmp_path, rows: list[tuple]) -> tuple[VersionWriter, dict]:
    """Write the coverage files of ``rows`` (organization, key suffix, name, licensed, email, status), with
    one organization without rows; returns the writer and, per organization, its rows in rule 9's order."""
    conn = duckdb.connect()
    conn.execute("CREATE SCHEMA core; CREATE SCHEMA marts")
    conn.execute("""CREATE TABLE core.backup_coverage (organization_name VARCHAR, user_principal_name VARCHAR,
                    display_name VARCHAR, m365_licensed BOOLEAN, has_email_license BOOLEAN, backup_status VARCHAR)""")
    conn.execute(f"CREATE TABLE marts.org_backup_coverage ({', '.join(f'{f} BIGINT' for f in COVERAGE_ORG_FIELDS)})"
                 .replace("organization_name BIGINT", "organization_name VARCHAR"))
    expected: dict[str, list[tuple]] = {"Empty": []}
    for index, (org, suffix, name, licensed, email, status) in enumerate(rows):
        key = f"{index:04d}{suffix}"  # a distinct, case-free prefix: rule 9's order is the index order
        conn.execute("INSERT INTO core.backup_coverage VALUES (?, ?, ?, ?, ?, ?)", [org, key, name, licensed, email,
                                                                                    status])
        expected.setdefault(org, []).append((key, name, licensed, email, status))
    for org in expected:
        conn.execute("INSERT INTO marts.org_backup_coverage VALUES (?, 0, 0, 0, 0)", [org])
    writer = VersionWriter(tmp_path)
    write_coverage_files(conn, writer, None)
    return writer, expected


def file_bytes(writer: VersionWriter, org: str, fmt: str) -> bytes:
    return (writer.path / writer.files[coverage_key(org, fmt)]["path"]).read_bytes()


def reference(org: str, rows: list[tuple]) -> dict[str, bytes]:
    users = [dict(zip(COVERAGE_USER_FIELDS, row, strict=True)) for row in rows]
    return {"json": json_bytes({"status": "success", "organization": org, "users": users,
                                "total_users": len(rows)}),
            "csv": csv_bytes(COVERAGE_USER_FIELDS, rows)}


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(ROW, max_size=25))
def test_coverage_files_are_byte_identical_to_the_reference_encoders_for_any_text(tmp_path_factory, rows):
    writer, expected = published(tmp_path_factory.mktemp("coverage-files"), rows)
    for org, org_rows in expected.items():
        for fmt, body in reference(org, org_rows).items():
            assert file_bytes(writer, org, fmt) == body, (org, fmt)


@pytest.mark.parametrize("name", ["Plain Name", 'Quote "q", comma', "CR\r\nLF", "Ctrl\x01\x1f\x7f", "Tab\tBack\\slash",
                                  "</script><b>x</b>", "漢字 😀 \u2028", ""])
def test_coverage_files_match_the_reference_encoders_on_hostile_names(tmp_path, name):
    rows = [("Acme", "@acme.com", name, True, True, "active"), ("Acme", "b@acme.com", None, False, False, "none")]
    writer, expected = published(tmp_path, rows)
    for fmt, body in reference("Acme", expected["Acme"]).items():
        assert file_bytes(writer, "Acme", fmt) == body
