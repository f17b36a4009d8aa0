"""The vendor simulator over real HTTP on 127.0.0.1: paging, tokens, data mess, faults, scale, CLI."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import requests

from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig, ground_truth

SMALL = SimulatorConfig(orgs=5, users_per_org=10, seed=1)
SAAS = {"Authorization": f"Bearer {SMALL.saas_token}"}
CLI = [sys.executable, "-m", "m365_pipeline.simulator.cli"]


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SMALL) as running:
        yield running


def backup_headers(token: str = SMALL.admin_token, reseller: str = SMALL.reseller_token) -> dict[str, str]:
    return {"X-Reseller-Token": reseller, "X-Access-Token": token}


def owner_headers(sim: Simulator, index: int) -> dict[str, str]:
    return backup_headers(sim.dataset.owners[index].token)


def saas_get(sim: Simulator, path: str, **params: Any) -> requests.Response:
    return requests.get(sim.saas_base_url + path, params=params, headers=SAAS, timeout=10)


def backup_get(sim: Simulator, path: str, headers: dict[str, str] | None = None, **params: Any
               ) -> requests.Response:
    return requests.get(sim.backup_base_url + path, params=params, headers=headers or backup_headers(), timeout=10)


def walk_saas(sim: Simulator, path: str, page_size: int) -> tuple[list[dict[str, Any]], int]:
    """All items, following total_pages (docs/RULES.md, Source S); returns (items, pages fetched)."""
    items: list[dict[str, Any]] = []
    page = 1
    while True:
        body = saas_get(sim, path, page_size=page_size, page_number=page).json()
        assert body["pagination"]["page_size"] == page_size and body["pagination"]["page_number"] == page
        items += body["items"]
        if page >= body["pagination"]["total_pages"]:
            assert len(items) == body["pagination"]["total_items"]
            return items, page
        page += 1


def walk_backup(sim: Simulator, path: str, headers: dict[str, str], per_page: int, **params: Any
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All records, following next_page until it is absent; returns (records, paginations)."""
    records, paginations, page = [], [], 1
    while True:
        body = backup_get(sim, path, headers, page=page, per_page=per_page, **params).json()
        records += body["data"]
        paginations.append(body["pagination"])
        if "next_page" not in body["pagination"]:
            return records, paginations
        page = body["pagination"]["next_page"]


def tenant_path(sim: Simulator, owner: int, tenant: int = 0) -> str:
    o = sim.dataset.owners[owner]
    return f"/users/{o.id}/tenants/{o.tenants[tenant].id}/accounts"


# --- source S paging -------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [1, 7, 100, 1000])
def test_saas_users_page_by_total_pages_and_match_the_dataset(sim: Simulator, page_size: int) -> None:
    items, pages = walk_saas(sim, "/users", page_size)
    total = sim.dataset.saas_user_count
    assert pages == -(-total // page_size)
    assert items == list(sim.dataset.saas_users())
    assert len({u["id"] for u in items}) == total


def test_saas_default_page_past_the_end_and_fields(sim: Simulator) -> None:
    body = saas_get(sim, "/users").json()
    assert body["pagination"] == {"page_size": 100, "page_number": 1, "total_pages": 1,
                                  "total_items": sim.dataset.saas_user_count}
    assert set(body["items"][0]) == {
        "country", "createdDate", "department", "discoveryTypes", "displayName", "email", "id", "isEnabled",
        "isInReview", "isOnline", "isQualified", "lastActive", "licenseCount", "potentialSavings", "status",
        "userCostPerMonth", "username"}
    past = saas_get(sim, "/users", page_size=10, page_number=99).json()
    assert past["items"] == [] and past["pagination"]["total_pages"] == -(-sim.dataset.saas_user_count // 10)


def test_saas_with_no_users_has_zero_pages() -> None:
    with Simulator(SimulatorConfig(orgs=0, users_per_org=10)) as empty:
        assert saas_get(empty, "/users").json() == {
            "pagination": {"page_size": 100, "page_number": 1, "total_pages": 0, "total_items": 0}, "items": []}


@pytest.mark.parametrize("params", [{"page_size": 1001}, {"page_size": 0}, {"page_size": "ten"},
                                    {"page_number": 0}, {"page_number": "x"}])
def test_saas_rejects_bad_paging_with_400_json(sim: Simulator, params: dict[str, Any]) -> None:
    response = saas_get(sim, "/users", **params)
    assert response.status_code == 400 and response.json()["code"] == 400


def test_saas_subscriptions_page_and_unknown_users_are_404(sim: Simulator) -> None:
    zoo = next(u for u in sim.dataset.saas_users() if u["email"].startswith("license.zoo@"))
    subs, pages = walk_saas(sim, f"/users/{zoo['id']}/subscriptions", page_size=5)
    assert pages > 3 and subs == list(sim.dataset.saas_subscriptions(zoo["id"]))
    assert set(subs[0]) == {"applicationId", "applicationName", "discoverySource", "discoveryType",
                            "firstDiscovered", "id", "lastActivity", "name", "potentialSavings",
                            "totalCostPerMonth", "vendor", "vendorId"}
    tampered = ("0" if zoo["id"][0] != "0" else "1") + zoo["id"][1:]
    last_group = zoo["id"][:-12] + "fffff0000000"
    for bad in (tampered, last_group, "not-a-uuid", "2f86b198-04f3-4770-ad08-b32518206da0"):
        response = saas_get(sim, f"/users/{bad}/subscriptions")
        assert response.status_code == 404 and response.json()["code"] == 404


@pytest.mark.parametrize("night", [0, 9, 27])
def test_each_users_subscriptions_add_up_to_their_user_record(night: int) -> None:
    """Two derivations must agree: the user record counts and costs its subscriptions from their digests
    alone, and a subscriptions call makes only the slot's draws, not the whole user (both are the pull's
    hot paths). What the subscriptions endpoint serves must be what the listed user record counts and
    costs, over HTTP, special slots, a deleted user and later nights included."""
    with Simulator(SimulatorConfig(orgs=30, seed=5, night=night)) as sim:
        gone = sim.dataset.delete_saas_user(3)  # one of acme's special slots
        users, _ = walk_saas(sim, "/users", page_size=100)
        assert len(users) > 400 and gone not in {user["id"] for user in users}
        assert saas_get(sim, f"/users/{gone}/subscriptions").status_code == 404
        for user in users:
            subs, _ = walk_saas(sim, f"/users/{user['id']}/subscriptions", page_size=100)
            assert len(subs) == user["licenseCount"], user["email"]
            assert sum(sub["totalCostPerMonth"] for sub in subs) == user["userCostPerMonth"], user["email"]
            assert sum(sub["potentialSavings"] for sub in subs) == user["potentialSavings"], user["email"]
    # Not vacuous: users with several subscriptions, costs and savings are among them.
    assert max(user["licenseCount"] for user in users) > 10  # the license zoo
    assert sum(user["potentialSavings"] > 0 for user in users) > 50


# --- source B paging -------------------------------------------------------------------------------
def test_backup_tenants_follow_the_documented_paging(sim: Simulator) -> None:
    acme = sim.dataset.owners[0]
    path = f"/users/{acme.id}/tenants"
    records, paginations = walk_backup(sim, path, owner_headers(sim, 0), per_page=1)
    assert records == list(sim.dataset.backup_tenants(acme.id)) and len(records) == 3
    assert paginations[0] == {"current_page": 1, "per_page": 1, "next_page": 2,
                              "next_url": f"/api{path}?page=2&per_page=1"}
    assert paginations[1]["prev_url"] == f"/api{path}?page=1&per_page=1" and paginations[1]["next_page"] == 3
    assert paginations[-1] == {"current_page": 3, "per_page": 1, "prev_page": 2,
                               "prev_url": f"/api{path}?page=2&per_page=1"}
    assert set(records[0]) == {"id", "organization_id", "created_at", "updated_at", "domain", "status",
                               "total_users", "type"}
    # No paging parameters: one page of up to 100 (the default per_page; docs/RULES.md, Source B), no links.
    whole = backup_get(sim, path, owner_headers(sim, 0)).json()
    assert whole["pagination"] == {"current_page": 1, "per_page": 100} and whole["data"] == records
    past = backup_get(sim, path, owner_headers(sim, 0), type="m365", page=5).json()
    assert past == {"pagination": {"current_page": 5, "per_page": 0, "prev_page": 1,
                                   "prev_url": f"/api{path}?type=m365&page=1"}, "data": []}


@pytest.mark.parametrize(("type_", "expected"), [("m365", 2), ("gws", 1), ("", 3)])
def test_backup_tenant_type_filter(sim: Simulator, type_: str, expected: int) -> None:
    body = backup_get(sim, f"/users/{sim.dataset.owners[0].id}/tenants", owner_headers(sim, 0), type=type_).json()
    assert len(body["data"]) == expected and all(t["type"] == type_ for t in body["data"] if type_)


@pytest.mark.parametrize(("params", "status", "body"), [
    ({"per_page": 101}, 400, {"errors": {"type": ["Invalid per_page number. Please try again."]}}),
    ({"per_page": 0}, 400, {"errors": {"type": ["Invalid per_page number. Please try again."]}}),
    ({"type": "M365"}, 400, {"errors": {"type": ["Invalid type. Please try again."]}}),
    ({"page": 0}, 500, {"status": 500, "error": "Internal Server Error"}),
])
def test_backup_rejects_bad_parameters_as_documented(sim: Simulator, params: dict[str, Any], status: int,
                                                     body: dict[str, Any]) -> None:
    response = backup_get(sim, f"/users/{sim.dataset.owners[0].id}/tenants", owner_headers(sim, 0), **params)
    assert (response.status_code, response.json()) == (status, body)


@pytest.mark.parametrize("per_page", [3, 100])
def test_backup_accounts_page_with_next_page_and_per_page_0_past_the_end(sim: Simulator, per_page: int) -> None:
    acme = sim.dataset.owners[0]
    path = tenant_path(sim, 0)
    records, paginations = walk_backup(sim, path, owner_headers(sim, 0), per_page, type="m365")
    assert records == list(sim.dataset.backup_accounts(acme.id, acme.tenants[0].id))
    assert len(paginations) == -(-len(records) // per_page)
    assert "prev_page" not in paginations[0] and "next_page" not in paginations[-1]
    assert all(p["per_page"] == per_page for p in paginations)
    assert set(records[0]) == {"name", "email", "upn", "mailbox", "licensed", "status", "type", "tenant_status",
                               "created_at", "updated_at"}
    after = len(paginations) + 1
    past = backup_get(sim, path, owner_headers(sim, 0), type="m365", page=after, per_page=per_page).json()
    assert past["data"] == [] and past["pagination"]["per_page"] == 0
    assert past["pagination"]["prev_page"] == len(paginations) and "next_page" not in past["pagination"]


@pytest.mark.parametrize(("owner", "tenant", "type_"), [
    (0, 0, "gws"),    # the tenant's type is m365
    (0, 2, "m365"),   # the tenant's type is gws
    (0, 0, None),     # type is required
    (1, 0, "m365"),   # owner 1's tenant under owner 0's path
])
def test_backup_accounts_with_wrong_type_or_foreign_tenant_are_401(sim: Simulator, owner: int, tenant: int,
                                                                   type_: str | None) -> None:
    foreign = sim.dataset.owners[owner].tenants[tenant].id
    path = f"/users/{sim.dataset.owners[0].id}/tenants/{foreign}/accounts"
    response = backup_get(sim, path, owner_headers(sim, 0), **({"type": type_} if type_ else {}))
    assert response.status_code == 401
    assert response.json() == {"errors": {"user": ["Sorry, your credentials is not valid"]}}


# --- tokens and documented status codes --------------------------------------------------------
UNAUTHORIZED = {"errors": {"user": ["You are not authorized to perform this action"]}}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": SMALL.saas_token},
                                     {"Authorization": f"Basic {SMALL.saas_token}"}])
def test_saas_needs_the_bearer_token(sim: Simulator, headers: dict[str, str]) -> None:
    for path in ("/users", f"/users/{next(sim.dataset.saas_users())['id']}/subscriptions"):
        response = requests.get(sim.saas_base_url + path, headers=headers, timeout=10)
        assert response.status_code == 401 and response.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize(("path", "headers"), [
    ("/users", backup_headers(reseller="wrong")),
    ("/users", backup_headers(token="wrong")),
    ("/users", {"X-Reseller-Token": SMALL.reseller_token}),
    ("/users/{owner0}", backup_headers(token="wrong")),
    ("/users/{owner0}/tenants", backup_headers()),              # the admin token is not the owner's
    ("/users/{owner0}/tenants", "owner1"),                      # another owner's token
    ("/users/{owner0}/tenants", {"X-Access-Token": "owner0"}),  # no reseller token
    ("/users/{owner0}/tenants/{tenant0}/accounts?type=m365", "owner1"),
    ("/users/99999-1/tenants", "owner0"),                       # unknown owner
])
def test_backup_tokens_are_checked_per_call(sim: Simulator, path: str, headers: Any) -> None:
    owners = sim.dataset.owners
    if isinstance(headers, str):
        headers = owner_headers(sim, int(headers[-1]))
    elif headers.get("X-Access-Token") == "owner0":
        headers = {"X-Access-Token": owners[0].token}
    url = path.format(owner0=owners[0].id, tenant0=owners[0].tenants[0].id)
    response = requests.get(sim.backup_base_url + url, headers=headers, timeout=10)
    assert (response.status_code, response.json()) == (401, UNAUTHORIZED)


def test_backup_owner_list_and_detail(sim: Simulator) -> None:
    listing = backup_get(sim, "/users")
    assert listing.status_code == 200 and isinstance(listing.json(), list)
    full = list(sim.dataset.backup_owners())
    assert [o["id"] for o in listing.json()] == [o["id"] for o in full] and len(full) == 6
    assert all("organization_name" not in o and o["authentication_token"] for o in listing.json())
    assert len({o["authentication_token"] for o in full}) == len(full)
    detail = backup_get(sim, f"/users/{full[0]['id']}")
    assert detail.status_code == 201 and detail.json() == full[0]
    assert re.fullmatch(r"\d+-\d+", full[0]["id"]) and full[0]["reseller_token"] == SMALL.reseller_token
    assert backup_get(sim, "/users/1-1").status_code == 404
    assert [o["id"] for o in backup_get(sim, "/users", email=full[1]["email"].upper()).json()] == [full[1]["id"]]


@pytest.mark.parametrize("path", ["/api/nope", "/api/saas/consolidated-view/v1/apps", "/", "/api/users/x/y/z"])
def test_unknown_paths_are_404_json(sim: Simulator, path: str) -> None:
    response = requests.get(f"{sim.base_url}{path}", headers={**SAAS, **backup_headers()}, timeout=10)
    assert response.status_code == 404 and "error" in response.json()


def test_other_methods_are_405(sim: Simulator) -> None:
    assert requests.post(sim.saas_base_url + "/users", headers=SAAS, json={}, timeout=10).status_code == 405


def test_keep_alive_and_many_concurrent_clients(sim: Simulator) -> None:
    before = sim.stats()["connections"].get("accepted", 0)
    with requests.Session() as http:
        for _ in range(5):
            response = http.get(sim.saas_base_url + "/users", headers=SAAS, timeout=10)
            assert response.raw.version == 11 and response.ok
    assert sim.stats()["connections"]["accepted"] == before + 1
    users = list(sim.dataset.saas_users())

    def fetch(i: int) -> int:
        return saas_get(sim, f"/users/{users[i % len(users)]['id']}/subscriptions").status_code

    with ThreadPoolExecutor(32) as pool:
        assert set(pool.map(fetch, range(300))) == {200}


# --- determinism -----------------------------------------------------------------------------------
def _fingerprint(sim: Simulator) -> list[bytes]:
    owner = sim.dataset.owners[0]
    return [saas_get(sim, "/users", page_size=1000).content,
            saas_get(sim, f"/users/{next(sim.dataset.saas_users())['id']}/subscriptions").content,
            backup_get(sim, "/users").content,
            backup_get(sim, f"/users/{owner.id}/tenants", owner_headers(sim, 0)).content,
            backup_get(sim, tenant_path(sim, 0), owner_headers(sim, 0), type="m365").content]


def test_same_seed_serves_identical_bytes_and_another_seed_differs(sim: Simulator) -> None:
    with Simulator(SMALL) as twin, Simulator(replace(SMALL, seed=2)) as other:
        assert _fingerprint(twin) == _fingerprint(sim)
        assert all(a != b for a, b in zip(_fingerprint(other), _fingerprint(sim), strict=True))


# --- the realistic mess of vendor data, present at 5 orgs x 10 users ------------------------------
class Snapshot:
    """Everything the small simulator serves, plus a few derived views."""

    def __init__(self, sim: Simulator) -> None:
        ds = sim.dataset
        self.users = list(ds.saas_users())
        self.subs = {u["id"]: list(ds.saas_subscriptions(u["id"])) for u in self.users}
        self.all_subs = [s for subs in self.subs.values() for s in subs]
        self.owners = list(ds.backup_owners())
        self.tenants = [(o, t) for o in self.owners for t in ds.backup_tenants(o["id"])]
        self.accounts = [(o, t, a) for o, t in self.tenants for a in ds.backup_accounts(o["id"], t["id"])]
        self.names = [o["organization_name"] for o in self.owners]
        self.saas_keys = {(u["username"] or u["email"]).strip().lower(): u for u in self.users}
        self.mailboxes = [(o, a) for o, t, a in self.accounts if t["type"] == "m365" and a["mailbox"]]
        self.b_keys = {a["upn"].strip().lower() for _, a in self.mailboxes}
        self.domain_orgs: dict[str, set[str]] = {}
        for o, t in self.tenants:
            if t["type"] == "m365":
                self.domain_orgs.setdefault(t["domain"].lower(), set()).add(o["organization_name"])
        for o, a in self.mailboxes:
            domain = a["upn"].strip().lower().rpartition("@")[2]
            self.domain_orgs.setdefault(domain, set()).add(o["organization_name"])

    def license_name(self, sub: dict[str, Any]) -> str:
        return sub["applicationName"] or sub["name"]

    def saas_only_owner_counts(self) -> set[int]:
        return {len(self.domain_orgs.get(k.rpartition("@")[2], ())) for k in self.saas_keys.keys() - self.b_keys}


@pytest.fixture(scope="module")
def snap(sim: Simulator) -> Snapshot:
    return Snapshot(sim)


def _is_ms(sub: dict[str, Any]) -> bool:
    return "microsoft" in sub["vendor"].lower()


EMAIL_PATTERNS = [r"Microsoft 365 Business .*", r"Microsoft 365 E.*", r"Microsoft 365 F.*", r"Office 365 E.*",
                  r"Office 365 F.*", r"Exchange Online \(Plan.*", "Exchange Online Kiosk", "Exchange Online Essentials"]
MESS: dict[str, Callable[[Snapshot], bool]] = {
    "several licenses per user": lambda s: any(sum(map(_is_ms, subs)) >= 3 for subs in s.subs.values()),
    "non-Microsoft apps": lambda s: any(not _is_ms(x) for x in s.all_subs),
    "free, trial and exploratory SKUs": lambda s: all(
        any(word in s.license_name(x) for x in s.all_subs) for word in ("Free", "Trial", "Exploratory")),
    "archiving and protection add-ons": lambda s: {
        "Exchange Online Archiving for Exchange Online", "Exchange Online Protection"}
    <= {s.license_name(x) for x in s.all_subs},
    "M365 licenses without email": lambda s: {"Microsoft Power BI Pro", "Microsoft 365 Apps for business",
                                              "Microsoft Copilot"} <= {s.license_name(x) for x in s.all_subs},
    "every email include pattern": lambda s: all(
        any(re.fullmatch(p, s.license_name(x)) for x in s.all_subs) for p in EMAIL_PATTERNS),
    "applicationName empty and null": lambda s: {"", None} <= {x["applicationName"] for x in s.all_subs}
    and all(x["name"] for x in s.all_subs),
    "vendor spelled in several cases": lambda s: {"Microsoft Corporation", "microsoft corp"}
    <= {x["vendor"] for x in s.all_subs},
    "one license twice differing in case": lambda s: any(
        len({s.license_name(x) for x in subs}) > len({s.license_name(x).lower() for x in subs})
        for subs in s.subs.values()),
    "unlicensed mailboxes": lambda s: any(a["licensed"] is None for _, a in s.mailboxes),
    "shared mailbox S knows without subscriptions": lambda s: any(
        not s.subs[s.saas_keys[a["upn"].strip().lower()]["id"]] and a["licensed"] is None
        for _, a in s.mailboxes if a["upn"].strip().lower() in s.saas_keys and a["name"].startswith("Shared")),
    "shared mailbox S does not know": lambda s: any(
        a["name"].startswith("Shared Mailbox") and a["upn"].strip().lower() not in s.saas_keys
        for _, a in s.mailboxes),
    "public folders": lambda s: any(a["mailbox"] is False for _, _, a in s.accounts),
    "Google Workspace tenants with accounts": lambda s: any(t["type"] == "gws" for _, t, _ in s.accounts),
    "an owner with only a gws tenant": lambda s: any(
        {t["type"] for o2, t in s.tenants if o2 is o} == {"gws"} for o in s.owners),
    "an owner with no tenants": lambda s: any(all(o2 is not o for o2, _ in s.tenants) for o in s.owners),
    "mixed-case UPNs in both sources": lambda s: any(u["username"] and u["username"] != u["username"].lower()
                                                     for u in s.users)
    and any(a["upn"] != a["upn"].lower() for _, a in s.mailboxes),
    "UPNs with surrounding spaces in both sources": lambda s: any(
        (u["username"] or u["email"]) != (u["username"] or u["email"]).strip() for u in s.users)
    and any(a["upn"] != a["upn"].strip() for _, a in s.mailboxes),
    "username null and empty": lambda s: {None, ""} <= {u["username"] for u in s.users},
    "S-only users on domains owned by one, no and two orgs": lambda s: {0, 1, 2} <= s.saas_only_owner_counts(),
    "B-only users licensed and not": lambda s: {True, None} <= {
        a["licensed"] for _, a in s.mailboxes if a["upn"].strip().lower() not in s.saas_keys},
    "S displayName empty, B name empty": lambda s: any(not u["displayName"].strip() for u in s.users)
    and any(a["name"] == "" for _, a in s.mailboxes),
    "punctuation and scripts in organization names": lambda s: all(
        any(re.search(p, n) for n in s.names)
        for p in ["/", r"\.\.", "%", r"\?", "#", "&", "'", '"', "<script>", ",", "[\u3040-\u30ff\u4e00-\u9fff]",
                  "[\u0400-\u04ff]", "[\u0370-\u03ff]", "[äöü]"]),
    "two owners sharing one organization name": lambda s: len(s.names) - len(set(s.names)) == 1,
    "names differing only in case": lambda s: len({n.lower() for n in s.names}) < len(set(s.names)),
    "names differing only by a trailing space": lambda s: len({n.rstrip() for n in s.names}) < len(set(s.names)),
    "a UPN with mailboxes in two organizations": lambda s: any(
        len({o["organization_name"] for o, a in s.mailboxes if a["upn"].strip().lower() == k}) == 2
        for k in s.b_keys),
    "a domain owned by two organizations": lambda s: 2 in {len(v) for v in s.domain_orgs.values()},
}


@pytest.mark.parametrize("category", MESS)
def test_every_mess_category_is_present_at_small_scale(snap: Snapshot, category: str) -> None:
    assert MESS[category](snap)


# --- faults ------------------------------------------------------------------------------------------
def _faulty(**faults: Any) -> Simulator:
    return Simulator(replace(SMALL, faults=FaultConfig(**faults)))


def _retry(call: Callable[[], requests.Response], attempts: int) -> list[Any]:
    """Outcomes (status codes or exception class names) until a 2xx, at most ``attempts``."""
    outcomes: list[Any] = []
    for _ in range(attempts):
        try:
            response = call()
        except requests.RequestException as exc:
            outcomes.append(type(exc).__name__)
            continue
        outcomes.append(response.status_code)
        if response.ok:
            break
    return outcomes


def _user_urls(sim: Simulator) -> list[Callable[[], requests.Response]]:
    return [lambda u=u: saas_get(sim, f"/users/{u['id']}/subscriptions") for u in sim.dataset.saas_users()]


@pytest.mark.parametrize(("faults", "kind", "failures"), [
    ({"rate_429": 0.5, "retry_after": 0}, "429", {429}),
    ({"rate_5xx": 0.5}, "5xx", {500, 502, 503}),
    ({"reset_rate": 0.5}, "reset", {"ConnectionError"}),
])
def test_random_faults_happen_and_three_retries_always_succeed(faults: dict[str, Any], kind: str,
                                                              failures: set[Any]) -> None:
    with _faulty(**faults) as faulty:
        outcomes = [_retry(call, attempts=3) for call in _user_urls(faulty)]
        assert all(o[-1] == 200 for o in outcomes)
        seen = {x for o in outcomes for x in o[:-1]}
        assert seen and seen <= failures
        assert faulty.stats()["faults"][kind] == sum(len(o) - 1 for o in outcomes)


def test_429_carries_retry_after_and_budget_is_per_url() -> None:
    with _faulty(rate_429=1.0, retry_after=7, max_faults_per_url=3) as faulty:
        responses = [saas_get(faulty, "/users") for _ in range(5)]
        assert [r.status_code for r in responses] == [429, 429, 429, 200, 200]
        assert responses[0].headers["Retry-After"] == "7"
        assert saas_get(faulty, "/users", page_size=5).status_code == 429  # another URL, its own budget


def test_faults_are_deterministic_for_a_seed() -> None:
    def statuses() -> list[int]:
        with _faulty(rate_5xx=0.3, rate_429=0.3, retry_after=0) as faulty:
            return [call().status_code for call in _user_urls(faulty) for _ in range(2)]

    assert statuses() == statuses()


def test_fault_scope_limits_random_faults_and_latency_to_one_source() -> None:
    with _faulty(rate_5xx=1.0, latency_ms=50, scope="backup") as faulty:
        assert saas_get(faulty, "/users").status_code == 200
        assert backup_get(faulty, "/users").status_code >= 500
        assert faulty.stats()["faults"]["latency"] == 1


def test_latency_is_added_to_every_response() -> None:
    with _faulty(latency_ms=150) as faulty:
        started = time.monotonic()
        assert saas_get(faulty, "/users").ok and backup_get(faulty, "/users").ok
        assert time.monotonic() - started >= 0.3
        assert faulty.stats()["faults"]["latency"] == 2


def test_fail_once_answers_503_once_per_matching_url() -> None:
    with _faulty(fail_once=r"/subscriptions") as faulty:
        calls = _user_urls(faulty)[:3]
        assert [[c().status_code for _ in range(3)] for c in calls] == [[503, 200, 200]] * 3
        assert saas_get(faulty, "/users").status_code == 200
        assert faulty.stats()["faults"]["fail_once"] == 3


def test_slow_responses_time_clients_out_until_the_budget_is_spent() -> None:
    with _faulty(slow_match=r"/users\?", slow_ms=1500, max_faults_per_url=1) as faulty:
        def call() -> requests.Response:
            return requests.get(faulty.saas_base_url + "/users?page_size=3", headers=SAAS, timeout=0.4)

        assert _retry(call, attempts=3) == ["ReadTimeout", 200]
        assert faulty.stats()["faults"]["slow"] == 1


def test_malformed_json_is_permanent() -> None:
    with _faulty(malformed_match=r"/tenants\?.*page=2") as faulty:
        path = f"/users/{faulty.dataset.owners[0].id}/tenants"
        assert backup_get(faulty, path, owner_headers(faulty, 0), page=1, per_page=1).json()["data"]
        for _ in range(3):
            response = backup_get(faulty, path, owner_headers(faulty, 0), page=2, per_page=1)
            assert response.status_code == 200
            with pytest.raises(ValueError):
                json.loads(response.text)
        assert faulty.stats()["faults"]["malformed"] == 3


@pytest.mark.parametrize(("source", "field"), [("saas_users", "id"), ("saas_subscriptions", "id"),
                                               ("backup_tenants", "domain"), ("backup_accounts", "upn")])
def test_missing_field_drops_one_key_per_page_permanently(source: str, field: str) -> None:
    with _faulty(missing_field_match=".") as faulty:
        acme = faulty.dataset.owners[0]
        fetch = {
            "saas_users": lambda: saas_get(faulty, "/users").json()["items"],
            "saas_subscriptions": lambda: saas_get(
                faulty, f"/users/{next(faulty.dataset.saas_users())['id']}/subscriptions").json()["items"],
            "backup_tenants": lambda: backup_get(faulty, f"/users/{acme.id}/tenants",
                                                 owner_headers(faulty, 0)).json()["data"],
            "backup_accounts": lambda: backup_get(faulty, tenant_path(faulty, 0), owner_headers(faulty, 0),
                                                  type="m365").json()["data"],
        }[source]
        for _ in range(3):
            records = fetch()
            assert sum(field not in r for r in records) == 1 and len(records) >= 1


def test_a_source_goes_down_for_good_after_n_requests() -> None:
    with _faulty(down_after=2, down_scope="backup") as faulty:
        assert [backup_get(faulty, "/users").status_code for _ in range(5)] == [200, 200, 503, 503, 503]
        assert saas_get(faulty, "/users").status_code == 200
        assert faulty.stats()["faults"]["down"] == 3


def test_the_rate_limit_is_a_bucket_of_20_by_default_then_429_with_retry_after_1() -> None:
    """Issue 24: a vendor allowing a burst of 20, then --rate-limit a second (the bucket refills on a fake
    clock in test_pace.py)."""
    assert FaultConfig().rate_burst == 20
    with _faulty(rate_limit=1) as faulty:
        statuses = [saas_get(faulty, "/users", page_size=1) for _ in range(22)]
        assert [r.status_code for r in statuses[:20]] == [200] * 20
        refused = [r for r in statuses[20:] if r.status_code == 429]
        assert refused and all(r.headers["Retry-After"] == "1" for r in refused)
        assert faulty.stats()["faults"]["rate_limit"] == len(refused)
    with _faulty(rate_limit=0.001, rate_burst=3) as faulty:  # the burst is the flag's
        assert [saas_get(faulty, "/users").status_code for _ in range(4)] == [200, 200, 200, 429]


def _echoed(response: requests.Response) -> str:
    return response.text + json.dumps(dict(response.headers))


def test_error_pages_echo_every_request_header_and_the_token_when_asked() -> None:
    """Rule 19's hostile vendor: its error pages (4xx, 5xx, the 502's HTML too) show the request's headers,
    tokens included, and X-Debug-Request-Token repeats the request's own token."""
    with _faulty(echo_headers_on_error=True, rate_5xx=1.0, scope="backup", max_faults_per_url=100) as faulty:
        missing = saas_get(faulty, "/users/not-a-user/subscriptions")
        assert missing.status_code == 404 and missing.headers["X-Debug-Request-Token"] == SMALL.saas_token
        assert missing.json()["request_headers"]["authorization"] == f"Bearer {SMALL.saas_token}"
        assert missing.json()["message"] == "User not-a-user not found"  # the vendor's own error stays
        statuses = set()
        for index, owner in enumerate(faulty.dataset.owners):
            failed = backup_get(faulty, f"/users/{owner.id}/tenants", owner_headers(faulty, index))
            statuses.add(failed.status_code)
            assert failed.status_code >= 500 and failed.headers["X-Debug-Request-Token"] == owner.token
            assert SMALL.reseller_token in failed.text and owner.token in failed.text
        assert 502 in statuses and statuses <= {500, 502, 503}
        ok = saas_get(faulty, "/users")
        assert ok.ok and "X-Debug-Request-Token" not in ok.headers and SMALL.saas_token not in ok.text
        assert faulty.stats()["faults"]["echo_headers"] == 1 + len(faulty.dataset.owners)
    with _faulty(rate_5xx=1.0) as plain:  # without the flag no error page shows a token
        failed = saas_get(plain, "/users")
        assert failed.status_code >= 500 and SMALL.saas_token not in _echoed(failed)


def test_a_page_can_claim_a_billion_pages_with_total_items_true() -> None:
    """Issue 25 (hostile vendor data): source S's user list says total_pages 10**9; its items are the real
    ones and pages past the real end are empty."""
    with _faulty(claim_pages_match=r"/users\?") as faulty:
        truth = list(faulty.dataset.saas_users())
        first = saas_get(faulty, "/users", page_size=7, page_number=1).json()
        assert first["pagination"] == {"page_size": 7, "page_number": 1, "total_pages": 10**9,
                                       "total_items": len(truth)}
        assert first["items"] == truth[:7]
        past = saas_get(faulty, "/users", page_size=7, page_number=1000).json()
        assert past["pagination"]["total_pages"] == 10**9 and past["items"] == []
        user = truth[0]["id"]  # not matched: the subscriptions' paging is true
        assert saas_get(faulty, f"/users/{user}/subscriptions").json()["pagination"]["total_pages"] == 1
        assert faulty.stats()["faults"]["claim_pages"] == 2


def test_a_next_page_that_never_ends() -> None:
    """Issue 25: source B's matching list always links a next page, also past its real end (where data is
    empty as documented)."""
    with _faulty(endless_next_match="/accounts") as faulty:
        path, headers = tenant_path(faulty, 0), owner_headers(faulty, 0)
        records, page = [], 1
        for _ in range(12):  # bounded: a client following next_page alone would never stop
            body = backup_get(faulty, path, headers, type="m365", page=page, per_page=3).json()
            pagination = body["pagination"]
            assert pagination["next_page"] == page + 1
            assert pagination["next_url"] == f"/api{path}?type=m365&page={page + 1}&per_page=3"
            records += body["data"]
            page = pagination["next_page"]
        o = faulty.dataset.owners[0]
        expected = faulty.dataset.account_page(o, o.tenants[0], 0, 10**6)
        assert records == expected and len(expected) < 12 * 3  # every real page read, then empty ones
        assert faulty.stats()["faults"]["endless_next"] == 12


@pytest.mark.parametrize("bad", [{"rate_429": 1.5}, {"rate_429": 0.6, "rate_5xx": 0.6}, {"scope": "all"},
                                 {"fail_once": "("}, {"latency_ms": -1}])
def test_fault_config_is_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FaultConfig(**bad)


# --- scale, lifecycle ---------------------------------------------------------------------------------
def test_a_million_user_config_starts_and_serves_late_pages() -> None:
    with Simulator(SimulatorConfig(orgs=2000, users_per_org=500)) as big:
        total = big.dataset.saas_user_count
        assert total > 800_000
        pages = -(-total // 1000)
        last = saas_get(big, "/users", page_size=1000, page_number=pages).json()
        assert len(last["items"]) == total - (pages - 1) * 1000
        assert saas_get(big, f"/users/{last['items'][-1]['id']}/subscriptions").ok
        owner = big.dataset.owners[-2]
        headers = backup_headers(owner.token)
        tenants = backup_get(big, f"/users/{owner.id}/tenants", headers).json()["data"]
        path = f"/users/{owner.id}/tenants/{tenants[0]['id']}/accounts"
        first = backup_get(big, path, headers, type="m365", per_page=100).json()
        assert len(first["data"]) == 100 and first["pagination"]["next_page"] == 2


def test_stop_releases_the_port_promptly() -> None:
    with Simulator(SMALL) as first:
        port = first.port
        with requests.Session() as keep_alive:  # an idle pooled connection must not block stop()
            keep_alive.get(first.saas_base_url + "/users", headers=SAAS, timeout=10)
            started = time.monotonic()
            first.stop()
            assert time.monotonic() - started < 2
    with Simulator(SMALL, port=port) as again:
        assert saas_get(again, "/users").ok


# --- CLI --------------------------------------------------------------------------------------------
def test_cli_prints_the_ground_truth() -> None:
    proc = subprocess.run([*CLI, "--print-ground-truth", "--orgs", "5", "--users-per-org", "10", "--seed", "1"],
                          capture_output=True, check=False, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(ground_truth(SMALL)))


def test_cli_serves_until_sigterm_and_prints_the_environment() -> None:
    proc = subprocess.Popen([*CLI, "--port", "0", "--orgs", "3", "--users-per-org", "4", "--rate-429", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        env: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("#"):
                assert "serving" in line
                break
            name, _, value = line.strip().removeprefix("export ").partition("=")
            env[name] = value
        assert set(env) == {"SAAS_API_BASE_URL", "SAAS_API_TOKEN", "BACKUP_API_BASE_URL", "BACKUP_RESELLER_TOKEN",
                            "BACKUP_ADMIN_TOKEN"}
        response = requests.get(env["SAAS_API_BASE_URL"] + "/users",
                                headers={"Authorization": f"Bearer {env['SAAS_API_TOKEN']}"}, timeout=10)
        assert response.ok and response.json()["pagination"]["total_items"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("args", [["--orgs", "-1"], ["--rate-5xx", "2"], ["--port", "70000"],
                                  ["--rate-429", "0.7", "--reset-rate", "0.7"], ["--slow-match", "["],
                                  ["--fault-scope", "nowhere"], ["--rate-burst", "0"], ["--oversize-mib", "1025"],
                                  ["--gzip-bomb-mib", "0"], ["--endless-next-match", "("]])
def test_cli_rejects_bad_arguments_with_exit_2(args: list[str]) -> None:
    proc = subprocess.run([*CLI, *args], capture_output=True, check=False, text=True, timeout=30)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "field", "value"), [
    ([], "rate_burst", 20), (["--rate-burst", "7"], "rate_burst", 7),
    (["--echo-headers-on-error"], "echo_headers_on_error", True),
    (["--oversize-match", "x", "--oversize-mib", "3"], "oversize_mib", 3), ([], "gzip_bomb_mib", 1024),
    (["--gzip-bomb-match", "/users"], "gzip_bomb_match", "/users"),
    (["--claim-pages-match", "u"], "claim_pages_match", "u"),
    (["--endless-next-match", "a"], "endless_next_match", "a"),
])
def test_cli_fault_flags_reach_the_fault_config(args: list[str], field: str, value: Any) -> None:
    from m365_pipeline.simulator.cli import build_parser, config_from_args

    assert getattr(config_from_args(build_parser().parse_args(args)).faults, field) == value


def test_cli_help_documents_every_hostile_answer_flag() -> None:
    from m365_pipeline.simulator.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    for flag in ("--rate-burst", "--echo-headers-on-error", "X-Debug-Request-Token", "--oversize-match",
                 "--oversize-mib", "--gzip-bomb-match", "--gzip-bomb-mib", "--claim-pages-match",
                 "--endless-next-match", "--malformed-match"):
        assert flag in text


def test_cli_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run([*CLI, "--port", str(taken.getsockname()[1])], capture_output=True, check=False,
                              text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot listen on 127.0.0.1:" in proc.stderr
