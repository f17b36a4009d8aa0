"""The license classification rules (contract rules 4 and 5), read from an editable CSV.

The CSV ships inside the package (``license_rules.csv``); this module validates it and
turns each pattern into one SQL ``LIKE`` pattern so DuckDB applies every rule the same way:
``lower(value) LIKE lower(like_pattern) ESCAPE '\\'``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from importlib import resources
from pathlib import Path

import duckdb

RULES_FILE = "license_rules.csv"
_ALLOWED = {
    "applies_to": {"m365", "email"},
    "effect": {"require", "include", "exclude"},
    "field": {"vendor", "license_name"},
    "match": {"contains", "glob"},
}


class LicenseRulesError(ValueError):
    """The rules file is not usable; the message says which line and why."""


@dataclass(frozen=True)
class LicenseRule:
    rule_order: int
    rule_id: str
    applies_to: str
    effect: str
    field: str
    match: str
    pattern: str
    like_pattern: str
    description: str


def register_rules(conn: duckdb.DuckDBPyConnection, rules: Sequence[LicenseRule]) -> None:
    """The rules as this connection's temporary table ``rules_frame``, which core_license_rules.sql stores."""
    columns = [f"{f.name} {'INTEGER' if f.type == 'int' else 'VARCHAR'}" for f in fields(LicenseRule)]
    conn.execute(f"CREATE OR REPLACE TEMP TABLE rules_frame ({', '.join(columns)})")
    if rules:
        conn.executemany(f"INSERT INTO rules_frame VALUES ({', '.join('?' * len(columns))})",
                         [astuple(rule) for rule in rules])


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def glob_to_like(pattern: str) -> str:
    """``Exchange Online (Plan*`` -> ``Exchange Online (Plan%``: ``*`` is any text, all else literal."""
    return "%".join(_escape_like(part) for part in pattern.split("*"))


def contains_to_like(fragment: str) -> str:
    return f"%{_escape_like(fragment)}%"


def default_rules_path() -> Path:
    return Path(str(resources.files("m365_pipeline").joinpath(RULES_FILE)))


def load_rules(path: Path | None = None) -> list[LicenseRule]:
    path = path or default_rules_path()
    rules: list[LicenseRule] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        expected = ["rule_id", "applies_to", "effect", "field", "match", "pattern", "description"]
        if reader.fieldnames != expected:
            raise LicenseRulesError(f"{path}: the header must be {','.join(expected)}")
        for line, row in enumerate(reader, start=2):
            values = {key: (row.get(key) or "").strip() for key in expected}
            for key, allowed in _ALLOWED.items():
                if values[key] not in allowed:
                    raise LicenseRulesError(
                        f"{path} line {line}: {key} is {values[key]!r}, expected one of {sorted(allowed)}"
                    )
            if not values["rule_id"] or not values["pattern"]:
                raise LicenseRulesError(f"{path} line {line}: rule_id and pattern must not be empty")
            if values["rule_id"] in seen:
                raise LicenseRulesError(f"{path} line {line}: rule_id {values['rule_id']!r} appears twice")
            if values["effect"] == "require" and values["applies_to"] != "m365":
                raise LicenseRulesError(f"{path} line {line}: only m365 rules can be 'require'")
            seen.add(values["rule_id"])
            like = glob_to_like(values["pattern"]) if values["match"] == "glob" else contains_to_like(values["pattern"])
            rules.append(LicenseRule(rule_order=len(rules) + 1, like_pattern=like, **values))
    if not any(rule.applies_to == "email" and rule.effect == "include" for rule in rules):
        raise LicenseRulesError(f"{path}: no email include pattern, so nobody could ever be an ES user")
    return rules
