"""Configuration from the environment (and a ``.env`` file), as DESIGN.md lists it."""

from __future__ import annotations

import os
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dagster import EnvVar
from dotenv import load_dotenv

DUCKDB_FILE = "m365.duckdb"
ANALYTICS_FILE = "analytics.duckdb"


def load_env_file() -> None:
    """Read ``.env`` from the working directory; real environment variables win."""
    load_dotenv(Path.cwd() / ".env", override=False)


def optional_env(name: str) -> EnvVar | None:
    """An EnvVar when the variable is set, so the Dagster UI shows its name, never its value."""
    return EnvVar(name) if os.environ.get(name, "").strip() else None


def data_dir() -> Path:
    return Path(os.environ.get("M365_DATA_DIR", "").strip() or "data").resolve()


def schedule_timezone() -> str:
    zone = os.environ.get("M365_SCHEDULE_TIMEZONE", "").strip() or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"M365_SCHEDULE_TIMEZONE={zone!r} is not an IANA time zone (examples: UTC, Europe/Berlin)"
        ) from None
    return zone
