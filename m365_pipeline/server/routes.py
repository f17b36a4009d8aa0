"""The API's routes over the published version: which file (or request-time body) answers each
documented path and query (docs/RULES.md for the contract of each)."""

from __future__ import annotations

import json
import re
from typing import Any

from m365_pipeline.api_bodies import CONTENT_TYPES, FORMATS, SORT_FIELDS, changes_body, changes_key, history_body
from m365_pipeline.history_api import BadDate, night_a, parse_date
from m365_pipeline.publishing import PublishedFile, PublishedVersion

from .http import HttpError, Response, represent
from .published import ByteCache, Changes, file_response, generated_response

API_PREFIX = "/api/m365/"
ENDPOINTS = ("summary", "users", "export", "history", "changes", "coverage", "billing", "billing/items")
_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def route(endpoint: str, params: dict[str, str], version: PublishedVersion, changes: Changes | None,
          cache: ByteCache, headers: Any) -> Response:
    if endpoint in ("history", "changes"):
        return _nights_route(endpoint, params, version, changes, cache, headers)
    if endpoint.startswith("billing"):
        return _billing_route(endpoint, params, version, cache, headers)
    published, disposition = _file_route(endpoint, params, version)
    return file_response(headers, published, version, disposition, cache)


def _format(params: dict[str, str]) -> str:
    fmt = params.get("format", "json")
    if fmt not in FORMATS:
        raise HttpError(400, f"unknown format {fmt[:40]!r}; use one of: {', '.join(FORMATS)}")
    return fmt


def _file_route(endpoint: str, params: dict[str, str], version: PublishedVersion
                ) -> tuple[PublishedFile, str | None]:
    if endpoint == "summary":
        return _summary_route(params, version)
    if endpoint == "coverage":
        return _coverage_route(params, version)
    if endpoint == "users":
        if _format(params) != "json":
            raise HttpError(400, "format csv is not offered for one organization's users; use "
                                 "/api/m365/export?format=csv for every user, or leave format out")
        org = params.get("org")
        if not org:
            raise HttpError(400, "missing required parameter: org")
        published = version.users(org)
        if published is None:
            raise HttpError(404, f"organization not found: {org[:200]}")
        return published, None
    fmt = _format(params)
    sort = params.get("sort", "organization_name")
    if sort not in SORT_FIELDS:
        raise HttpError(400, f"unknown sort {sort[:40]!r}; use one of: {', '.join(SORT_FIELDS)}")
    disposition = None
    if fmt == "csv":
        day = version.published_at.strftime("%Y-%m-%d")
        disposition = f'attachment; filename="m365-users-{day}.csv"'
    return version.export(sort, fmt), disposition


def _summary_route(params: dict[str, str], version: PublishedVersion) -> tuple[PublishedFile, str | None]:
    """GET /api/m365/summary[?format=json|csv]: the per-organization counts; the CSV for billing staff."""
    fmt = _format(params)
    published = version.summary(fmt)
    if fmt == "json":
        return published, None
    if published is None:
        raise HttpError(404, "the summary CSV is not in this published version: it was published before "
                             "the pipeline wrote it; the next pipeline run publishes it")
    day = version.published_at.strftime("%Y-%m-%d")
    return published, f'attachment; filename="m365-summary-{day}.csv"'


def _coverage_route(params: dict[str, str], version: PublishedVersion) -> tuple[PublishedFile, str | None]:
    """GET /api/m365/coverage[?org=NAME][&format=json|csv] (docs/RULES.md, rule 13)."""
    fmt = _format(params)
    org = params.get("org")
    if org is not None and not org:
        raise HttpError(400, "parameter org is empty; omit it for every organization")
    if not version.has_coverage:
        raise HttpError(404, "backup coverage is not available: source B (the backup reseller, "
                             "BACKUP_API_BASE_URL) was not configured when this data was published")
    published = version.coverage(org, fmt)
    if published is None:
        raise HttpError(404, f"organization not found: {org[:200]}")
    disposition = None
    if fmt == "csv":
        day = version.published_at.strftime("%Y-%m-%d")
        # Only safe characters of the name reach the header; the body holds the exact name.
        slug = "" if org is None else "-" + re.sub(r"[^A-Za-z0-9]+", "-", org).strip("-")[:60]
        disposition = f'attachment; filename="m365-coverage-{day}{slug.rstrip("-")}.csv"'
    return published, disposition


# -- billing months (docs/RULES.md, rules 14 and 15) -------------------------------------------
def _billing_route(endpoint: str, params: dict[str, str], version: PublishedVersion, cache: ByteCache,
                   headers: Any) -> Response:
    """GET /api/m365/billing[?month][&org][&format] and /billing/items[?month][&format]: the month's files as
    the publish step wrote them (a closed month's are its sealed bytes)."""
    fmt = _format(params)
    month = params.get("month")
    if month is None:
        if not version.nights:
            raise HttpError(404, "no night is kept yet, so there is no billing month")
        month = version.nights[-1]["date"][:7]  # tonight's night's month
    elif not _MONTH.fullmatch(month):
        raise HttpError(400, f"month must be written YYYY-MM (01 to 12), not {month[:40]!r}")
    if month not in version.billing_months:
        raise HttpError(404, f"no billing month {month}: no night is kept in it")
    org = params.get("org")
    if endpoint == "billing/items" and org is not None:
        raise HttpError(400, "billing/items lists every organization; leave org out, or use /api/m365/billing?org=")
    suffix = "-items" if endpoint == "billing/items" else ""
    if org is None:
        disposition = f'attachment; filename="m365-billing-{month}{suffix}.csv"' if fmt == "csv" else None
        part = "items" if endpoint == "billing/items" else "report"
        return file_response(headers, version.billing(month, part, fmt), version, disposition, cache)
    if not org:
        raise HttpError(400, "parameter org is empty; omit it for every organization")
    body = version.billing_organization(month, org, fmt)
    if body is None:
        raise HttpError(404, f"organization not in the billing report of {month}: {org[:200]}")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", org).strip("-")[:60].rstrip("-")
    disposition = f'attachment; filename="m365-billing-{month}-{slug}.csv"' if fmt == "csv" else None
    return generated_response(headers, version, represent(body), CONTENT_TYPES[fmt], disposition)


# -- history and changes (docs/RULES.md, rules 11 and 12) ------------------------------------
def _nights_route(endpoint: str, params: dict[str, str], version: PublishedVersion, changes: Changes | None,
                  cache: ByteCache, headers: Any) -> Response:
    fmt = _format(params)
    org = params.get("org")
    if org == "":
        raise HttpError(400, "org must not be empty; leave it out for all organizations")
    if org is not None and org not in version.history_organizations:
        raise HttpError(404, f"organization not found on any kept night: {org[:200]}")
    if not version.nights:
        if endpoint == "history":  # zero kept nights: zero rows (a version published before nights were kept)
            made = represent(history_body(None, [], fmt))  # a few bytes: no gzip twin
            return generated_response(headers, version, made, CONTENT_TYPES[fmt], None)
        raise HttpError(404, "no night is kept yet")
    tonight = version.nights[-1]["date"]
    if endpoint == "history":
        disposition = f'attachment; filename="m365-history-{tonight}.csv"' if fmt == "csv" else None
        if org is not None and version.organization_history is not None:
            offset, length = version.history_organizations[org]
            with version.organization_history.open("rb") as history:
                history.seek(offset)
                body = history.read(length)  # the organization's JSON body; its CSV is made from it
            if fmt == "csv":
                body = history_body(org, json.loads(body)["history"], fmt)
            return generated_response(headers, version, represent(body), CONTENT_TYPES[fmt], disposition)
        key = version.history_organizations[org] if org is not None else None  # older versions: a file each
        return file_response(headers, version.history(fmt, key), version, disposition, cache)
    since = params.get("since")
    if since is not None:
        try:
            since = parse_date(since)
        except BadDate as exc:
            raise HttpError(400, str(exc)) from None
    dates = [night["date"] for night in version.nights]
    night = night_a(dates, since)
    if night is None:
        raise HttpError(404, f"no kept night on or before {since}" if since is not None
                        else "only one night is kept: there is no earlier night to compare with")
    disposition = f'attachment; filename="m365-changes-{night}-to-{tonight}.csv"' if fmt == "csv" else None
    if version.changed_users is None or changes is None:
        return _changes_of_an_older_version(headers, version, night, org, fmt, disposition, cache)
    return generated_response(headers, version, changes.get(night, org, fmt), CONTENT_TYPES[fmt], disposition)


def _changes_of_an_older_version(headers: Any, version: PublishedVersion, night: str, org: str | None,
                                 fmt: str, disposition: str | None, cache: ByteCache) -> Response:
    """Versions published before the changed users' history held a changes file per kept night (from
    it to their tonight): served as they are, or selected for ``org``, until the next run publishes."""
    if changes_key("json", night) not in version.files:
        raise HttpError(404, "changes are not available in this version: it was published before the "
                             "pipeline kept them; the next pipeline run publishes them")
    if org is None:
        return file_response(headers, version.files[changes_key(fmt, night)], version, disposition, cache)
    published = json.loads(version.files[changes_key("json", night)].path.read_bytes())
    rows = [row for row in published["changes"]
            if org in (row["organization_name"], row["previous_organization_name"])]
    body = changes_body(published["from"], published["to"], rows, fmt)
    return generated_response(headers, version, represent(body), CONTENT_TYPES[fmt], disposition)
