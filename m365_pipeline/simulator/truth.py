"""Ground truth: the data contract (docs/RULES.md, rules 1-10 and 13) applied, in plain Python, to what the
simulator serves.

Deliberately independent of the pipeline (no DuckDB, no SQL, no shared helpers) and of the
generator's internals: it reads only the records the two APIs serve, through the dataset's public
iterators, so the pipeline's published numbers can be compared with it. Interpretations where
docs/RULES.md leaves room:

* rule-2 accounts are accounts of m365 tenants with ``mailbox`` true; key = ``upn.strip().lower()``;
* a UPN with rule-2 accounts in several orgs goes to the one candidate that has an m365 tenant whose
  ``domain`` is the UPN's domain, if exactly one has, else to the first candidate by rule 9;
* two S records with one key: their subscriptions are united, the display name is the smallest;
* display names and B names are compared and published stripped of spaces (only: a leading tab or CR
  is the vendor's text, kept as sent, as rule 16's JSON requires);
* an S user's UPN is ``username`` unless it is null, empty or blank, then ``email``;
* a subscription whose applicationName and name are both empty is not a license;
* ``unassigned_users`` counts every user without an organization, licensed or not;
* rule 13 reads a status as ``status.strip().lower()``; the vendor's three values only, else ``none``.
"""

from __future__ import annotations

import gc
import re
from collections import defaultdict
from functools import cache
from typing import Any

from m365_pipeline.simulator.dataset import Dataset, SimulatorConfig

_EMAIL_PATTERNS = ("Microsoft 365 Business*", "Microsoft 365 E*", "Microsoft 365 F*", "Office 365 E*",
                   "Office 365 F*", "Exchange Online (Plan*", "Exchange Online Kiosk", "Exchange Online Essentials")
_EMAIL_INCLUDE = [re.compile(".*".join(map(re.escape, p.split("*"))), re.IGNORECASE) for p in _EMAIL_PATTERNS]
_EMAIL_EXCLUDE = ("archiving", "protection")
_NOT_M365 = ("free", "trial", "exploratory")


def rule9(value: str) -> tuple[str, str]:
    """Rule 9's "case-insensitive" order."""
    return value.lower(), value


@cache  # names come from a small catalog; classifying each once keeps a million-user run fast
def is_m365_license(name: str, vendor: str | None) -> bool:
    lowered = name.lower()
    return "microsoft" in (vendor or "").lower() and not any(word in lowered for word in _NOT_M365)


@cache
def is_email_license(name: str) -> bool:
    """Rule 5, for a name that is already an M365 license."""
    lowered = name.lower()
    return any(p.fullmatch(name) for p in _EMAIL_INCLUDE) and not any(w in lowered for w in _EMAIL_EXCLUDE)


def _smallest(names: list[str | None]) -> str | None:
    stripped = [n.strip(" ") for n in names if n and n.strip(" ")]
    return min(stripped, key=rule9) if stripped else None


def ground_truth(source: Dataset | SimulatorConfig) -> dict[str, Any]:
    """The expected pipeline output for everything ``source`` serves.

    ``{"organizations": [{organization_name, es_user_count, m365_licensed_user_count}] (rule 9 order),
    "totals": {...}, "users": {organization_name: [{user_principal_name, display_name, licenses,
    has_email_license}]}, "unassigned_users": n, "multi_org_upns": [...], "raw_counts": {...}}``
    """
    ds = source if isinstance(source, Dataset) else Dataset(source)
    # Millions of long-lived records and no cycles: the cyclic GC would only rescan them again and again.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _ground_truth(ds)
    finally:
        if gc_was_enabled:
            gc.enable()


def _ground_truth(ds: Dataset) -> dict[str, Any]:
    raw = {"saas_users": 0, "saas_user_subscriptions": 0, "backup_organizations": 0, "backup_tenants": 0,
           "backup_accounts": 0}

    # Source B: organizations (rule 1), rule-2 accounts and domain ownership (rule 3).
    org_names: set[str] = set()
    tenant_domains: dict[str, set[str]] = defaultdict(set)  # org -> its m365 tenants' domains
    domain_orgs: dict[str, set[str]] = defaultdict(set)  # domain -> orgs owning it
    accounts: dict[str, list[tuple[str, str | None, bool]]] = defaultdict(list)  # key -> (org, name, licensed)
    mailbox_statuses: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # org -> key -> statuses
    for owner in ds.backup_owners():
        raw["backup_organizations"] += 1
        org = owner["organization_name"]
        org_names.add(org)
        for tenant in ds.backup_tenants(owner["id"]):
            raw["backup_tenants"] += 1
            m365 = tenant["type"] == "m365"
            if m365:
                tenant_domains[org].add(tenant["domain"].lower())
                domain_orgs[tenant["domain"].lower()].add(org)
            for account in ds.backup_accounts(owner["id"], tenant["id"]):
                raw["backup_accounts"] += 1
                if m365 and account["mailbox"] is True:
                    key = account["upn"].strip().lower()
                    accounts[key].append((org, account["name"], account["licensed"] is True))
                    mailbox_statuses[org][key].add((account["status"] or "").strip().lower())
                    domain_orgs[key.rpartition("@")[2]].add(org)

    # Source S: per key, the display names and the M365 licenses (rule 4), as (name, is_email).
    saas_names: dict[str, list[str | None]] = defaultdict(list)
    saas_licenses: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for user in ds.saas_users():
        raw["saas_users"] += 1
        upn = user["username"] if (user["username"] or "").strip() else user["email"]
        key = (upn or "").strip().lower()
        saas_names[key].append(user["displayName"])
        licenses = saas_licenses[key]
        for sub in ds.saas_subscriptions(user["id"]):
            raw["saas_user_subscriptions"] += 1
            name = sub["applicationName"] or sub["name"]
            if name and is_m365_license(name, sub["vendor"]):
                licenses.append((name, is_email_license(name)))

    def organization_of(key: str) -> str | None:  # rule 3
        domain = key.rpartition("@")[2]
        candidates = sorted({org for org, _, _ in accounts.get(key, ())}, key=rule9)
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            owning = [org for org in candidates if domain in tenant_domains[org]]
            return owning[0] if len(owning) == 1 else candidates[0]
        owners = domain_orgs.get(domain, set())
        return next(iter(owners)) if len(owners) == 1 else None

    users: dict[str, list[dict[str, Any]]] = {org: [] for org in org_names}
    unassigned = 0
    for key in saas_names.keys() | accounts.keys():
        org = organization_of(key)
        if org is None:
            unassigned += 1
            continue
        b_accounts = accounts.get(key, [])
        if key in saas_names:  # rule 6: S decides
            distinct: dict[str, str] = {}
            for name, _ in sorted(saas_licenses[key], key=lambda item: rule9(item[0])):
                distinct.setdefault(name.lower(), name)
            licensed = bool(distinct)
            has_email = any(is_email for _, is_email in saas_licenses[key])
            licenses = ", ".join(distinct.values())
        else:  # rule 6: source B stands in for users S does not know
            licensed = has_email = any(lic for _, _, lic in b_accounts)
            licenses = ""
        if licensed:  # rule 7
            display = (_smallest(saas_names.get(key, [])) or _smallest([name for _, name, _ in b_accounts])
                       or key)
            users[org].append({"user_principal_name": key, "display_name": display, "licenses": licenses,
                               "has_email_license": has_email})

    organizations = []
    for org in sorted(org_names, key=rule9):
        users[org].sort(key=lambda u: rule9(u["user_principal_name"]))
        organizations.append({"organization_name": org,
                              "es_user_count": sum(u["has_email_license"] for u in users[org]),
                              "m365_licensed_user_count": len(users[org])})
    return {
        "coverage": _coverage(organizations, users, mailbox_statuses, saas_names, accounts),
        "organizations": organizations,
        "totals": {"total_organizations": len(organizations),
                   "total_es_users": sum(o["es_user_count"] for o in organizations),
                   "total_m365_licensed_users": sum(o["m365_licensed_user_count"] for o in organizations)},
        "users": {org: users[org] for org in sorted(org_names, key=rule9)},
        "unassigned_users": unassigned,
        "multi_org_upns": sorted((k for k, accs in accounts.items() if len({a[0] for a in accs}) > 1), key=rule9),
        "raw_counts": raw,
    }


def _backup_status(statuses: set[str]) -> str:
    """Rule 13: active beats excluded beats available; no account, no status or another value is none."""
    return next((s for s in ("active", "excluded", "available") if s in statuses), "none")


def _coverage(organizations: list[dict[str, Any]], users: dict[str, list[dict[str, Any]]],
              mailbox_statuses: dict[str, dict[str, set[str]]], saas_names: dict[str, list[str | None]],
              accounts: dict[str, list[tuple[str, str | None, bool]]]) -> dict[str, Any]:
    """Rule 13 per organization: ``{"organizations": [...], "totals": {...}, "users": {org: [rows]}}``."""
    rows_by_org: dict[str, list[dict[str, Any]]] = {}
    counts = []
    for summary in organizations:
        org = summary["organization_name"]
        published = {u["user_principal_name"]: u for u in users[org]}
        statuses = mailbox_statuses.get(org, {})
        rows = []
        for key in sorted(published.keys() | statuses.keys(), key=rule9):
            user = published.get(key)
            display = user["display_name"] if user else (
                _smallest(saas_names.get(key, [])) or _smallest([name for _, name, _ in accounts[key]]) or key)
            rows.append({"user_principal_name": key, "display_name": display, "m365_licensed": user is not None,
                         "has_email_license": bool(user and user["has_email_license"]),
                         "backup_status": _backup_status(statuses.get(key, set()))})
        rows_by_org[org] = rows
        email = [r for r in rows if r["has_email_license"]]
        backed_up = sum(r["backup_status"] == "active" for r in email)
        counts.append({"organization_name": org, "es_user_count": len(email), "es_users_backed_up": backed_up,
                       "es_users_not_backed_up": len(email) - backed_up,
                       "backed_up_without_email_license": sum(r["backup_status"] == "active"
                                                              and not r["has_email_license"] for r in rows)})
    totals = {"total_organizations": len(counts),
              "total_es_users": sum(c["es_user_count"] for c in counts),
              "total_es_users_backed_up": sum(c["es_users_backed_up"] for c in counts),
              "total_es_users_not_backed_up": sum(c["es_users_not_backed_up"] for c in counts),
              "total_backed_up_without_email_license": sum(c["backed_up_without_email_license"] for c in counts)}
    return {"organizations": counts, "totals": totals, "users": rows_by_org}
