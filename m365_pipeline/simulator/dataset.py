"""Deterministic synthetic data for source S (SaaS management) and source B (backup reseller).

Nothing per user is kept in memory: every record is derived on demand from (seed, owner index,
slot index), so a million users start instantly and any page costs only its own records. Only a
few small per-owner values are precomputed (segment bounds, tenants, prefix sums of S users).

Layout (``orgs`` = N organizations; owner = source B organization owner)
----------------------------------------------------------------------
Owner slots 0..4 hold fixed special cases (present whenever N >= 5, at any users-per-org);
owners 5..N-1 are regular; when N >= 3 a *twin* owner N is appended that shares owner 2's
organization_name, so the data always has exactly N organizations.

==  ==========  =================================================  ===================================
0   acme        ``Acme "Widgets" & Sons, Ltd.``                      m365 Acme-Widgets.example +
                                                                     m365 acme-labs.example + gws tenant
1   acme_upper  ``ACME "WIDGETS" & SONS, LTD.`` (0 up to case)       m365 acme-widgets-uk.example
2   mueller     ``Müller & Söhne / R&D ../100% ?# — Ромашка 日本 Ωμέγα``  m365 mueller-soehne.example
3   gws_only    ``<script>alert('x')</script> 株式会社 'Sakura'``      one gws tenant only: zero users
4   no_tenants  owner 2's name + ``" "`` (trailing space)            no tenants at all
5+  regular     ``<prefix> <index> <suffix>`` (umlauts, CJK, Cyrillic, Greek, punctuation)
N   twin        owner 2's name (merged with owner 2)                 m365 mueller-soehne-at.example
==  ==========  =================================================  ===================================

Owner 5's name starts with a CR, and five special users' display names with ``= + - @`` and a tab
(``FORMULA_NAMES``: CSV injection, rule 16).

Every owner with users has ``users_per_org`` (regular owners: +-20 %) slots, in three contiguous
segments: *S only* | *both* | *B only*. S serves slots [0, end of both) of each owner, owner after
owner; B serves slots [end of S only, end) split over the owner's m365 tenants, followed by each
tenant's *extra* accounts (public folders, the cross-organization mailboxes below). Special cases
occupy the first slots of a segment (see ``_SPECIALS``); regular slots get the mess at modest
random rates. Cross-owner special accounts: ``dual.role@acme-labs.example`` has mailboxes in
owners 0 and 1 (goes to 0, whose tenant owns the domain; the domain becomes owned by two orgs),
``consultant@freelance-experts.example`` in owners 2 and 1 (neither owns the domain: first by
name order, owner 1), ``shared.services@mueller-soehne.example`` in owner 2 and the twin (one org).
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cache, cached_property, lru_cache
from typing import Any

from m365_pipeline.simulator.faults import FaultConfig, stable_digest, stable_hash

DEFAULT_SAAS_TOKEN = "sim-saas-token"
DEFAULT_RESELLER_TOKEN = "sim-reseller-token"
DEFAULT_ADMIN_TOKEN = "sim-admin-token"
MAX_ORGS = 100_000
MAX_USERS_PER_ORG = 100_000
MAX_NIGHT = 3650
LICENSE_SPELLINGS = ("catalog", "lower", "upper")


@dataclass(frozen=True)
class SimulatorConfig:
    orgs: int = 40
    users_per_org: int = 17
    seed: int = 42
    saas_token: str = DEFAULT_SAAS_TOKEN
    reseller_token: str = DEFAULT_RESELLER_TOKEN
    admin_token: str = DEFAULT_ADMIN_TOKEN
    faults: FaultConfig = field(default_factory=FaultConfig)
    night: int = 0  # nights after the first: the data evolves (see "nights" below); 0 = the base data
    # Bench only (bench/nights.py): spreads the per-slot turnover and relicense nights over this many
    # times the span, dividing the nightly churn by it; 1 = the served data.
    churn_divisor: int = 1
    # Tests of rule 14's one license per name ignoring case: "lower" or "upper" serves every license name
    # of the odd user slots in that case (one license, two spellings on a night); "catalog" = as catalogued.
    license_spelling: str = "catalog"

    def __post_init__(self) -> None:
        if not 0 <= self.orgs <= MAX_ORGS:
            raise ValueError(f"orgs must be between 0 and {MAX_ORGS}, not {self.orgs}")
        if not 0 <= self.night <= MAX_NIGHT:
            raise ValueError(f"night must be between 0 and {MAX_NIGHT}, not {self.night}")
        if self.churn_divisor < 1:
            raise ValueError(f"churn_divisor must be at least 1, not {self.churn_divisor}")
        if not 0 <= self.users_per_org <= MAX_USERS_PER_ORG:
            raise ValueError(f"users_per_org must be between 0 and {MAX_USERS_PER_ORG}, not {self.users_per_org}")
        if self.license_spelling not in LICENSE_SPELLINGS:
            raise ValueError(f"license_spelling must be one of {', '.join(LICENSE_SPELLINGS)}, "
                             f"not {self.license_spelling!r}")
        for name in ("saas_token", "reseller_token", "admin_token"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")


# --- catalogs ----------------------------------------------------------------------------------
# (friendly name, SKU code). S puts the friendly name in applicationName and the code in `name`;
# when applicationName is empty or null, `name` carries the friendly name instead.
EMAIL_SKUS = (
    ("Microsoft 365 Business Basic", "O365_BUSINESS_ESSENTIALS"),
    ("Microsoft 365 Business Standard", "O365_BUSINESS_PREMIUM"),
    ("Microsoft 365 Business Premium", "SPB"),
    ("Microsoft 365 E3", "SPE_E3"),
    ("Microsoft 365 E5", "SPE_E5"),
    ("Microsoft 365 F1", "M365_F1"),
    ("Microsoft 365 F3", "SPE_F1"),
    ("Office 365 E1", "STANDARDPACK"),
    ("Office 365 E3", "ENTERPRISEPACK"),
    ("Office 365 E5", "ENTERPRISEPREMIUM"),
    ("Office 365 F3", "DESKLESSPACK"),
    ("Exchange Online (Plan 1)", "EXCHANGESTANDARD"),
    ("Exchange Online (Plan 2)", "EXCHANGEENTERPRISE"),
    ("Exchange Online Kiosk", "EXCHANGEDESKLESS"),
    ("Exchange Online Essentials", "EXCHANGEESSENTIALS"),
)
M365_OTHER_SKUS = (
    ("Microsoft Power BI Pro", "POWER_BI_PRO"),
    ("Microsoft 365 Apps for business", "O365_BUSINESS"),
    ("Microsoft Copilot", "Copilot"),
    ("Microsoft Visio Plan 2", "VISIOCLIENT"),
    ("Microsoft Project Plan 3", "PROJECTPROFESSIONAL"),
)
# M365 licenses that are not email licenses although some match an include pattern.
ADDON_SKUS = (
    ("Exchange Online Archiving for Exchange Online", "EXCHANGEARCHIVE_ADDON"),
    ("Exchange Online Protection", "EOP_ENTERPRISE"),
    ("Microsoft 365 E5 Information Protection and Governance", "INFORMATION_PROTECTION_COMPLIANCE"),
)
# Not M365 licenses at all (rule 4), although several match an email include pattern.
FREE_SKUS = (
    ("Microsoft Power Automate Free", "FLOW_FREE"),
    ("Microsoft Teams Exploratory", "TEAMS_EXPLORATORY"),
    ("Microsoft 365 E5 Trial", "SPE_E5_TRIAL"),
    ("Office 365 E3 Trial", "ENTERPRISEPACK_TRIAL"),
    ("Microsoft Teams (free)", "TEAMS_FREE"),
)
NON_MICROSOFT_APPS = (
    ("Slack Pro", "slack-pro", "Slack Technologies"),
    ("Zoom Workplace", "zoom-workplace", "Zoom Video Communications"),
    ("Adobe Acrobat Pro", "acrobat-pro", "Adobe Inc."),
    ("Salesforce Sales Cloud", "sales-cloud", "Salesforce"),
    ("Dropbox Business", "dropbox-business", "Dropbox"),
    ("Atlassian Jira", "jira", "Atlassian"),
)
MICROSOFT_VENDORS = ("Microsoft Corporation", "Microsoft Corporation", "Microsoft Corporation",
                     "microsoft corp", "MICROSOFT", "Microsoft Corp.")

# friendly name (lower-cased) -> (SKU code, vendor or None for "Microsoft, spelled at random")
_CATALOG: dict[str, tuple[str, str | None]] = {
    **{name.lower(): (code, None) for name, code in EMAIL_SKUS + M365_OTHER_SKUS + ADDON_SKUS + FREE_SKUS},
    **{name.lower(): (code, vendor) for name, code, vendor in NON_MICROSOFT_APPS},
}
_EMAIL_NAMES = tuple(n for n, _ in EMAIL_SKUS)
_M365_OTHER_NAMES = tuple(n for n, _ in M365_OTHER_SKUS)
_FREE_OR_OTHER_NAMES = tuple(n for n, _ in FREE_SKUS) + tuple(n for n, _, _ in NON_MICROSOFT_APPS)
# Weighted pool for a licensed user's additional subscriptions.
_EXTRA_NAMES = (_FREE_OR_OTHER_NAMES * 2 + tuple(n for n, _ in ADDON_SKUS) * 2 + _M365_OTHER_NAMES * 2
                + _EMAIL_NAMES[:5])
ALL_CATALOG_NAMES = (_EMAIL_NAMES + _M365_OTHER_NAMES + tuple(n for n, _ in ADDON_SKUS)
                     + _FREE_OR_OTHER_NAMES)

# (display, ASCII for the UPN). No Σ/İ/ß: their lower-casing differs between Python and SQL engines.
FIRST_NAMES = (("Anna", "anna"), ("Björn", "bjorn"), ("Chloé", "chloe"), ("Dmitri", "dmitri"),
               ("Émile", "emile"), ("Fatima", "fatima"), ("Günter", "gunter"), ("Hana", "hana"),
               ("Ivan", "ivan"), ("José", "jose"), ("Kenji", "kenji"), ("Lena", "lena"),
               ("Mateo", "mateo"), ("Nikos", "nikos"), ("Olga", "olga"), ("Priya", "priya"),
               ("Rosa", "rosa"), ("Sven", "sven"), ("Tomás", "tomas"), ("Yuki", "yuki"),
               ("Zoë", "zoe"), ("太郎", "taro"), ("Алексей", "alexey"), ("Ελένη", "eleni"))
LAST_NAMES = (("Andersson", "andersson"), ("Bauer", "bauer"), ("Černý", "cerny"), ("Dubois", "dubois"),
              ("Müller", "mueller"), ("García", "garcia"), ("O'Brien", "obrien"), ("Nakamura", "nakamura"),
              ("山田", "yamada"), ("Иванова", "ivanova"), ("Παπαδόπουλος", "papadopoulos"),
              ("Smith", "smith"), ("Kowalski", "kowalski"), ("Jensen", "jensen"), ("Rossi", "rossi"),
              ("Nguyen", "nguyen"), ("Schäfer", "schaefer"), ("Silva", "silva"))
ORG_PREFIXES = (("Contoso", "contoso"), ("Fabrikam", "fabrikam"), ("Northwind Traders", "northwind"),
                ("Tailspin Toys", "tailspin"), ("Woodgrove Bank", "woodgrove"), ("Margie's Travel", "margies"),
                ("O'Neil & Partners", "oneil"), ("Smith, Jones and Co.", "smithjones"), ("Élan Vital", "elan"),
                ("Grüner Weg", "gruener"), ("Über Cloud", "ueber"), ("Sakura 桜", "sakura"),
                ("大和 Yamato", "yamato"), ("Ромашка", "romashka"), ("Берёза", "bereza"), ("Αθηνά", "athina"),
                ("Ωμέγα", "omega"), ("50% Off Deals", "fifty"), ("Q&A Labs", "qa"), ("What? Inc.", "what"),
                ("#1 Solutions", "number1"), ("R/D Works", "rdworks"), ("..Dots & Co", "dots"),
                ('"Quoted" Ventures', "quoted"), ("<b>Bold</b> Media", "bold"))
ORG_SUFFIXES = ("GmbH", "Ltd.", "LLC", "AG", "株式会社", "ООО", "S.A.", "Inc.", "Oy", "K.K.")
DEPARTMENTS = ("Engineering", "Sales", "Finance", "Support", "Marketing", "Legal", "Operations", "HR")
COUNTRIES = ("Japan", "Germany", "United States", "France", "Greece", "Ukraine", "Brazil", "India")

@dataclass(frozen=True)
class Extra:
    """A source B account that is not a user slot (public folder, cross-organization mailbox)."""

    upn: str
    name: str
    mailbox: bool
    licensed: bool | None


# --- fixed special owners ------------------------------------------------------------------------
ACME, ACME_UPPER, MUELLER, GWS_ONLY, NO_TENANTS = range(5)
ACME_NAME = 'Acme "Widgets" & Sons, Ltd.'
MUELLER_NAME = "Müller & Söhne / R&D ../100% ?# — Ромашка 日本 Ωμέγα"
_SPECIAL_OWNERS: dict[int, tuple[str, str]] = {  # index -> (role, organization_name)
    ACME: ("acme", ACME_NAME),
    ACME_UPPER: ("acme_upper", ACME_NAME.upper()),
    MUELLER: ("mueller", MUELLER_NAME),
    GWS_ONLY: ("gws_only", "<script>alert('x')</script> 株式会社 'Sakura'"),
    NO_TENANTS: ("no_tenants", MUELLER_NAME + " "),
}
# role -> (m365 tenant domains, gws tenant domain)
_SPECIAL_DOMAINS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "acme": (("Acme-Widgets.example", "acme-labs.example"), "acme-widgets-gws.example"),
    "acme_upper": (("acme-widgets-uk.example",), None),
    "mueller": (("mueller-soehne.example",), None),
    "gws_only": ((), "nihon-test.example"),
    "no_tenants": ((), None),
    "twin": (("mueller-soehne-at.example",), None),
}
# Special slots per role, in segment order (S only, both, B only); see _SPECIAL_SLOTS.
_SPECIALS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "acme": (
        ("s_only_own_domain", "s_only_nobody", "s_only_two_orgs", "s_only_gws", "s_only_subdomain",
         "s_only_pf_domain", "dual_role"),
        ("zoo", "case_dup", "addons_only", "free_only", "non_email_only", "username_null", "username_empty",
         "display_from_b", "display_blank", "messy_upn", "shared_known", "unlicensed_mailbox"),
        ("b_only_licensed", "b_only_unlicensed", "b_only_shared", "b_only_noname", "b_only_messy"),
    ),
    "mueller": (("consultant", "same_org_dup"), (), ()),
}
# Names a spreadsheet would run as formulas (CSV injection, rule 16): one per dangerous first character.
# The first five are special slots' display names (S and B alike); the last is the first regular
# organization's name prefix.
FORMULA_NAMES = ('=HYPERLINK("http://x.example","y")', "+Addons Only", "-Non Email", "@Mixed Case",
                 "\tConsultant", "\r")
_NULL, _EMPTY = 2, 1  # applicationName modes: 0 = set, 1 = "", 2 = null
_ZOO = tuple((n, _NULL if n == "Exchange Online Kiosk" else _EMPTY if n == "Office 365 F3" else 0, None)
             for n in ALL_CATALOG_NAMES)
# Overrides of the randomly drawn person ("status": the mailbox's backup status, so rule 13 meets every
# status and spelling at any size). "domain": a literal, "t1" (the owner's second m365 tenant)
# or "gws"; "username": a spelling mode, None (null) or "" (empty); "subs": catalog names or
# (name, applicationName mode, vendor) tuples.
_SPECIAL_SLOTS: dict[str, dict[str, Any]] = {
    "s_only_own_domain": {"local": "solo.saas", "subs": ("Microsoft 365 E3",)},
    "s_only_nobody": {"local": "nobody.owns", "domain": "freemail.example", "subs": ("Microsoft 365 Business Basic",)},
    "s_only_two_orgs": {"local": "two.owners", "domain": "t1", "subs": ("Microsoft 365 E5",)},
    "s_only_gws": {"local": "gws.only", "domain": "gws", "subs": ("Microsoft 365 Business Premium",)},
    "s_only_subdomain": {"local": "sub.domain", "domain": "eu.acme-widgets.example", "subs": ("Microsoft 365 E3",)},
    "s_only_pf_domain": {"local": "pf.domain", "domain": "acme-archive.example", "subs": ("Office 365 E1",)},
    "dual_role": {"local": "dual.role", "domain": "t1", "subs": ("Office 365 E3",), "s_display": ""},
    "zoo": {"local": "license.zoo", "subs": _ZOO, "status": "Available"},
    "case_dup": {"local": "case.dup", "subs": ("Microsoft 365 Business Standard",
                                               ("microsoft 365 business standard", 0, "microsoft corp"),
                                               "Slack Pro"), "status": "EXCLUDED", "display": FORMULA_NAMES[0]},
    "addons_only": {"local": "addons.only", "subs": tuple(n for n, _ in ADDON_SKUS), "display": FORMULA_NAMES[1]},
    "free_only": {"local": "free.only", "subs": tuple(n for n, _ in FREE_SKUS[:3]) + ("Zoom Workplace",)},
    "non_email_only": {"local": "non.email", "subs": ("Microsoft Power BI Pro", "Microsoft 365 Apps for business",
                                                      ("Microsoft Copilot", _NULL, None)), "status": "Excluded ",
                       "display": FORMULA_NAMES[2]},
    "username_null": {"local": "null.username", "username": None, "s_spell": "title"},
    "username_empty": {"local": "empty.username", "username": "", "s_spell": "padded",
                       "subs": ("Exchange Online (Plan 1)",)},
    "display_from_b": {"local": "display.from.b", "s_display": "", "b_name": "Zoë Ångström"},
    "display_blank": {"local": "display.blank", "s_display": "   ", "b_name": ""},
    "messy_upn": {"local": "mixed.case", "username": "padded", "b_spell": "upper", "status": "  active",
                  "display": FORMULA_NAMES[3]},
    "shared_known": {"local": "sales", "subs": (), "s_display": "Sales", "b_name": "Shared Mailbox – Sales",
                     "b_licensed": None},
    "unlicensed_mailbox": {"local": "no.license", "subs": ("Zoom Workplace",), "b_licensed": None, "status": "ACTIVE"},
    "b_only_licensed": {"local": "backup.only", "b_name": "Backup Only"},
    "b_only_unlicensed": {"local": "backup.unlicensed", "b_licensed": None, "status": None},
    "b_only_shared": {"local": "info", "b_name": "Shared Mailbox – Info", "b_licensed": None, "status": " Active "},
    "b_only_noname": {"local": "backup.noname", "b_name": "", "status": "Pending"},
    "b_only_messy": {"local": "backup.messy", "b_spell": "padded"},
    "consultant": {"local": "consultant", "domain": "freelance-experts.example",
                   "subs": ("Microsoft 365 Business Premium",), "display": FORMULA_NAMES[4]},
    "same_org_dup": {"local": "shared.services", "subs": ("Microsoft 365 E5",)},
}
# (role, m365 tenant index) -> accounts listed after the tenant's user slots: the cross-organization
# mailboxes of the special S slots above, and public folders (one licensed, on its own domain).
_SPECIAL_EXTRAS: dict[tuple[str, int], tuple[Extra, ...]] = {
    ("acme", 0): (Extra("pf.announcements@Acme-Widgets.example", "Public Folder – Announcements", False, None),
                  Extra("archive@acme-archive.example", "Archive Public Folder", False, True)),
    ("acme", 1): (Extra("Dual.Role@acme-labs.example", "Dual Role (Acme Labs)", True, True),),
    ("acme_upper", 0): (Extra(" DUAL.ROLE@ACME-LABS.EXAMPLE ", "Dual Role", True, True),
                        Extra("consultant@freelance-experts.example", "Consultant (ACME)", True, True)),
    ("mueller", 0): (Extra("Consultant@Freelance-Experts.example", "Freelance Consultant", True, True),
                     Extra("shared.services@mueller-soehne.example", "Shared Services", True, True)),
    ("twin", 0): (Extra("Shared.Services@Mueller-Soehne.example", "Shared Services (AT)", True, None),),
}
_PERSON_DEFAULTS: dict[str, Any] = {"subs": None, "s_spell": "plain", "b_spell": "plain", "username": "plain",
                                    "b_licensed": True, "email_alias": False}

TURNOVER_SPAN, RELICENSE_SPAN = 60, 30  # a slot's turnover / relicense night is uniform in 1..SPAN
MOVE_NIGHT, ARRIVAL_NIGHT, DEPARTURE_NIGHT = 3, 5, 8

_EPOCH = dt.date(2023, 1, 1)
_DAYS = tuple((_EPOCH + dt.timedelta(days=d)).isoformat() for d in range(730))
_TIMES = tuple(f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86400))  # formatting is hot


# --- layout ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tenant:
    id: int
    type: str
    domain: str
    slot_start: int  # user slots listed in this tenant (m365 only)
    slot_stop: int
    generated: int  # synthetic gws accounts
    extras: tuple[Extra, ...]

    @property
    def account_count(self) -> int:
        return self.slot_stop - self.slot_start + self.generated + len(self.extras)


@dataclass(frozen=True)
class Owner:
    index: int
    role: str
    id: str
    organization_id: int
    name: str
    email: str
    token: str
    bounds: tuple[int, int, int]  # ends of the S-only, both and B-only segments
    specials: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    tenants: tuple[Tenant, ...]

    @property
    def saas_count(self) -> int:
        return self.bounds[1]

    def slot_kind(self, j: int) -> tuple[int, str | None]:
        """(segment 0/1/2, special tag or None) of slot ``j``."""
        seg = 0 if j < self.bounds[0] else 1 if j < self.bounds[1] else 2
        offset = j - (0, self.bounds[0], self.bounds[1])[seg]
        tags = self.specials[seg]
        return seg, tags[offset] if offset < len(tags) else None

    def slot_domain(self, j: int) -> str:
        for tenant in self.tenants:
            if tenant.slot_start <= j < tenant.slot_stop:
                return tenant.domain
        return self.tenants[0].domain  # S-only slots live on the primary domain


@dataclass
class _Person:
    """One user slot before it is rendered as an S user and/or a B account."""

    local: str
    domain: str
    display: str
    tier: str  # "licensed" | "unlicensed" | "shared"
    s_display: str
    b_name: str
    b_licensed: bool | None
    subs: tuple[Any, ...] | None  # None = drawn at random from the tier
    s_spell: str = "plain"
    b_spell: str = "plain"
    username: str | None = "plain"
    email_alias: bool = False
    status: str = "active"
    stamp: int = 0
    draws: bytes = b""  # random bytes left for the S record: 11 for the id, 32 for the rest

    @property
    def key(self) -> str:
        return f"{self.local}@{self.domain}".lower()


class _Bits:
    """Uniform draws from one hash, for the per-owner and per-tenant values.

    Per-user generation indexes digest bytes directly instead (``d[i] % n``, ``d[i] * 100 >> 8``
    for a percentage): it runs a million times per pull, where method calls would dominate.
    """

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def below(self, n: int) -> int:
        self.value, r = divmod(self.value, n)
        return r

    def pick(self, seq: tuple[Any, ...]) -> Any:
        return seq[self.below(len(seq))]


def _spell(local: str, domain: str, mode: str) -> str:
    """The same UPN as different systems write it; all spellings share one key."""
    if mode == "plain":
        return f"{local}@{domain}"
    title = ".".join(part.capitalize() for part in local.split(".")) + "@" + domain
    return {"title": title, "upper": title.upper(), "padded": f"  {title} "}[mode]


def _uuid(h: int) -> str:
    x = f"{h & (2**128 - 1):032x}"
    return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-{'89ab'[h % 4]}{x[17:20]}-{x[20:32]}"


@cache
def _app_id(name: str) -> str:
    return _uuid(stable_hash("application", name))


@cache
def _vendor_id(vendor: str) -> str:
    return _uuid(stable_hash("vendor", "microsoft" if "microsoft" in vendor.lower() else vendor))


def _stamp(value: int, precision: int = 6) -> str:
    """An ISO timestamp from an int: day within two years, second of day, fraction."""
    rest, frac = divmod(value, 10**precision)
    day, sec = divmod(rest % (730 * 86400), 86400)
    return f"{_DAYS[day]}T{_TIMES[sec]}.{frac:0{precision}d}Z"


_USER_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-([0-9a-f]{5})([0-9a-f]{7})")


class Dataset:
    """Everything both fake vendors serve, addressable by index for cheap paging."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.seed = config.seed
        n = config.orgs
        self._roles = [_SPECIAL_OWNERS[o][0] if o in _SPECIAL_OWNERS else "regular" for o in range(n)]
        if n > MUELLER:
            self._roles.append("twin")
        self._roles += ["regular"] * len(self._arrivals())
        self._owner_base = 20_000 + stable_hash(self.seed, "owner-base") % 60_000
        self._shard = 2 + stable_hash(self.seed, "shard") % 17
        self._tenant_base = 10_000 + stable_hash(self.seed, "tenant-base") % 50_000 * 4
        self.owners: list[Owner] = self._evolve([self._build_owner(o) for o in range(len(self._roles))])
        self._by_id = {owner.id: owner for owner in self.owners}
        self._saas_offsets = [0]
        for owner in self.owners:
            self._saas_offsets.append(self._saas_offsets[-1] + owner.saas_count)
        # A page asked for again (a retry after a fault, a deletion by position) costs nothing twice.
        self._saas_record = lru_cache(maxsize=4096)(self._make_saas_record)
        # Source S users deleted at the vendor (global indices, sorted): gone from the list, 404 for
        # their subscriptions, and from the ground truth.
        self._deleted: list[int] = []
        # Source B records deleted at the vendor: account positions per tenant id (sorted), owner ids.
        self._deleted_accounts: dict[int, list[int]] = {}
        self.deleted_owners: set[str] = set()

    # -- public iterators (what both APIs serve, unpaged) -----------------------------------
    def saas_users(self) -> Iterator[dict[str, Any]]:
        for owner in self.owners:
            for j in range(owner.saas_count):
                if self._saas_offsets[owner.index] + j not in self._deleted:
                    yield dict(self._saas_record(owner.index, j))

    def saas_subscriptions(self, user_id: str) -> Iterator[dict[str, Any]]:
        subs = self.subscriptions_of(user_id)
        if subs is None:
            raise KeyError(user_id)
        return iter(subs)

    def backup_owners(self) -> Iterator[dict[str, Any]]:
        """Full owner records as GET /users/{id} gives them (with organization_name)."""
        return (self.owner_record(owner, full=True) for owner in self.listed_owners())

    def backup_tenants(self, owner_id: str) -> Iterator[dict[str, Any]]:
        return iter(self.tenant_records(self._owner_or_key_error(owner_id)))

    def backup_accounts(self, owner_id: str, tenant_id: int | str) -> Iterator[dict[str, Any]]:
        owner = self._owner_or_key_error(owner_id)
        tenant = self.tenant(owner, str(tenant_id))
        if tenant is None:
            raise KeyError(tenant_id)
        return iter(self.account_page(owner, tenant, 0, self.account_count(tenant)))

    # -- index access for the server ----------------------------------------------------------
    @property
    def saas_user_count(self) -> int:
        return self._saas_offsets[-1] - len(self._deleted)

    def saas_user_page(self, start: int, stop: int) -> list[dict[str, Any]]:
        out = []
        for position in range(start, min(stop, self.saas_user_count)):
            i = self._saas_index(position)
            o = bisect.bisect_right(self._saas_offsets, i) - 1
            out.append(dict(self._saas_record(o, i - self._saas_offsets[o])))
        return out

    def _saas_index(self, position: int) -> int:
        """The global index of the user at ``position`` of the list, deleted users skipped."""
        return _skip_deleted(position, self._deleted)

    def delete_saas_user(self, position: int) -> str:
        """Delete the user at ``position`` of source S's list, as a vendor admin would; returns its id."""
        index = self._saas_index(position)
        o = bisect.bisect_right(self._saas_offsets, index) - 1
        user_id = self._saas_record(o, index - self._saas_offsets[o])["id"]
        bisect.insort(self._deleted, index)
        return user_id

    def subscriptions_of(self, user_id: str) -> list[dict[str, Any]] | None:
        """The user's subscriptions, or None when the id is not one this dataset issued."""
        subs = self.subscription_records(user_id)
        return None if subs is None else [dict(sub) for sub in subs]

    def subscription_records(self, user_id: str) -> tuple[dict[str, Any], ...] | None:
        """``subscriptions_of`` without the copies, for the server, which only encodes them (never change them).

        Only the person and the subscriptions are made, not the user record: the one call per user a
        pull makes comes long after the user's page left the record cache.
        """
        match = _USER_ID.fullmatch(user_id)
        if not match:
            return None
        o, j = int(match[1], 16), int(match[2], 16)
        if o >= len(self.owners) or j >= self.owners[o].saas_count or self._saas_offsets[o] + j in self._deleted:
            return None
        tag, d, tier = self._slot(o, j)
        if tag is None:  # the common slot: its subscriptions need only its draws, not the whole person
            subs, draws = None, d[21:]
        else:
            p = self._person(o, j)
            tier, subs, draws = p.tier, p.subs, p.draws
        return self._subscriptions(tier, subs, draws, o, j) if _saas_id(o, j, draws) == user_id else None

    def owner(self, owner_id: str) -> Owner | None:
        owner = self._by_id.get(owner_id)
        return None if owner is None or owner.index in self._departed or owner_id in self.deleted_owners else owner

    def delete_owner(self, owner_id: str) -> None:
        """Delete an organization owner at source B, as a vendor admin would (source S keeps its users)."""
        self.deleted_owners.add(owner_id)

    def account_count(self, tenant: Tenant) -> int:
        return tenant.account_count - len(self._deleted_accounts.get(tenant.id, ()))

    def delete_account(self, tenant: Tenant, position: int) -> str:
        """Delete the account at ``position`` of the tenant's list; returns its upn."""
        deleted = self._deleted_accounts.setdefault(tenant.id, [])
        index = _skip_deleted(position, deleted)
        owner = self.owners[(tenant.id - self._tenant_base) // 4]
        upn = self.account_page(owner, tenant, position, position + 1)[0]["upn"]
        bisect.insort(deleted, index)
        return str(upn)

    def largest_m365_tenant(self) -> tuple[Owner, Tenant]:
        return max(((owner, t) for owner in self.listed_owners() for t in self._listed_tenants(owner)
                    if t.type == "m365"), key=lambda pair: pair[1].account_count)

    def owner_record(self, owner: Owner, *, full: bool) -> dict[str, Any]:
        bits = _Bits(stable_hash(self.seed, "owner", owner.index))
        seats = owner.bounds[2] - owner.bounds[0]
        record: dict[str, Any] = {
            "id": owner.id, "email": owner.email, "authentication_token": owner.token,
            "organization_id": owner.organization_id, "plan_id": f"{160_000 + bits.below(9000)}-{self._shard}",
            "reseller_token": self.config.reseller_token, "notification_email": [owner.email],
            "external_id": None if bits.below(3) else f"ext-{bits.below(10**9):09d}",
            "is_business": bool(bits.below(4)), "admin": True, "customer_deactivated": False,
            "seats_used": seats, "seats_available": seats + bits.below(20), "storage_used": bits.below(10**11),
            "storage_available": 0, "archive": False, "backup_summary": None,
            "login_disabled": bits.below(10) == 0, "flg_suspended": False,
        }
        if full:
            record.update({"organization_name": owner.name, "auto_license": bool(bits.below(2)),
                           "deactivated_seats": 0, "active_seats": seats, "required_seats": seats,
                           "paid_shared_mailboxes": 0, "free_shared_mailboxes": bits.below(3)})
        return record

    def tenant(self, owner: Owner, tenant_id: str) -> Tenant | None:
        if not tenant_id.isdigit():
            return None
        return next((t for t in self._listed_tenants(owner) if t.id == int(tenant_id)), None)

    def tenant_records(self, owner: Owner) -> list[dict[str, Any]]:
        out = []
        for tenant in self._listed_tenants(owner):
            bits = _Bits(stable_hash(self.seed, "tenant", tenant.id))
            created = bits.below(10**12)
            out.append({"id": tenant.id, "organization_id": owner.organization_id, "created_at": _stamp(created),
                        "updated_at": _stamp(created + bits.below(10**13)), "domain": tenant.domain,
                        "status": (7, 7, 7, 7, 0, 1, 5, 13)[bits.below(8)], "total_users": self.account_count(tenant),
                        "type": tenant.type})
        return out

    def account_page(self, owner: Owner, tenant: Tenant, start: int, stop: int) -> list[dict[str, Any]]:
        slots = tenant.slot_stop - tenant.slot_start
        out = []
        slot_owner = (tenant.id - self._tenant_base) // 4  # not ``owner`` once the tenant has moved
        deleted = self._deleted_accounts.get(tenant.id, [])
        for position in range(start, min(stop, self.account_count(tenant))):
            k = _skip_deleted(position, deleted)
            if k < slots:
                out.append(self._slot_account(slot_owner, tenant.slot_start + k))
            elif k < slots + tenant.generated:
                out.append(self._gws_account(tenant, k - slots))
            else:
                out.append(self._extra_account(tenant, tenant.extras[k - slots - tenant.generated]))
        return out

    # -- nights: how the data evolves after night 0 -------------------------------------------------
    # Every change is a pure function of (seed, night), so night N serves the same data in every
    # process, and the ground truth of each night (truth.py) follows from what that night serves.
    # Per regular slot, at most one turnover (the person leaves; a new hire takes the slot: another
    # UPN) and at most one license redraw (upgrade, downgrade, email gained or lost), each on a
    # night drawn from the slot's hash. The organization-level events happen on fixed nights:
    # MOVE_NIGHT: one regular owner's last m365 tenant (its mailboxes, and with it the users of its
    # domain) moves to the next regular owner; ARRIVAL_NIGHT: a new customer arrives;
    # DEPARTURE_NIGHT: the last regular customer leaves (gone from both sources).
    def _successor(self, o: int, j: int, tag: str | None) -> tuple[str, ...]:
        """Extra digest parts for slot (o, j) once its first person has left; () before."""
        if tag is not None or not self.config.night:
            return ()
        span = TURNOVER_SPAN * self.config.churn_divisor
        turnover = 1 + int.from_bytes(stable_digest(self.seed, "turnover", o, j, size=2), "big") % span
        return ("hire",) if self.config.night >= turnover else ()

    def _license_draws(self, o: int, j: int, draws: bytes) -> bytes:
        """The slot's license draws: redrawn from the night its licenses change on."""
        if not self.config.night or self.owners[o].slot_kind(j)[1] is not None:
            return draws
        span = RELICENSE_SPAN * self.config.churn_divisor
        change = 1 + int.from_bytes(stable_digest(self.seed, "relicense", o, j, size=2), "big") % span
        return stable_digest(self.seed, "licenses", o, j, size=16) if self.config.night >= change else draws

    def _regular_indexes(self) -> list[int]:
        return [o for o in range(self.config.orgs) if self._roles[o] == "regular"]

    def _arrivals(self) -> list[int]:
        return [0] if self.config.night >= ARRIVAL_NIGHT and self.config.orgs > MUELLER else []

    @cached_property
    def _departed(self) -> frozenset[int]:
        regular = self._regular_indexes()
        return frozenset(regular[-1:] if self.config.night >= DEPARTURE_NIGHT and len(regular) >= 3 else ())

    @cached_property
    def _move(self) -> tuple[int, int] | None:
        """(from owner, to owner) of the tenant move, once it has happened."""
        regular = self._regular_indexes()
        if self.config.night < MOVE_NIGHT or len(regular) < 3:
            return None
        return regular[0], regular[1]

    def _evolve(self, owners: list[Owner]) -> list[Owner]:
        """Departed owners serve nothing (and are not listed; see ``listed_owners``)."""
        return [replace(owner, bounds=(0, 0, 0), tenants=()) if owner.index in self._departed else owner
                for owner in owners]

    def listed_owners(self) -> list[Owner]:
        return [owner for owner in self.owners
                if owner.index not in self._departed and owner.id not in self.deleted_owners]

    def _listed_tenants(self, owner: Owner) -> tuple[Tenant, ...]:
        move = self._move
        if move is None:
            return owner.tenants
        source = [t for t in self.owners[move[0]].tenants if t.type == "m365"][-1]
        if owner.index == move[0]:
            return tuple(t for t in owner.tenants if t is not source)
        return owner.tenants + (source,) if owner.index == move[1] else owner.tenants

    # -- owners and tenants ---------------------------------------------------------------------
    def _owner_or_key_error(self, owner_id: str) -> Owner:
        owner = self.owner(str(owner_id))
        if owner is None:
            raise KeyError(owner_id)
        return owner

    def _build_owner(self, o: int) -> Owner:
        role = self._roles[o]
        bits = _Bits(stable_hash(self.seed, "layout", o))
        m = self.config.users_per_org
        if role == "regular":
            prefix, slug = ORG_PREFIXES[bits.below(len(ORG_PREFIXES))]
            name = f"{FORMULA_NAMES[5] if o == NO_TENANTS + 1 else ''}{prefix} {o} {bits.pick(ORG_SUFFIXES)}"
            m365 = (f"{slug}-{o}.example",) + ((f"{slug}-{o}.onmicrosoft.example",) if bits.below(100) < 15 else ())
            gws = f"{slug}-{o}-gws.example" if bits.below(100) < 15 else None
            m += bits.below(2 * (m // 5) + 1) - m // 5  # roughly M users, never the same everywhere
        else:
            name = _SPECIAL_OWNERS[MUELLER][1] if role == "twin" else _SPECIAL_OWNERS[o][1]
            m365, gws = _SPECIAL_DOMAINS[role]
        if not m365:
            m = 0
        specials = _SPECIALS.get(role, ((), (), ()))
        s_only, b_only = round(m * 0.08), round(m * 0.08)
        s_end = len(specials[0]) + s_only
        both_end = s_end + len(specials[1]) + m - s_only - b_only
        end = both_end + len(specials[2]) + b_only
        # A second m365 tenant takes the last third of the owner's mailboxes.
        cuts = [s_end, end] if len(m365) == 1 else [s_end, end - (end - s_end) // 3, end]
        tenants = [Tenant(self._tenant_base + 4 * o + t, "m365", domain, cuts[t], cuts[t + 1], 0,
                          self._extras(o, role, t, domain))
                   for t, domain in enumerate(m365)]
        if gws:
            generated = max(3, m // 2) if role == "gws_only" else max(2, m // 4)
            tenants.append(Tenant(self._tenant_base + 4 * o + len(tenants), "gws", gws, 0, 0,
                                  generated, ()))
        email_domain = (m365 or (gws,))[0] or f"owner{o}.reseller-clients.example"
        return Owner(index=o, role=role, id=f"{self._owner_base + o}-{self._shard}",
                     organization_id=18_000 + 3 * o + bits.below(3), name=name,
                     email=f"it-admin@{email_domain}".lower(),
                     token=_uuid(stable_hash(self.seed, "owner-token", o)),
                     bounds=(s_end, both_end, end), specials=specials, tenants=tuple(tenants))

    def _extras(self, o: int, role: str, t: int, domain: str) -> tuple[Extra, ...]:
        if (role, t) in _SPECIAL_EXTRAS:
            return _SPECIAL_EXTRAS[role, t]
        if t == 0:
            count = stable_hash(self.seed, "public-folders", o) % 3
            return tuple(Extra(f"pf.{topic.lower()}@{domain}", f"Public Folder – {topic}", False, None)
                         for topic in DEPARTMENTS[:count])
        return ()

    # -- users ------------------------------------------------------------------------------------------
    def _slot(self, o: int, j: int) -> tuple[str | None, bytes, str]:
        """(special tag or None, 64 random bytes, tier) of slot (o, j): where its person and its subscriptions start."""
        seg, tag = self.owners[o].slot_kind(j)
        d = stable_digest(self.seed, "slot", o, j, *self._successor(o, j, tag), size=64)
        roll = (d[2] << 8 | d[3]) * 1000 >> 16
        if seg == 2:
            tier = "shared" if roll < 100 else "unlicensed" if roll < 400 else "licensed"
        else:
            tier = "shared" if roll < 40 and seg == 1 else "unlicensed" if roll < 240 else "licensed"
        return tag, d, tier

    def _person(self, o: int, j: int) -> _Person:
        owner = self.owners[o]
        tag, d, tier = self._slot(o, j)
        first, first_ascii = FIRST_NAMES[d[0] % len(FIRST_NAMES)]
        last, last_ascii = LAST_NAMES[d[1] % len(LAST_NAMES)]
        local, display = f"{first_ascii}.{last_ascii}{j}", f"{first} {last}"
        if tier == "shared":
            dept = DEPARTMENTS[d[4] % len(DEPARTMENTS)]
            local, display = f"shared.{dept.lower()}{j}", f"Shared Mailbox – {dept}"
        b_name_pct, s_display_pct, mismatch_pct, username_pct = (b * 100 >> 8 for b in d[5:9])
        person = _Person(
            local=local, domain=owner.slot_domain(j), display=display, tier=tier,
            s_display="" if s_display_pct < 3 else "  " if s_display_pct < 4 else display,
            b_name="" if b_name_pct < 3 else f"{last}, {first}" if b_name_pct < 13 and tier != "shared" else display,
            b_licensed=True if (tier == "licensed") != (mismatch_pct < 5) and tier != "shared" else None,
            subs=None, s_spell=_spell_mode(d[9]), b_spell=_spell_mode(d[10]),
            username=None if username_pct < 3 else "" if username_pct < 6 else _spell_mode(d[11]),
            email_alias=d[12] * 100 >> 8 < 5, status=_backup_status(d[13]),
            stamp=int.from_bytes(d[14:21], "big") % 10**15, draws=d[21:])
        if tag:
            spec = {**_PERSON_DEFAULTS, **_SPECIAL_SLOTS[tag]}
            domain = spec.pop("domain", None)
            if domain == "t1":
                domain = owner.tenants[1].domain
            elif domain == "gws":
                domain = next(t.domain for t in owner.tenants if t.type == "gws")
            display = spec.pop("display", None) or spec["local"].replace(".", " ").title()
            person.__dict__.update({"domain": domain or person.domain, "display": display, "tier": "licensed",
                                    "s_display": display, "b_name": display, **spec})
        return person

    def _make_saas_record(self, o: int, j: int) -> dict[str, Any]:
        p = self._person(o, j)
        d = p.draws[11:]  # draws[:11] belong to the id
        # Count and cost the subscriptions from their digests alone: building each one is the page's hot path.
        costs = [_cost(self._subscription_digest(o, j, k))
                 for k in range(len(self._subscription_specs(p.tier, p.subs, p.draws, o, j)))]
        if p.username is None or p.username == "":
            username, email = p.username, _spell(p.local, p.domain, p.s_spell)
        else:
            username = _spell(p.local, p.domain, p.username)
            email = f"{p.local[0]}{p.local.rpartition('.')[2]}@{p.domain}".lower() if p.email_alias else p.key
        created = (d[16] << 8 | d[17]) % 365
        enabled, review, online, qualified, active = (b * 100 >> 8 for b in d[18:23])
        user = {
            "country": COUNTRIES[d[23] % len(COUNTRIES)], "createdDate": f"{_DAYS[created]}T00:00:00Z",
            "department": DEPARTMENTS[d[24] % len(DEPARTMENTS)],
            "discoveryTypes": {"0": 1, "1": 2} if d[25] & 1 else {"0": 1},
            "displayName": p.s_display, "email": email, "id": _saas_id(o, j, p.draws),
            "isEnabled": enabled < 95, "isInReview": review < 10, "isOnline": online < 70,
            "isQualified": qualified < 80,
            "lastActive": f"{_DAYS[created + (d[26] << 8 | d[27]) % 365]}T00:00:00Z",
            "licenseCount": len(costs), "potentialSavings": sum(savings for _, savings in costs),
            "status": "Active" if active < 90 else "Inactive",
            "userCostPerMonth": sum(cost for cost, _ in costs), "username": username,
        }
        return user

    def _subscription_specs(self, tier: str, subs: tuple[Any, ...] | None, draws: bytes, o: int, j: int
                            ) -> tuple[Any, ...] | list[str]:
        """The slot's subscriptions as catalog names or (name, applicationName mode, vendor) tuples."""
        return subs if subs is not None else _random_subs(tier, self._license_draws(o, j, draws[11:27]))

    def _subscriptions(self, tier: str, subs: tuple[Any, ...] | None, draws: bytes, o: int, j: int
                       ) -> tuple[dict[str, Any], ...]:
        specs = self._subscription_specs(tier, subs, draws, o, j)
        return tuple(self._subscription(o, j, k, spec) for k, spec in enumerate(specs))

    def _subscription_digest(self, o: int, j: int, k: int) -> bytes:
        """The 32 random bytes of the slot's ``k``-th subscription (bytes 0-15 are its id; see ``_cost``)."""
        return stable_digest(self.seed, "subscription", o, j, k, size=32)

    def _subscription(self, o: int, j: int, k: int, spec: Any) -> dict[str, Any]:
        name, mode, vendor = (spec, None, None) if isinstance(spec, str) else spec
        code, catalog_vendor = _CATALOG[name.lower()]
        d = self._subscription_digest(o, j, k)
        if mode is None:  # 5 % of names only in `name`, applicationName empty or null
            mode = (_EMPTY if d[16] & 1 else _NULL) if d[16] * 100 >> 8 < 5 else 0
        vendor = vendor or catalog_vendor or MICROSOFT_VENDORS[d[17] % len(MICROSOFT_VENDORS)]
        app_id = _app_id(name)  # the vendor's id of the application, however its name is spelled
        if j % 2 and self.config.license_spelling != "catalog":
            name = name.lower() if self.config.license_spelling == "lower" else name.upper()
        cost, savings = _cost(d)
        first = int.from_bytes(d[19:23], "big") % (365 * 86_400_000)
        return {
            "applicationId": app_id, "applicationName": name if mode == 0 else ("" if mode == _EMPTY else None),
            "discoverySource": ("O365 Connector", "O365 Connector", "SSO", "Browser Extension")[d[23] % 4],
            "discoveryType": d[24] % 3, "firstDiscovered": _stamp(first, 3),
            "id": _uuid(int.from_bytes(d[:16], "big")),
            "lastActivity": f"{_DAYS[first // 86_400_000 + (d[25] << 8 | d[26]) % 365]}T00:00:00Z",
            "name": code if mode == 0 else name, "potentialSavings": savings,
            "totalCostPerMonth": cost, "vendor": vendor, "vendorId": _vendor_id(vendor),
        }

    def _slot_account(self, o: int, j: int) -> dict[str, Any]:
        p = self._person(o, j)
        return _account(p.b_name, p.key, _spell(p.local, p.domain, p.b_spell), True, p.b_licensed, p.status,
                        "m365", None, p.stamp)

    def _gws_account(self, tenant: Tenant, k: int) -> dict[str, Any]:
        bits = _Bits(stable_hash(self.seed, "gws", tenant.id, k))
        first, first_ascii = bits.pick(FIRST_NAMES)
        last, last_ascii = bits.pick(LAST_NAMES)
        upn = f"{first_ascii}.{last_ascii}.g{k}@{tenant.domain}"
        return _account(f"{first} {last}", upn, upn, True, None, bits.pick(("active", "available", None)),
                        "gws", bits.pick(("active", "active", "suspended", "excluded")), bits.below(10**15))

    def _extra_account(self, tenant: Tenant, extra: Extra) -> dict[str, Any]:
        stamp = stable_hash(self.seed, "extra", tenant.id, extra.upn) % 10**15
        return _account(extra.name, extra.upn.strip().lower(), extra.upn, extra.mailbox, extra.licensed, "active",
                        "m365", None, stamp)


_COSTS = (0, 4, 6, 8, 12, 20, 22, 36, 57)  # a subscription's totalCostPerMonth, one per d[18] % 9


def _cost(d: bytes) -> tuple[int, int]:
    """(totalCostPerMonth, potentialSavings) of the subscription whose digest is ``d``: half the cost, or none."""
    cost = _COSTS[d[18] % 9]
    return cost, cost // 2 * (d[27] & 1)


def _skip_deleted(position: int, deleted: list[int]) -> int:
    """The index of the record at ``position`` of a list whose records at ``deleted`` (sorted indices) are gone."""
    index = position
    for gone in deleted:  # a handful at most
        if gone <= index:
            index += 1
    return index


def _saas_id(o: int, j: int, d: bytes) -> str:
    """A UUID whose last group encodes (owner, slot), so it decodes in O(1); 9 random bytes make
    the rest, so an id this dataset never issued fails the check in ``subscriptions_of``."""
    x = d[:9].hex()
    return f"{x[:8]}-{x[8:12]}-4{x[12:15]}-{'89ab'[d[9] % 4]}{x[15:18]}-{o:05x}{j:07x}"


_STATUS_DRAWS = ("active",) * 11 + ("available", "available", "excluded", None, "pending")  # 16: one per byte % 16


def _backup_status(byte: int) -> str | None:
    """A mailbox's backup status (rule 13): mostly active, some available, excluded, null or a value the
    vendor does not document ("pending"), spelled as the vendor sometimes does (case, surrounding spaces)."""
    status = _STATUS_DRAWS[byte % 16]
    if status is None:
        return None
    return ((status,) * 5 + (status.title(), status.upper(), f" {status} "))[byte >> 4 & 7]


def _spell_mode(byte: int) -> str:
    pct = byte * 100 >> 8
    return "plain" if pct < 70 else "title" if pct < 88 else "upper" if pct < 94 else "padded"


def _random_subs(tier: str, d: bytes) -> list[str]:
    """A user's subscription names from 16 random bytes."""
    if tier == "shared":
        return []
    if tier == "unlicensed":
        return [_FREE_OR_OTHER_NAMES[b % len(_FREE_OR_OTHER_NAMES)] for b in d[2:2 + (0, 1, 1, 2)[d[0] % 4]]]
    primary = _EMAIL_NAMES[d[1] % len(_EMAIL_NAMES)] if d[0] * 100 >> 8 < 85 else \
        _M365_OTHER_NAMES[d[1] % len(_M365_OTHER_NAMES)]
    return [primary, *(_EXTRA_NAMES[b % len(_EXTRA_NAMES)] for b in d[3:3 + (0, 1, 1, 2, 3)[d[2] % 5]])]


def _account(name: str, email: str, upn: str, mailbox: bool, licensed: bool | None, status: str | None,
             type_: str, tenant_status: str | None, stamp: int) -> dict[str, Any]:
    return {"name": name, "email": email, "upn": upn, "mailbox": mailbox, "licensed": licensed, "status": status,
            "type": type_, "tenant_status": tenant_status, "created_at": _stamp(stamp),
            "updated_at": _stamp(stamp + stamp % 10**13)}
