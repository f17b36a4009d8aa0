"""Configuration from the environment (and a ``.env`` file): the one place each variable is read.

The variables and their meaning are listed in the README's Configuration table.
"""

from __future__ import annotations

import os
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DUCKDB_FILE = "m365.duckdb"
ANALYTICS_FILE = "analytics.duckdb"
STAGING_DIR = ".staging"  # beside the DuckDB file: the raw pulls land here before the table swap
DATA_DIR_VARIABLE = "M365_DATA_DIR"
CA_BUNDLE_VARIABLE = "M365_CA_BUNDLE"  # the CA bundle vendor certificates are checked against


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


class DataDirError(ValueError):
    """A data directory that cannot be used; the message is one line naming the setting and the path."""


def _where(setting: str, path: Path) -> str:
    """How the user wrote it: ``--data-dir /x`` for a flag, ``M365_DATA_DIR=/x`` for a variable."""
    return f"{setting} {path}" if setting.startswith("-") else f"{setting}={path}"


def prepare_data_dir(path: Path, setting: str = DATA_DIR_VARIABLE) -> bool:
    """Make ``path`` ready for a run: True if it holds no pipeline file yet (a first run, no history).

    Only the last component is ever created: a missing parent is far more often a typo than a
    wish, and a silently created tree would publish where ``m365-serve`` is not looking.
    """
    where = _where(setting, path)
    if path.exists() and not path.is_dir():
        raise DataDirError(f"{where} is not a directory")
    if not path.exists():
        if not path.parent.is_dir():
            raise DataDirError(f"{where}: its parent {path.parent} does not exist (a typo?); "
                               "create the parent or fix the setting")
        try:
            path.mkdir()
        except OSError as exc:
            raise DataDirError(f"{where} cannot be created: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataDirError(f"{where} is not writable by this user")
    working_file = path / DUCKDB_FILE
    if working_file.exists() and not os.access(working_file, os.R_OK | os.W_OK):
        raise DataDirError(f"{where}: {DUCKDB_FILE} there is not writable by this user")
    return not working_file.exists()


def existing_data_dir(path: Path, setting: str = DATA_DIR_VARIABLE) -> Path:
    """``path`` if it is a readable directory (for readers such as ``m365-serve``), else a DataDirError."""
    where = _where(setting, path)
    if not path.exists():
        raise DataDirError(f"{where} does not exist; point it at the directory the pipeline publishes into")
    if not path.is_dir():
        raise DataDirError(f"{where} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataDirError(f"{where} is not readable by this user")
    return path


def schedule_timezone() -> str:
    zone = os.environ.get("M365_SCHEDULE_TIMEZONE", "").strip() or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"M365_SCHEDULE_TIMEZONE={zone!r} is not an IANA time zone (examples: UTC, Europe/Berlin)"
        ) from None
    return zone
