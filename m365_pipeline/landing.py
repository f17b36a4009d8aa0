"""Land vendor records in DuckDB through a newline-delimited JSON staging file.

Records stream to disk as pages arrive, so memory stays flat however many users an
MSP has, and DuckDB's JSON reader types and loads the whole file in one statement.
The table is swapped with ``CREATE OR REPLACE`` only after the pull finished, so a
failed pull leaves yesterday's raw table untouched.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import msgspec

from m365_pipeline.processes import process_alive
from m365_pipeline.resources.http import Endpoint, MalformedResponseError

if TYPE_CHECKING:
    from m365_pipeline.raw_tables import RawTable

# Fields whose values are credentials. They never reach the staging file or a table.
_TOKEN_FIELD = re.compile(r"token|secret|password", re.IGNORECASE)
# UTF-8 JSON lines, ten times faster than the stdlib's encoder; integers of any size stay exact.
_ENCODE = msgspec.json.Encoder().encode
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake_case(name: str) -> str:
    """``displayName`` -> ``display_name``; already snake_cased names pass through."""
    return _CAMEL_BOUNDARY.sub("_", name).replace("-", "_").lower()


# A handful of distinct keys asked millions of times: the regex was ~6 % of a 100k-user pull's CPU.
@lru_cache(maxsize=4096)
def is_secret_field(name: str) -> bool:
    return bool(_TOKEN_FIELD.search(name))


# Keys already known to hold no credential: a record with only those is kept as it is (a set test in C).
_PLAIN_KEYS: set[str] = set()


def without_secrets(record: Mapping[str, Any]) -> Mapping[str, Any]:
    if record.keys() <= _PLAIN_KEYS:
        return record
    if len(_PLAIN_KEYS) < 4096:  # bounded, like is_secret_field's cache, whatever keys a vendor invents
        _PLAIN_KEYS.update(key for key in record if not is_secret_field(key))
    return {key: value for key, value in record.items() if not is_secret_field(key)}


def remove_orphans(directory: Path) -> None:
    """Staging files of runs that were killed (their process is gone) are deleted, not reused."""
    for leftover in directory.glob("*.jsonl"):
        pid = leftover.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            leftover.unlink(missing_ok=True)


class StagingFile:
    """Append-only JSONL file of one pull; each line remembers the endpoint and page it came from."""

    def __init__(self, directory: Path, table: RawTable):
        directory.mkdir(parents=True, exist_ok=True)
        remove_orphans(directory)
        self.path = directory / f"{table.qualified}.{os.getpid()}.jsonl"
        self.table = table
        self.rows = 0
        self._handle = self.path.open("wb")

    def add(self, records: Iterable[Mapping[str, Any]], *, origin: Endpoint, **context: Any) -> None:
        where = origin.describe()
        lines = [_ENCODE({**without_secrets(record), **context, "_origin": where}) for record in records]
        if lines:
            self._handle.write(b"\n".join(lines) + b"\n")
            self.rows += len(lines)

    def restart(self) -> None:
        """Drop everything added so far (a read that has to be done again)."""
        self._handle.seek(0)
        self._handle.truncate()
        self.rows = 0

    def load(self, conn: duckdb.DuckDBPyConnection, collected_at: datetime) -> int:
        """Replace the table with this file's rows in one statement; return the row count."""
        self._handle.close()
        try:
            conn.execute(self.table.load_sql(), [collected_at, str(self.path)])
        except duckdb.Error as exc:
            raise MalformedResponseError(self._explain(exc)) from None
        return self.rows

    def discard(self) -> None:
        self._handle.close()
        self.path.unlink(missing_ok=True)

    def _explain(self, exc: duckdb.Error) -> str:
        """Name the vendor endpoint and page behind a record DuckDB could not type."""
        text = str(exc).splitlines()[0]
        match = re.search(r"line (\d+)", text)
        origin = ""
        if match:
            wanted = int(match.group(1))
            with self.path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if number == wanted:
                        origin = f" from {json.loads(line).get('_origin')}"
                        break
        detail = text.split(":", 1)[-1].split(" in file ")[0].strip()
        return f"a record{origin} does not match the documented types of {self.table.qualified}: {detail}"

    def __enter__(self) -> StagingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()
