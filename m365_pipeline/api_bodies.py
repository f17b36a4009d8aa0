"""Every body the Dashboard API can give, and the manifest key and file of each: defined here once.

The export step writes these bodies as the files of a published version (``publishing.py``); m365-serve
reads them by the same keys, and makes the few bodies it answers per request (``/changes``,
``/history?org`` as CSV) with the same builders. The one CSV writer is ``csv_bytes``: RFC 4180 quoting,
CRLF records, booleans ``true``/``false``, and rule 16's neutralised text cells (``neutralise``; its SQL
twin ``csv_neutralise`` in sql/macros.sql serves DuckDB's COPY of the export and the coverage rows).
"""

from __future__ import annotations

import csv
import hashlib
import io
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

FORMATS = ("json", "csv")
CONTENT_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8"}
SORT_FIELDS = ("organization_name", "user_principal_name", "display_name")

# -- the rows' fields, in the documented order ------------------------------------------------------
SUMMARY_FIELDS = ("organization_name", "es_user_count", "m365_licensed_user_count")
SUMMARY_TOTALS = ("total_organizations", "total_es_users", "total_m365_licensed_users")
USER_FIELDS = ("user_principal_name", "display_name", "licenses", "has_email_license")
EXPORT_FIELDS = ("organization_name", *USER_FIELDS)
# GET /api/m365/coverage rows (docs/RULES.md, rule 13).
COVERAGE_ORG_FIELDS = ("organization_name", "es_user_count", "es_users_backed_up", "es_users_not_backed_up",
                       "backed_up_without_email_license")
# The overview's totals: one per count above, in the same order.
COVERAGE_TOTALS = ("total_es_users", "total_es_users_backed_up", "total_es_users_not_backed_up",
                   "total_backed_up_without_email_license")
COVERAGE_USER_FIELDS = ("user_principal_name", "display_name", "m365_licensed", "has_email_license", "backup_status")
HISTORY_FIELDS = ("date", "es_user_count", "m365_licensed_user_count")
CHANGE_FIELDS = (
    "organization_name", "previous_organization_name", "user_principal_name", "display_name", "change",
    "licenses_before", "licenses_after", "has_email_license_before", "has_email_license_after",
)
CHANGE_KINDS = ("added", "removed", "moved", "email_gained", "email_lost", "licenses_changed")
# GET /api/m365/billing (rules 14 and 15): each metric on each basis.
BILLING_METRICS = ("es_user_count", "m365_licensed_user_count", "backup_seats")
BILLING_BASES = ("peak", "end", "seat_days", "average")
BILLING_HEADER = ("month", "closed", "sha256", "nights", "first_night", "last_night", "days")
BILLING_ORG_FIELDS = ("organization_name", "nights",
                      *(f"{metric}_{basis}" for metric in BILLING_METRICS for basis in BILLING_BASES))
BILLING_TOTALS = ("total_organizations", *(f"total_{field}" for field in BILLING_ORG_FIELDS[2:]))
BILLING_LICENSE_FIELDS = ("license_name", *(f"users_{basis}" for basis in BILLING_BASES))
BILLING_ITEM_FIELDS = ("organization_name", "item_kind", "item", *BILLING_BASES)
# A billing month's files (billing_key): its report, its items list, every organization's report.
BILLING_PARTS = ("report", "items", "organizations")
BILLING_ORG_AVERAGES = tuple(field for field in BILLING_ORG_FIELDS if field.endswith("_average"))


# -- encoders -----------------------------------------------------------------------------------------
def json_bytes(payload: Any) -> bytes:
    """Compact UTF-8 JSON, the bytes of the stdlib's ``json.dumps(ensure_ascii=False, separators=(",", ":"))``
    for the values the API writes (text, counts, booleans, null, hundredths: test_api_bodies proves it), at
    a fraction of its CPU. Unlike the stdlib it writes floats below 1e-4 or from 1e16 up without an
    exponent's sign or zero padding, and Decimals as strings: the billing averages are made floats first."""
    return msgspec.json.encode(payload)


# Rule 16 (OWASP's advice on CSV injection): what a spreadsheet would read as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """A CSV text cell as rule 16 writes it: with a leading ``'`` when it starts like a formula.

    Only text is touched, as OWASP advises: counts and booleans are written as they are (a count is
    never negative, and no number or boolean is text someone typed). The SQL macro csv_neutralise
    (sql/macros.sql) is the same rule for DuckDB's writers; test_csv_injection proves them equal.
    """
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def csv_cell(value: Any) -> Any:
    if value.__class__ is int:  # the common cell, a count: as it is
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return neutralise(value)
    return "" if value is None else value


def csv_bytes(fields: Sequence[str], rows: Iterable[Mapping[str, Any] | Sequence[Any]]) -> bytes:
    """The API's CSV: a header of ``fields``, then one record per row (a mapping, or values in
    ``fields``' order); RFC 4180 quoting by the csv module, CRLF records, rule 16's cells."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(fields)
    cells = operator.itemgetter(*fields) if len(fields) > 1 else lambda row: (row[fields[0]],)
    writer.writerows(map(csv_cell, cells(row) if isinstance(row, Mapping) else row) for row in rows)
    return out.getvalue().encode("utf-8")


def body(fmt: str, fields: Sequence[str], rows: list[Any], envelope: dict[str, Any]) -> bytes:
    """JSON: ``envelope`` as it is; CSV: ``rows`` under a header of ``fields``."""
    return csv_bytes(fields, rows) if fmt == "csv" else json_bytes(envelope)


# -- manifest keys and the files they name --------------------------------------------------------------
def name_digest(organization_name: str) -> str:
    """A fixed-length, filesystem-safe name derived from the exact organization name."""
    return hashlib.sha256(organization_name.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def summary_key(fmt: str) -> str:
    return "summary" if fmt == "json" else f"summary:{fmt}"


def summary_file_name(fmt: str) -> str:
    return f"summary.{fmt}"


def users_file_name(organization_name: str) -> str:
    return f"users/{name_digest(organization_name)}.json"


def users_key(organization_name: str) -> str:
    return f"users:{users_file_name(organization_name)}"


def export_key(sort: str, fmt: str) -> str:
    return f"export:{fmt}:{sort}"


def export_file_name(sort: str, fmt: str) -> str:
    return f"export/{sort}.{fmt}"


def coverage_key(organization_name: str | None, fmt: str) -> str:
    """Manifest key of a coverage file: the overview (no organization) or one organization's rows."""
    return f"coverage:{fmt}" if organization_name is None else f"coverage:{fmt}:{name_digest(organization_name)}"


def coverage_file_name(organization_name: str | None, fmt: str) -> str:
    stem = "organizations" if organization_name is None else name_digest(organization_name)
    return f"coverage/{stem}.{fmt}"


def history_key(fmt: str, file_key: str | None = None) -> str:
    """The totals' history file, or (versions older than ORGANIZATION_HISTORY_FILE) an organization's."""
    return f"history:{fmt}" + (f":{file_key}" if file_key else "")


def history_file_name(fmt: str) -> str:
    return f"history/all.{fmt}"


def changes_key(fmt: str, night: str) -> str:
    """A changes file of versions published before CHANGED_USERS_FILE: from ``night`` to their tonight."""
    return f"changes:{fmt}:{night}"


def billing_key(month: str, part: str, fmt: str) -> str:
    """A billing month's file: its ``report`` (per organization), ``items`` list, or ``organizations``
    (every organization's report, one body after the other: the manifest's billing entry gives each
    one's [offset, length])."""
    return f"billing:{part}:{fmt}:{month}"


def billing_file_name(month: str, part: str, fmt: str) -> str:
    return f"billing/{month}/{part}.{fmt}"


# In each published version: the marts.published_users_history rows of every user whose rows changed
# on a kept night (see nights.write_changed_users), all m365-serve needs to answer /changes.
CHANGED_USERS_FILE = "history/changed_users.parquet"
# In each published version: every organization's /history body (JSON), one after the other; the
# manifest's history_organizations maps each exact name to its [offset, length] in this file.
ORGANIZATION_HISTORY_FILE = "history/organizations.json"


# -- bodies ---------------------------------------------------------------------------------------------
def summary_totals(organizations: Sequence[Sequence[Any]]) -> dict[str, int]:
    """The summary's totals over rows (organization_name, es_user_count, m365_licensed_user_count, ...)."""
    return {
        "total_organizations": len(organizations),
        "total_es_users": int(sum(row[1] for row in organizations)),
        "total_m365_licensed_users": int(sum(row[2] for row in organizations)),
    }


def summary_body(organizations: Sequence[Sequence[Any]], last_collected: str | None, query_time_ms: int,
                 fmt: str) -> bytes:
    """GET /api/m365/summary from rows in SUMMARY_FIELDS' order (rule 8). Its CSV is the organization
    rows only (the totals are their sums; a totals row would be read as one more organization)."""
    rows = [dict(zip(SUMMARY_FIELDS, (name, int(es), int(m365)), strict=True))
            for name, es, m365, *_ in organizations]
    return body(fmt, SUMMARY_FIELDS, rows, {
        "status": "success", "organizations": rows, "totals": summary_totals(organizations),
        "last_collected": last_collected, "metadata": {"query_time_ms": query_time_ms},
    })


def users_body(organization_name: str, rows: list[dict[str, Any]]) -> bytes:
    """GET /api/m365/users?org=NAME from rows of USER_FIELDS."""
    return json_bytes({"status": "success", "organization": organization_name, "users": rows,
                       "total_users": len(rows)})


def export_json_envelope(total_records: int, last_collected: str | None) -> tuple[bytes, bytes]:
    """What goes before and after the export's JSON array of EXPORT_FIELDS objects (streamed by DuckDB)."""
    return (b'{"status":"success","data":',
            b',"total_records":' + str(total_records).encode() + b',"last_collected":' + json_bytes(last_collected)
            + b"}")


def coverage_overview_body(organizations: list[tuple], last_collected: str | None, fmt: str) -> bytes:
    """GET /api/m365/coverage from rows in COVERAGE_ORG_FIELDS' order."""
    rows = [dict(zip(COVERAGE_ORG_FIELDS, row, strict=True)) for row in organizations]
    return body(fmt, COVERAGE_ORG_FIELDS, rows, {"status": "success", "organizations": rows,
                                                 "totals": coverage_totals(organizations),
                                                 "last_collected": last_collected})


def coverage_totals(organizations: list[tuple]) -> dict[str, int]:
    sums = [int(sum(row[i] for row in organizations)) for i in range(1, len(COVERAGE_ORG_FIELDS))]
    return {"total_organizations": len(organizations), **dict(zip(COVERAGE_TOTALS, sums, strict=True))}


def coverage_organization_json(organization_name: str, user_objects: list[str]) -> bytes:
    """GET /api/m365/coverage?org=NAME around its users' JSON objects (already encoded, as json_bytes would)."""
    return b"".join((b'{"status":"success","organization":', json_bytes(organization_name), b',"users":[',
                     ",".join(user_objects).encode("utf-8"), b'],"total_users":', str(len(user_objects)).encode(),
                     b"}"))


def coverage_organization_body(organization_name: str, rows: list[tuple], fmt: str) -> bytes:
    """GET /api/m365/coverage?org=NAME from rows in COVERAGE_USER_FIELDS' order."""
    if fmt == "csv":
        return csv_bytes(COVERAGE_USER_FIELDS, rows)
    users = [json_bytes(dict(zip(COVERAGE_USER_FIELDS, row, strict=True))).decode("utf-8") for row in rows]
    return coverage_organization_json(organization_name, users)


def csv_header(fields: Sequence[str]) -> str:
    """The header record csv_bytes writes (field names need no quoting)."""
    return ",".join(fields) + "\r\n"


def history_body(organization: str | None, rows: list[dict[str, Any]], fmt: str) -> bytes:
    """GET /api/m365/history[?org=NAME] (rule 11) from rows of HISTORY_FIELDS."""
    return body(fmt, HISTORY_FIELDS, rows, {"status": "success", "organization": organization, "history": rows})


def changes_body(from_collected: str, to_collected: str, rows: list[dict[str, Any]], fmt: str) -> bytes:
    """GET /api/m365/changes (rule 12) from rows of CHANGE_FIELDS."""
    return body(fmt, CHANGE_FIELDS, rows, {"status": "success", "from": from_collected, "to": to_collected,
                                           "changes": rows, "total_changes": len(rows)})


def billing_month_bodies(header: dict[str, Any], organizations: list[dict[str, Any]], items: list[dict[str, Any]]
                         ) -> dict[tuple[str, str | None, str], bytes]:
    """Every body of one billing month (rule 14): {(part, organization or None, fmt): bytes}, parts
    ``report`` (GET /billing), ``items`` (GET /billing/items) and ``organizations`` (GET /billing?org=).

    ``header`` holds BILLING_HEADER but sha256, which is made here: a closed month's is the SHA-256 of
    the CSV it answers (rule 15: the report's CSV for the report and each organization, the items' for
    the items), an open month's is null. An organization's license rows are its ``license`` items.
    Averages are exact hundredths (DECIMAL) written as numbers.
    """
    organizations = [_numbers(row, BILLING_ORG_AVERAGES) for row in organizations]
    items = [_numbers(row, ("average",)) for row in items]
    report_csv = csv_bytes(BILLING_ORG_FIELDS, organizations)
    items_csv = csv_bytes(BILLING_ITEM_FIELDS, items)

    def head(csv_body: bytes) -> dict[str, Any]:
        sealed = hashlib.sha256(csv_body).hexdigest() if header["closed"] else None
        return {"status": "success", **{name: sealed if name == "sha256" else header[name] for name in BILLING_HEADER}}

    totals = {"total_organizations": len(organizations)}
    for field in BILLING_ORG_FIELDS[2:]:
        total = sum(row[field] for row in organizations)
        totals[f"total_{field}"] = round(total, 2) if field.endswith("_average") else total
    report_head = head(report_csv)
    bodies = {
        ("report", None, "csv"): report_csv,
        ("report", None, "json"): json_bytes({**report_head, "organizations": organizations, "totals": totals}),
        ("items", None, "csv"): items_csv,
        ("items", None, "json"): json_bytes({**head(items_csv), "items": items, "total_items": len(items)}),
    }
    licenses: dict[str, list[dict[str, Any]]] = {row["organization_name"]: [] for row in organizations}
    for item in items:
        if item["item_kind"] == "license":
            licenses[item["organization_name"]].append(
                {"license_name": item["item"], **{f"users_{basis}": item[basis] for basis in BILLING_BASES}})
    for row in organizations:
        name = row["organization_name"]
        bodies[("organizations", name, "csv")] = csv_bytes(BILLING_LICENSE_FIELDS, licenses[name])
        bodies[("organizations", name, "json")] = json_bytes(
            {**report_head, "organization": name, "summary": row, "licenses": licenses[name]})
    return bodies


def _numbers(row: dict[str, Any], averages: Sequence[str]) -> dict[str, Any]:
    """DuckDB's DECIMAL averages as JSON numbers (the nearest double of a 2-decimal value prints as it)."""
    for name in averages:
        row[name] = float(row[name])
    return row
