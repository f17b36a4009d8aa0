"""Configuration from the environment (and a ``.env`` file): the one place each variable is read.

The variables and their meaning are listed in the README's Configuration table.
"""

from __future__ import annotations

import os
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DUCKDB_FILE = "m365.duckdb"
ANALYTICS_FILE = "analytics.duckdb"
DATA_DIR_VARIABLE = "M365_DATA_DIR"


def load_env_file() -> None:
    """Read ``.env`` from the working directory; real environment variables win."""
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)


def env_value(name: str) -> str | None:
    """The variable's value, or None when it is unset or blank."""
    value = os.environ.get(name, "")
    return value if value.strip() else None


def data_dir() -> Path:
    """``M365_DATA_DIR`` (default ``./data``), absolute. Reading it creates nothing."""
    return Path(os.environ.get(DATA_DIR_VARIABLE, "").strip() or "data").resolve()


def schedule_timezone() -> str:
    zone = os.environ.get("M365_SCHEDULE_TIMEZONE", "").strip() or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"M365_SCHEDULE_TIMEZONE={zone!r} is not an IANA time zone (examples: UTC, Europe/Berlin)"
        ) from None
    return zone
