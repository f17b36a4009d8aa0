"""Published versions of the Dashboard API: written whole, swapped in one step, read consistently.

Layout under ``<data dir>/export``::

    current -> versions/20261123T230004Z-1a2b3c4d    (a symlink, replaced atomically)
    versions/<id>/manifest.json                       (written last: a version without it is unfinished)
    versions/<id>/summary.json, users/<hash>.json, export/<sort>.<json|csv>, and .gz twins
    versions/<id>/coverage/organizations.<json|csv>, coverage/<hash>.<json|csv>   (when source B is configured)
    versions/<id>/history/all.<json|csv>, history/organizations.json, history/changed_users.parquet   (rules 11, 12;
        organizations.json is every organization's /history body one after the other, not one document)

File names never come from organization names: a users file is named by a hash of the name,
and the manifest maps exact names to files (the keys and file names are api_bodies', as are the
bodies). A reader resolves ``current`` once per request and
reads everything from that version, so it sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from isal import igzip

from m365_pipeline.api_bodies import (
    CONTENT_TYPES,
    billing_key,
    coverage_file_name,
    coverage_key,
    export_key,
    history_key,
    json_bytes,
    summary_key,
    users_file_name,
    users_key,
)
from m365_pipeline.crashpoints import crash_point
from m365_pipeline.processes import process_alive

MANIFEST = "manifest.json"
WRITER_PID = ".writer-pid"
CURRENT = "current"
VERSIONS = "versions"
KEEP_VERSIONS = 3  # current + two older ones, so in-flight reads of a replaced version finish
GZIP_MIN_BYTES = 1024
# ISA-L's gzip at its default level: 5-10x zlib level 6's speed here, twins ~30 % larger (bench/RESULTS.md).
GZIP_LEVEL = 2


def export_dir(data_dir: Path) -> Path:
    return data_dir / "export"


def http_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def iso_z(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def etag(body: bytes) -> str:
    """A published file's ETag: the start of its SHA-256."""
    return _etag(hashlib.sha256(body))


def _etag(digest: Any) -> str:
    return f'"{digest.hexdigest()[:32]}"'


class VersionWriter:
    """Builds one version in a private directory; ``commit`` makes it current atomically."""

    def __init__(self, root: Path):
        self.root = root
        (root / VERSIONS).mkdir(parents=True, exist_ok=True)
        self.published_at = datetime.now(UTC).replace(microsecond=0)
        self.version_id = f"{self.published_at.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
        self.path = root / VERSIONS / self.version_id
        self.path.mkdir()
        (self.path / WRITER_PID).write_text(str(os.getpid()))
        self.files: dict[str, dict[str, Any]] = {}
        self.organizations: dict[str, str] = {}

    def write_bytes(self, key: str, relative: str, body: bytes, content_type: str) -> None:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        self.files[key] = {"path": relative, "content_type": content_type}

    def adopt(self, key: str, relative: str, content_type: str) -> Path:
        """Register a file something else (DuckDB's COPY) writes at the returned path."""
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self.files[key] = {"path": relative, "content_type": content_type}
        return target

    def link(self, previous: Path, entries: dict[str, dict[str, Any]]) -> bool:
        """Take the finished files ``entries`` (key: manifest entry) of the earlier version at ``previous``, with
        their gzip twins, as they are: by hard link, with the size and ETag the entries give. A version is never
        modified once written, so the bytes are the same without copying, hashing and compressing them again.
        All or nothing: False (and nothing taken) where a file is missing or the file system cannot link."""
        linked: list[Path] = []
        try:
            for entry in entries.values():
                for relative in (entry["path"], entry.get("gzip_path")):
                    if relative:
                        target = self.path / relative
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.link(previous / relative, target)
                        linked.append(target)
        except OSError:
            for target in linked:
                target.unlink()  # never written through: the inode is the earlier version's too
            return False
        self.files.update({key: dict(entry) for key, entry in entries.items()})
        return True

    def add_organization(self, name: str, body: bytes) -> None:
        self.write_bytes(users_key(name), users_file_name(name), body, CONTENT_TYPES["json"])
        self.organizations[name] = users_key(name)

    def write_coverage(self, organization_name: str | None, fmt: str, body: bytes) -> None:
        self.write_bytes(coverage_key(organization_name, fmt), coverage_file_name(organization_name, fmt), body,
                         CONTENT_TYPES[fmt])

    def _finish_file(self, entry: dict[str, Any]) -> None:
        """Hash for the ETag, and a gzip twin for large files, made once here rather than per request."""
        source = self.path / entry["path"]
        digest = hashlib.sha256()
        size = 0
        gz_path = source.with_name(source.name + ".gz")
        compress = source.stat().st_size >= GZIP_MIN_BYTES
        with source.open("rb") as raw, (igzip.GzipFile(gz_path, "wb", compresslevel=GZIP_LEVEL, mtime=0)
                                        if compress else _NullWriter()) as gz:
            while chunk := raw.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                gz.write(chunk)
        entry["size"] = size
        entry["etag"] = _etag(digest)
        if compress:
            entry["gzip_path"] = entry["path"] + ".gz"
            entry["gzip_size"] = gz_path.stat().st_size

    def commit(self, metadata: dict[str, Any], workers: int = 2) -> Path:
        """Finish every file, write the manifest, and swap ``current`` to this version."""
        self.seal(metadata, workers)
        return self.swap()

    def seal(self, metadata: dict[str, Any], workers: int = 2) -> None:
        """Finish every file and write the manifest: the version is complete but not yet served."""
        unfinished = [entry for entry in self.files.values() if "etag" not in entry]  # linked ones are finished
        with ThreadPoolExecutor(max_workers=workers) as pool:  # ISA-L and hashlib release the GIL
            list(pool.map(self._finish_file, unfinished))
        manifest = {
            "version": self.version_id,
            "published_at": iso_z(self.published_at),
            "last_modified": http_timestamp(self.published_at),
            **metadata,
            "files": self.files,
            "organizations": self.organizations,
        }
        os.sync()  # every file durable before the manifest says the version is complete
        (self.path / MANIFEST).write_bytes(json_bytes(manifest))
        _fsync_file(self.path / MANIFEST)

    def swap(self) -> Path:
        """Make this sealed version ``current`` (one atomic rename), then drop the versions no longer kept."""
        link = self.root / CURRENT
        staging_link = self.root / f".{CURRENT}.{self.version_id}"
        staging_link.symlink_to(Path(VERSIONS) / self.version_id)
        crash_point("publish-swap")
        os.replace(staging_link, link)  # atomic on POSIX: readers see old or new
        _fsync_dir(self.root)
        (self.path / WRITER_PID).unlink(missing_ok=True)
        prune_versions(self.root)
        return self.path

    def is_current(self) -> bool:
        return current_version_dir(self.root) == self.path.resolve()

    def abandon(self) -> None:
        """Delete this version, unless a failure after the swap left it served."""
        if not self.is_current():
            shutil.rmtree(self.path, ignore_errors=True)


class _NullWriter:
    def write(self, data: bytes) -> None:
        pass

    def __enter__(self) -> _NullWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_version_dir(root: Path) -> Path | None:
    link = root / CURRENT
    try:
        target = os.readlink(link)
    except OSError:
        return None
    path = (root / target).resolve()
    return path if (path / MANIFEST).is_file() else None


def published_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of the version ``current`` points at, or None before the first publish."""
    path = current_version_dir(root)
    return json.loads((path / MANIFEST).read_bytes()) if path else None


def prune_versions(root: Path, keep: int = KEEP_VERSIONS) -> list[str]:
    """Delete unfinished versions and all but the newest ``keep`` finished ones; never ``current``."""
    versions = root / VERSIONS
    current = current_version_dir(root)
    finished, removed = [], []
    for entry in sorted(versions.iterdir()) if versions.is_dir() else []:
        if current is not None and entry.resolve() == current:
            continue
        if (entry / MANIFEST).is_file():
            finished.append(entry)
        elif not _writer_alive(entry):  # unfinished, and its writer was killed or failed
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    for entry in finished[: max(0, len(finished) - (keep - 1))]:
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    for stale_link in root.glob(f".{CURRENT}.*"):
        stale_link.unlink(missing_ok=True)
    return removed


def _writer_alive(version: Path) -> bool:
    try:
        pid = int((version / WRITER_PID).read_text())
    except (OSError, ValueError):
        return time.time() - version.stat().st_mtime < 3600  # no pid file: give it an hour
    return pid == os.getpid() or process_alive(pid)


@dataclass(frozen=True)
class PublishedFile:
    path: Path
    content_type: str
    etag: str
    size: int
    gzip_path: Path | None
    gzip_size: int | None


class PublishedVersion:
    """A finished version as the server reads it: the manifest, loaded once."""

    def __init__(self, path: Path):
        self.path = path
        manifest = json.loads((path / MANIFEST).read_bytes())
        self.version = manifest["version"]
        self.last_modified: str = manifest["last_modified"]
        self.published_at = datetime.strptime(manifest["published_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        self.files = {key: self._file(entry) for key, entry in manifest["files"].items()}
        self.organizations: dict[str, str] = manifest["organizations"]
        # Rules 11 and 12: the kept nights, oldest first ([{date, last_collected}]), and the
        # organizations of any kept night (exact name -> [offset, length] of its body in
        # ORGANIZATION_HISTORY_FILE; in versions older than that file, the file key of its history files).
        self.nights: list[dict[str, str]] = manifest.get("nights", [])
        self.history_organizations: dict[str, str | list[int]] = manifest.get("history_organizations", {})
        # What m365-serve answers /changes and /history?org from (api_bodies.CHANGED_USERS_FILE and
        # ORGANIZATION_HISTORY_FILE, history_organizations then giving each body's [offset, length]);
        # None in versions older than them.
        self.changed_users: Path | None = path / manifest["changed_users"] if "changed_users" in manifest else None
        self.organization_history: Path | None = \
            path / manifest["organization_history"] if "organization_history" in manifest else None
        # Rules 14 and 15: the billing months of this version, {month: {closed, organizations: {name:
        # [json offset, json length, csv offset, csv length] in its organizations files}}}.
        self.billing_months: dict[str, dict[str, Any]] = manifest.get("billing", {})

    def _file(self, entry: dict[str, Any]) -> PublishedFile:
        gz = entry.get("gzip_path")
        return PublishedFile(
            path=self.path / entry["path"], content_type=entry["content_type"], etag=entry["etag"],
            size=entry["size"], gzip_path=self.path / gz if gz else None, gzip_size=entry.get("gzip_size"),
        )

    def summary(self, fmt: str = "json") -> PublishedFile | None:
        """The summary; its CSV is None in versions published before it was written."""
        return self.files.get(summary_key(fmt))

    def users(self, organization_name: str) -> PublishedFile | None:
        key = self.organizations.get(organization_name)
        return self.files[key] if key else None

    def export(self, sort: str, fmt: str) -> PublishedFile:
        return self.files[export_key(sort, fmt)]

    def history(self, fmt: str, file_key: str | None = None) -> PublishedFile:
        return self.files[history_key(fmt, file_key)]

    @property
    def has_coverage(self) -> bool:
        """Whether this version has backup coverage (not when source B was not configured)."""
        return coverage_key(None, "json") in self.files

    def coverage(self, organization_name: str | None, fmt: str) -> PublishedFile | None:
        return self.files.get(coverage_key(organization_name, fmt))

    def billing(self, month: str, part: str, fmt: str) -> PublishedFile | None:
        """A billing month's ``report`` or ``items`` file; None for a month this version has not."""
        return self.files.get(billing_key(month, part, fmt)) if month in self.billing_months else None

    def billing_organization(self, month: str, organization_name: str, fmt: str) -> bytes | None:
        """One organization's body of a billing month (read from the month's organizations file by its range);
        None when the month has no such organization."""
        ranges = self.billing_months.get(month, {}).get("organizations", {}).get(organization_name)
        if ranges is None:
            return None
        offset, length = ranges[0:2] if fmt == "json" else ranges[2:4]
        with self.files[billing_key(month, "organizations", fmt)].path.open("rb") as bodies:
            bodies.seek(offset)
            return bodies.read(length)
