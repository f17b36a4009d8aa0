"""Nights kept (rules 11-12) and backup coverage (rule 13) at scale, without pulling over HTTP every night.

    .venv/bin/python bench/nights.py                       # 30 nights at 100k, then 2 nights at 1M (~35 min)
    .venv/bin/python bench/nights.py --cells 100k          # the 100k cell only (31 nights, closes January)

Each night the simulator's records for that night (`m365-simulate --night N`'s data, generated in-process)
are landed through the product's own staging files (`landing.StagingFile`, as the raw assets do) with that
night's collection timestamp (night N is collected on BASE_DAY + N days, so each has its own date: rule 10's
last_collected is the earliest `collected_at`). Then the product's real downstream assets (core, marts,
coverage, export incl. the night recording, the analytics copy) run through Dagster on that DuckDB file:
the real Definitions' assets, checks and resources, everything but raw.*. Only the pipeline writes tables.

Measured:
- file growth (issue 13): the working DuckDB file after night 1 and after the last night;
- the night-recording work (record_night, the history files, the changed users' history m365-serve answers
  /changes from; wrapped with a stopwatch in this
  process, nothing else changed) against the transform (core.* and marts.* steps and their checks, from
  Dagster's step events: wall and CPU of this process, which runs DuckDB);
- coverage (issue 14): on the SAME landed raw data, the transform steps with and without the coverage
  assets and their checks, A/B interleaved, CPU and wall; and the coverage steps' own share;
- at 1M: after two nights, `/api/m365/changes` and `/api/m365/history` from the real `m365-serve` on a real
  socket serving the published version.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from harness import BIN, Children, say

from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.settings import DATA_DIR_VARIABLE, DUCKDB_FILE
from m365_pipeline.simulator.dataset import Dataset, SimulatorConfig

SEED = 42
# The served simulator turns over 1/60 and relicenses 1/30 of its slots a night (~4 % of the published
# users change), issue 13's figure is for about 1 %: the dataset's bench-only knob divides it (6: ~1.1 %).
CHURN_DIVISOR = 6
# Night 0's collection time; night N is N days later. Nights 0-29 are January 2-31 and night 30 is February 1,
# so a 31-night cell closes January (30 kept nights) and seals it on its last night (rules 14-15).
BASE_DAY = datetime(2026, 1, 2, 23, 0, tzinfo=UTC)
COVERAGE_KEYS = (("core", "backup_coverage"), ("marts", "org_backup_coverage"))
NIGHT_WORK = ("record_night", "write_history_files", "write_changed_users")  # in assets/export.py
BILLING_WORK = "seal_and_write"  # assets/billing.py, called by the export: the open month every night, and sealing
# The product's environment: URLs that are never contacted (raw.* does not run) but make both sources
# "configured", so the export writes coverage and records the sources as a pulled night would.
SOURCES_ENV = {"SAAS_API_BASE_URL": "http://127.0.0.1:9/api/saas/consolidated-view/v1", "SAAS_API_TOKEN": "bench",
               "BACKUP_API_BASE_URL": "http://127.0.0.1:9/api", "BACKUP_RESELLER_TOKEN": "bench",
               "BACKUP_ADMIN_TOKEN": "bench"}


@dataclass(frozen=True)
class Origin:
    what: str

    def describe(self) -> str:
        return self.what


def stage(config: SimulatorConfig, directory: Path) -> dict[str, tuple[str, int]]:
    """Write one night's records into the product's staging files, as the raw assets do; {table: (path, rows)}.

    Runs in a separate process, so the next night is generated while the pipeline runs this one.
    """
    from m365_pipeline.landing import StagingFile
    from m365_pipeline.raw_tables import (
        BACKUP_ACCOUNTS,
        BACKUP_ORGANIZATIONS,
        BACKUP_TENANTS,
        SAAS_USER_SUBSCRIPTIONS,
        SAAS_USERS,
    )

    ds = Dataset(config)
    users = list(ds.saas_users())

    def subscriptions() -> Iterator[dict[str, Any]]:  # the context the raw asset adds, in the record
        for user in users:
            for sub in ds.saas_subscriptions(user["id"]):
                yield {**sub, "user_id": user["id"]}

    owners = list(ds.backup_owners())
    tenants = [{**t, "owner_id": o["id"]} for o in owners for t in ds.backup_tenants(o["id"])]

    def accounts() -> Iterator[dict[str, Any]]:
        for tenant in tenants:
            for account in ds.backup_accounts(tenant["owner_id"], tenant["id"]):
                yield {**account, "owner_id": tenant["owner_id"], "tenant_id": tenant["id"]}

    staged = {}
    for table, records in ((SAAS_USERS, users), (SAAS_USER_SUBSCRIPTIONS, subscriptions()),
                           (BACKUP_ORGANIZATIONS, owners), (BACKUP_TENANTS, tenants), (BACKUP_ACCOUNTS, accounts())):
        staging_file = StagingFile(directory, table)
        staging_file.add(records, origin=Origin(f"bench night {config.night}"))
        staging_file._handle.close()  # loaded by the parent process (land), which then deletes it
        staged[table.name] = (str(staging_file.path), staging_file.rows)
    return staged


def land(staged: dict[str, tuple[str, int]], database: Path, collected: datetime) -> dict[str, int]:
    """Replace the raw tables with the staged files, with the statement StagingFile.load runs, each on a
    connection of its own as each raw asset's step does: DuckDB checkpoints when it closes, so the blocks
    of the table replaced are free for the next one (one connection for all five kept every old raw
    table's blocks until the end: the file grew by the whole raw layer, not by its largest table)."""
    import duckdb

    from m365_pipeline.duckdb_helpers import ensure_schema
    from m365_pipeline.raw_tables import RAW_TABLES

    tables = {table.name: table for table in RAW_TABLES}
    for name, (path, _) in staged.items():
        with duckdb.connect(str(database), config={"memory_limit": "1GB"}) as conn:
            ensure_schema(conn, "raw")
            conn.execute(tables[name].load_sql(), [collected, path])
        Path(path).unlink()
    return {name: rows for name, (_, rows) in staged.items()}


class Stopwatch:
    """Wall and CPU (this process, all threads: DuckDB's too) of every call of the wrapped functions."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.lock = threading.Lock()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
        return timed

    def wrap_finish(self, fn: Callable) -> Callable:
        """VersionWriter._finish_file (SHA-256 ETag and gzip twin, on the writer's threads): its thread CPU
        for the history files, counted as night recording (the changed users' parquet file gets none)."""
        def timed(writer: Any, entry: dict[str, Any]) -> Any:
            cpu = time.thread_time()
            try:
                return fn(writer, entry)
            finally:
                name = {"history": "finish_files", "billing": "billing_finish_files"}.get(
                    entry["path"].split("/", 1)[0])
                if name:
                    with self.lock:
                        self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - cpu
        return timed

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()


@dataclass
class Steps:
    """Per Dagster step: wall and CPU seconds, taken as the step events happen (in this process)."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    def total(self, keep: Callable[[str], bool], what: str = "cpu") -> float:
        return sum(v for k, v in getattr(self, what).items() if keep(k))


def is_transform(step: str) -> bool:
    """The bench's transform phase (bench/pipeline.py): core.* and marts.* assets and their checks."""
    return step.startswith(("core__", "marts__"))


def is_billing(work: str) -> bool:
    return work in (BILLING_WORK, "billing_finish_files")


def is_coverage(step: str) -> bool:
    return any(step.startswith(f"{schema}__{name}") for schema, name in COVERAGE_KEYS)


class Pipeline:
    """The real Definitions (assets, checks, resources) on one data directory, run in this process."""

    def __init__(self, data_dir: Path) -> None:
        os.environ.update(SOURCES_ENV)
        os.environ[DATA_DIR_VARIABLE] = str(data_dir)
        os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
        from dagster import AssetKey, AssetSelection, Definitions, define_asset_job, in_process_executor

        import m365_pipeline.assets.export as export
        from m365_pipeline.assets.billing import SEALED_SPEC
        from m365_pipeline.assets.nights import NIGHT_SPECS
        from m365_pipeline.definitions import defs
        from m365_pipeline.publishing import VersionWriter

        self.stopwatch = Stopwatch()
        for name in NIGHT_WORK:  # time the night recording where the export calls it; behaviour unchanged
            setattr(export, name, self.stopwatch.wrap(name, getattr(export, name)))
        export.seal_and_write = self.stopwatch.wrap(BILLING_WORK, export.seal_and_write)
        VersionWriter._finish_file = self.stopwatch.wrap_finish(VersionWriter._finish_file)
        real = defs()
        everything = AssetSelection.all() - AssetSelection.key_prefixes("raw")
        # core.* and marts.* as the transform phase, without the nights the export step records.
        transform = (AssetSelection.key_prefixes("core") | AssetSelection.key_prefixes("marts")) \
            - AssetSelection.assets(*[spec.key for spec in (*NIGHT_SPECS, SEALED_SPEC)])
        coverage = AssetSelection.assets(*[AssetKey(list(k)) for k in COVERAGE_KEYS])
        jobs = {"night": everything, "transform": transform, "transform_without_coverage": transform - coverage}
        self.defs = Definitions(
            assets=real.assets, asset_checks=real.asset_checks, resources=real.resources,
            jobs=[define_asset_job(name, selection=selection, executor_def=in_process_executor)
                  for name, selection in jobs.items()])

    def run(self, job_name: str) -> Steps:
        from dagster import DagsterEventType, DagsterInstance

        marks = (DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE)
        steps, started = Steps(), {}
        job = self.defs.resolve_job_def(job_name)
        with DagsterInstance.ephemeral() as instance:
            handle = instance.handle_new_event

            def on_event(event: Any, *args: Any, **kwargs: Any) -> Any:
                dagster_event = event.dagster_event
                if dagster_event is not None and event.step_key and dagster_event.event_type in marks:
                    now = (time.perf_counter(), time.process_time())
                    if dagster_event.event_type == DagsterEventType.STEP_START:
                        started[event.step_key] = now
                    else:
                        wall, cpu = started.pop(event.step_key)
                        steps.wall[event.step_key] = now[0] - wall
                        steps.cpu[event.step_key] = now[1] - cpu
                return handle(event, *args, **kwargs)

            instance.handle_new_event = on_event
            result = job.execute_in_process(instance=instance, raise_on_error=False, run_config={
                "loggers": {"console": {"config": {"log_level": "WARNING"}}}})
        if not result.success:
            failed = [e.step_key for e in result.all_events if e.is_step_failure]
            raise RuntimeError(f"{job_name} failed at {failed}")
        return steps


def file_size(database: Path) -> int:
    wal = database.with_name(database.name + ".wal")
    return database.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def used_bytes(database: Path) -> int:
    """The blocks DuckDB's tables use; the rest of the file is free blocks it reuses."""
    import duckdb

    with duckdb.connect(str(database), read_only=True) as conn:
        block_size, used = conn.execute("SELECT block_size, used_blocks FROM pragma_database_size()").fetchone()
    return block_size * used


def churn(database: Path, a: str, b: str) -> dict[str, Any]:
    import duckdb

    with duckdb.connect(str(database), read_only=True) as conn:
        kinds = dict(conn.execute("SELECT change, count(*) FROM marts.changes_between($1, $2) GROUP BY 1",
                                  [a, b]).fetchall())
        published = conn.execute("SELECT count(*) FROM marts.published_users_on($1)", [a]).fetchone()[0]
        history_rows = conn.execute("SELECT count(*) FROM marts.published_users_history").fetchone()[0]
    return {"kinds": kinds, "published": published, "history_rows": history_rows}


def sealed_months(database: Path) -> dict[str, str]:
    """{month: the night that sealed it} from marts.billing_sealed (rule 15)."""
    import duckdb

    with duckdb.connect(str(database), read_only=True) as conn:
        if not conn.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'marts' "
                            "AND table_name = 'billing_sealed'").fetchone()[0]:
            return {}
        return {str(m): str(n) for m, n in conn.execute(
            "SELECT DISTINCT month, sealed_by FROM marts.billing_sealed ORDER BY 1").fetchall()}


def billing_timings(children: Children, data_dir: Path, org: str, repeats: int) -> dict[str, Any]:
    """/api/m365/billing and /billing/items on a freshly started m365-serve: each request's first answer
    (cold: the first billing request is the server's first request) and the median of the repeats (warm)."""
    from urllib.parse import urlencode

    from m365_pipeline.server.app import API_PREFIX

    port = free_port()
    proc = children.start("m365-serve", [str(BIN / "m365-serve"), "--port", str(port), "--data-dir", str(data_dir),
                                         "--no-access-log"], stdout=subprocess_devnull(), stderr=subprocess_devnull())
    try:
        wait_for_port(port, proc)
        base = f"http://127.0.0.1:{port}{API_PREFIX}"
        queries = {"billing (the server's first request)": "billing", "billing csv": "billing?format=csv",
                   "billing?org": "billing?" + urlencode({"org": org}), "billing/items": "billing/items",
                   "billing/items csv": "billing/items?format=csv"}
        return {name: time_get(base + query, repeats) for name, query in queries.items()}
    finally:
        children.stop(proc)


def billing_cell(children: Children, data_dir: Path, org: str, log: Callable[[str], None], label: str
                 ) -> dict[str, Any]:
    """The billing endpoints timed on the cell's last version, with its billing files."""
    billing = {"org": org, "organizations": organizations(data_dir / DUCKDB_FILE),
               "serve": billing_timings(children, data_dir, org, repeats=7), **billing_files(data_dir),
               "load": loadavg()}
    for name, t in billing["serve"].items():
        log(f"{label} serve {name}: {t['status']}, {t['bytes']:,} bytes, cold {t['first_ms']:.0f} ms, "
            f"warm median {t['median_ms']:.1f} ms")
    return billing


def billing_files(data_dir: Path) -> dict[str, Any]:
    """The published version's billing files and their sizes, and the organizations they cover."""
    current = data_dir / "export" / "current"
    root = current.resolve() if current.exists() else data_dir / "export"
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("billing/**/*"))
             if p.is_file() and not p.name.endswith(".gz")}
    return {"root": str(root), "files": files}


def largest_org(database: Path) -> tuple[str, int]:
    import duckdb

    with duckdb.connect(str(database), read_only=True) as conn:
        return conn.execute("SELECT organization_name, count(*) FROM marts.published_users_history "
                            "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1").fetchone()


def organizations(database: Path) -> int:
    import duckdb

    with duckdb.connect(str(database), read_only=True) as conn:
        return conn.execute("SELECT count(DISTINCT organization_name) FROM marts.published_users_history"
                            ).fetchone()[0]


def night_date(night: int) -> str:
    return (BASE_DAY + timedelta(days=night)).date().isoformat()


def run_nights(work: Path, orgs: int, users_per_org: int, nights: int, churn_divisor: int,
               log: Callable[[str], None], on_night: Callable[[list[dict[str, Any]]], None] = lambda _: None
               ) -> tuple[Pipeline, list[dict[str, Any]]]:
    """Nights 0..nights-1 through the real pipeline on one data directory; per night what was measured
    (``on_night`` gets the list so far after each night)."""
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    database = data_dir / DUCKDB_FILE
    pipeline = Pipeline(data_dir)
    out = []

    def staged(pool: ProcessPoolExecutor, night: int) -> Future:
        config = SimulatorConfig(orgs=orgs, users_per_org=users_per_org, seed=SEED, night=night,
                                 churn_divisor=churn_divisor)
        return pool.submit(stage, config, work / "staging" / str(night))

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        upcoming = staged(pool, 0)
        for night in range(nights):
            started = time.perf_counter()
            files = upcoming.result()
            if night + 1 < nights:
                upcoming = staged(pool, night + 1)
            rows = land(files, database, BASE_DAY + timedelta(days=night))
            landed = time.perf_counter() - started
            out.append(measure_night(pipeline, database, data_dir, night, rows, landed, log))
            on_night(out)
    return pipeline, out


def measure_night(pipeline: Pipeline, database: Path, data_dir: Path, night: int, rows: dict[str, int],
                  landed: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the night through Dagster and take its measures (after landing it)."""
    pipeline.stopwatch.reset()
    steps = pipeline.run("night")
    record = {
        "night": night, "date": night_date(night), "landing_s": round(landed, 1), "raw_rows": rows,
        "transform_cpu_s": steps.total(is_transform), "transform_wall_s": steps.total(is_transform, "wall"),
        "coverage_cpu_s": steps.total(is_coverage), "coverage_wall_s": steps.total(is_coverage, "wall"),
        "night_work_cpu_s": sum(v for k, v in pipeline.stopwatch.cpu.items() if not is_billing(k)),
        "night_work_wall_s": sum(v for k, v in pipeline.stopwatch.wall.items() if not is_billing(k)),
        "night_work": {k: round(v, 3) for k, v in pipeline.stopwatch.cpu.items() if not is_billing(k)},
        # billing months (issue 23): seal_and_write and the ETags/gzip twins of its files
        "billing_cpu_s": sum(v for k, v in pipeline.stopwatch.cpu.items() if is_billing(k)),
        "billing_wall_s": pipeline.stopwatch.wall.get(BILLING_WORK, 0.0),
        "billing_work": {k: round(v, 3) for k, v in pipeline.stopwatch.cpu.items() if is_billing(k)},
        "sealed": sealed_months(database),
        "export_cpu_s": steps.cpu.get("dashboard_api", 0.0),
        "publish_cpu_s": steps.cpu.get("export__analytics_db", 0.0),
        "duckdb_bytes": file_size(database),
        "duckdb_used_bytes": used_bytes(database),
        "analytics_bytes": (data_dir / "analytics.duckdb").stat().st_size,
    }
    if night:
        record["churn"] = churn(database, night_date(night - 1), night_date(night))
    log(f"night {night} ({record['date']}): landed in {landed:.0f} s; transform {record['transform_cpu_s']:.2f} s "
        f"CPU (coverage {record['coverage_cpu_s']:.2f}), night recording {record['night_work_cpu_s']:.2f} s "
        f"CPU {record['night_work']}, billing {record['billing_cpu_s']:.2f} s CPU {record['sealed']}, "
        f"export {record['export_cpu_s']:.2f} s; DuckDB file "
        f"{record['duckdb_bytes'] / 2**20:.1f} MiB" + (f"; changes {record['churn']['kinds']} of "
                                                      f"{record['churn']['published']:,}" if night else ""))
    return record


def coverage_ab(pipeline: Pipeline, pairs: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The transform with and without the coverage assets on the same landed data, interleaved A/B/A/B."""
    with_cov, without = [], []
    for index in range(pairs):
        order = ("transform", "transform_without_coverage") if index % 2 == 0 else \
            ("transform_without_coverage", "transform")
        for job in order:
            steps = pipeline.run(job)
            entry = {"cpu": steps.total(is_transform), "wall": steps.total(is_transform, "wall"),
                     "coverage_cpu": steps.total(is_coverage), "coverage_wall": steps.total(is_coverage, "wall"),
                     "steps_cpu": {k: round(v, 3) for k, v in steps.cpu.items()}}
            (with_cov if job == "transform" else without).append(entry)
            log(f"coverage A/B {index + 1}/{pairs} {job}: {entry['cpu']:.2f} s CPU, {entry['wall']:.2f} s wall "
                f"(coverage steps {entry['coverage_cpu']:.2f} s CPU)")
    med = {name: {key: statistics.median(e[key] for e in runs) for key in runs[0] if key != "steps_cpu"}
           for name, runs in (("with", with_cov), ("without", without))}
    return {
        "pairs": pairs, "with": with_cov, "without": without, "median": med,
        # the honest figure: what adding coverage costs the transform, measured as a difference ...
        "added_cpu_share": med["with"]["cpu"] / med["without"]["cpu"] - 1,
        "added_wall_share": med["with"]["wall"] / med["without"]["wall"] - 1,
        # ... and the coverage steps' own time in the runs with them, against the transform without them
        "own_cpu_share": med["with"]["coverage_cpu"] / med["without"]["cpu"],
        "own_wall_share": med["with"]["coverage_wall"] / med["without"]["wall"],
    }


def time_get(url: str, repeats: int) -> dict[str, Any]:
    """GET url `repeats` times on fresh connections: status, body size, first and median latency in ms."""
    times, status, size = [], None, 0
    for _ in range(repeats):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
            status = response.status
        times.append((time.perf_counter() - started) * 1000)
        size = len(body)
    return {"status": status, "bytes": size, "first_ms": times[0], "median_ms": statistics.median(times),
            "max_ms": max(times), "repeats": repeats}


def serve_timings(children: Children, data_dir: Path, dates: list[str], org: str, repeats: int
                  ) -> dict[str, dict[str, Any]]:
    from urllib.parse import urlencode

    from m365_pipeline.server.app import API_PREFIX

    port = free_port()
    proc = children.start("m365-serve", [str(BIN / "m365-serve"), "--port", str(port), "--data-dir", str(data_dir),
                                         "--no-access-log"], stdout=subprocess_devnull(), stderr=subprocess_devnull())
    try:
        wait_for_port(port, proc)
        base = f"http://127.0.0.1:{port}{API_PREFIX}"
        # The server's first request loads the published version (its manifest); it is timed on its own.
        warm = {"summary (the server's first request)": time_get(base + "summary", 1)}
        queries = {
            "history": "history", "history?org": "history?" + urlencode({"org": org}),
            "history?org csv (made from its JSON file)": "history?" + urlencode({"org": org, "format": "csv"}),
            "history csv": "history?format=csv",
            "changes?since=first night": "changes?" + urlencode({"since": dates[0]}),
            "changes?since&org (first request queries the version's changed users)":
                "changes?" + urlencode({"since": dates[0], "org": org}),
            "changes?since csv": "changes?" + urlencode({"since": dates[0], "format": "csv"}),
        }
        return {**warm, **{name: time_get(base + query, repeats) for name, query in queries.items()}}
    finally:
        children.stop(proc)


def subprocess_devnull() -> int:
    import subprocess
    return subprocess.DEVNULL


def largest_changed_org(database: Path, a: str, b: str) -> str:
    import duckdb

    with duckdb.connect(str(database), read_only=True) as conn:
        return conn.execute("SELECT organization_name FROM marts.changes_between($1, $2) GROUP BY 1 "
                            "ORDER BY count(*) DESC, 1 LIMIT 1", [a, b]).fetchone()[0]


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


CELLS = ("100k", "1m")


def bench_nights(children: Children, work: Path, *, cells: tuple[str, ...] = CELLS, orgs: int = 400,
                 users_per_org: int = 250, nights: int = 31, churn_divisor: int = CHURN_DIVISOR, pairs: int = 3,
                 log: Callable[[str], None] = say, save: Callable[[dict[str, Any]], None] = lambda _: None
                 ) -> dict[str, Any]:
    """The 100k cell (nights, growth, night recording, coverage A/B) and the 1M cell (two nights, coverage
    A/B, the server). ``save`` gets the results after each cell."""
    results: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="minutes"),
                               "load_before": loadavg(), "churn_divisor": churn_divisor}
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    if "100k" in cells:
        results["100k"] = {"orgs": orgs, "users_per_org": users_per_org}

        def kept(per_night: list[dict[str, Any]]) -> None:
            results["100k"]["nights"] = per_night
            save(results)

        pipeline, _ = run_nights(work / "100k", orgs, users_per_org, nights, churn_divisor, log, kept)
        data_dir, database = work / "100k" / "data", work / "100k" / "data" / DUCKDB_FILE
        org, _ = largest_org(database)
        results["100k"]["billing"] = billing_cell(children, data_dir, org, log, "100k")
        save(results)
        results["100k"]["coverage"] = coverage_ab(pipeline, pairs, log)
        results["100k"]["load"] = loadavg()
        save(results)
    if "1m" in cells:
        pipeline, per_night = run_nights(work / "1m", 2000, 500, 2, churn_divisor, log)
        database = work / "1m" / "data" / DUCKDB_FILE
        dates = [n["date"] for n in per_night]
        org = largest_changed_org(database, dates[0], dates[1])
        results["1m"] = {"orgs": 2000, "users_per_org": 500, "nights": per_night, "serve_org": org,
                         "serve": serve_timings(children, work / "1m" / "data", dates, org, repeats=5)}
        for name, t in results["1m"]["serve"].items():
            log(f"1M serve {name}: {t['status']}, {t['bytes']:,} bytes, first {t['first_ms']:.0f} ms, "
                f"median {t['median_ms']:.0f} ms")
        save(results)
        results["1m"]["billing"] = billing_cell(children, work / "1m" / "data", org, log, "1M")
        save(results)
        results["1m"]["coverage"] = coverage_ab(pipeline, pairs, log)
        results["1m"]["load"] = loadavg()
        save(results)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_s"] = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    results["load_after"] = loadavg()
    results["finished"] = datetime.now(UTC).isoformat(timespec="minutes")
    save(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/nights.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated subset of: " + ", ".join(CELLS))
    parser.add_argument("--orgs", type=int, default=400, help="the 100k cell's organizations")
    parser.add_argument("--users-per-org", type=int, default=250)
    parser.add_argument("--nights", type=int, default=31, help="the 100k cell's nights (31 closes and seals January)")
    parser.add_argument("--churn-divisor", type=int, default=CHURN_DIVISOR)
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs of the coverage comparison")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here (after each cell)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    args = parser.parse_args(argv)
    cells = tuple(args.cells.split(","))
    if unknown := set(cells) - set(CELLS):
        parser.error(f"unknown cell(s): {', '.join(sorted(unknown))}")

    def save(results: dict[str, Any]) -> None:
        if args.output:
            args.output.write_text(json.dumps(results, indent=1, default=str))

    children = Children()
    with tempfile.TemporaryDirectory(prefix="m365-bench-nights-") as temporary:
        work = args.keep or temporary
        try:
            results = bench_nights(children, Path(work), cells=cells, orgs=args.orgs, users_per_org=args.users_per_org,
                                   nights=args.nights, churn_divisor=args.churn_divisor, pairs=args.pairs, save=save)
        finally:
            children.stop_all()
    print("\n".join(section(results)))
    return 0



def mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def pct(value: float) -> str:
    return f"{value * 100:.1f} %"


def yes(met: bool) -> str:
    return "**met**" if met else "**not met**"


def users(night: dict[str, Any]) -> str:
    return f"{night['raw_rows']['saas_users']:,}" if "raw_rows" in night else "~92,000"


def night_share(n: dict[str, Any]) -> float:
    """Keeping history's share: the night recording against the transform it adds to."""
    return n["night_work_cpu_s"] / n["transform_cpu_s"]


def section(results: dict[str, Any], command: str = "python bench/nights.py") -> list[str]:
    """The "Nights kept" and "Backup coverage" sections of bench/RESULTS.md."""
    head = (f"Taken from {results['started']} to {results.get('finished', '?')} UTC by `{command}`, load average "
            f"{results['load_before']} (1, 5, 15 min) at the start and {results.get('load_after', '?')} at the end "
            "on the 2 shared cores: CPU seconds (this process, DuckDB's threads included) are the figures; wall "
            "times moved with the other engineers' test suites.")
    lines = ["## Nights kept (`bench/nights.py`)", "", head, ""]
    cell = results.get("100k")
    if cell:
        per_night = cell["nights"]
        first, last = per_night[0], per_night[-1]
        growth = last["duckdb_bytes"] / first["duckdb_bytes"]
        changed = [sum(n["churn"]["kinds"].values()) / n["churn"]["published"] for n in per_night[1:]]
        shares = [night_share(n) for n in per_night]
        recorded = [n["night_work"].get("record_night", 0.0) / n["transform_cpu_s"] for n in per_night]
        lines += [
            f"{len(per_night)} nights at {cell['orgs']:,} organizations × {cell['users_per_org']} "
            f"({users(first)} source S users), seed {SEED}, simulator nights 0 to "
            f"{len(per_night) - 1} with the dataset's churn divided by {results['churn_divisor']}: "
            f"{pct(statistics.median(changed))} of the published users changed a night (median; "
            f"{pct(min(changed))}–{pct(max(changed))}, all rule-12 kinds, from `marts.changes_between`). "
            "Each night landed in-process through the product's staging files with its own collection date, then "
            "every asset but raw.* run by Dagster on the same data directory. *transform*: core.* and marts.* "
            "steps and their checks; *night recording*: record_night, the history files, the changed users' "
            "history file m365-serve answers `/changes` from (timed where the export step calls them) and the "
            "SHA-256 ETags and gzip twins of the history files (the publish's writer threads).",
            "",
            "| night | DuckDB file | × night 1 | analytics copy | history rows | changed | transform CPU "
            "| night recording CPU (record / history files / changed users file / ETags and gzip twins) | share |",
            "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        shown = sorted({0, 1, 2, 4, 9, 14, 19, 24, len(per_night) - 1} & set(range(len(per_night))))
        for i in shown:
            n = per_night[i]
            work = n["night_work"]
            lines.append(
                f"| {i + 1} | {mib(n['duckdb_bytes'])} | {n['duckdb_bytes'] / first['duckdb_bytes']:.2f}× "
                f"| {mib(n['analytics_bytes']) if 'analytics_bytes' in n else '–'} "
                f"| {n['churn'].get('history_rows', '–') if i else '–'} "
                f"| {sum(n['churn']['kinds'].values()) if i else '–'} | {n['transform_cpu_s']:.2f} s "
                f"| {n['night_work_cpu_s']:.2f} s ({work.get('record_night', 0):.2f} / "
                f"{work.get('write_history_files', 0):.2f} / {work.get('write_changed_users', 0):.2f} / "
                f"{work.get('finish_files', 0):.2f}) "
                f"| {pct(night_share(n))} |")
        lines += [
            "",
            f"- **File growth** (target ≤ 1.5×): the working DuckDB file is {mib(last['duckdb_bytes'])} after "
            f"{len(per_night)} nights against {mib(first['duckdb_bytes'])} after one: {growth:.2f}× — "
            f"{yes(growth <= 1.5)}.",
            f"- **Keeping history** (target ≤ 10 % of the nightly transform): night recording "
            f"{pct(statistics.median(shares))} of the transform's CPU (median over the nights; "
            f"{pct(min(shares))}–{pct(max(shares))}; night {len(per_night)}: {pct(shares[-1])}) — "
            f"{yes(max(shares) <= 0.10)}. Of it, the recording in DuckDB alone (`record_night`: rule 11's "
            f"tables): {pct(statistics.median(recorded))} "
            "(median); the rest is the files the API answers from.",
        ]
    if cell and "billing_cpu_s" in cell["nights"][0]:
        lines += ["", *billing_section(cell)]
    big = results.get("1m")
    if big and "serve" in big:
        lines += ["", f"**1M users: the API between two nights** ({big['orgs']:,} × {big['users_per_org']}, "
                  f"{big['nights'][0]['raw_rows']['saas_users']:,} source S users, simulator nights 0 and 1). "
                  f"The real `m365-serve` on a real socket answering from the published version; each request "
                  f"on a new connection, {big['serve']['history']['repeats']} times (*first*: the first time, "
                  "what a cold cache sees), after one summary request that loads the version. "
                  f"`org` = {big['serve_org']!r}, the organization with the most changes.", "",
                  "| request | status | body | first | median | max |", "|---|---:|---:|---:|---:|---:|"]
        for name, t in big["serve"].items():
            lines.append(f"| `{name}` | {t['status']} | {t['bytes'] / 1000:,.1f} KB | {t['first_ms']:.1f} ms "
                         f"| {t['median_ms']:.1f} ms | {t['max_ms']:.1f} ms |")
        changes = max(t["max_ms"] for name, t in big["serve"].items() if name.startswith("changes"))
        # the version's one-time load is the summary's (the server's first request), not history's
        history = max(t["max_ms"] for name, t in big["serve"].items() if name.startswith("history"))
        lines += ["", f"- `/api/m365/changes` under a second: slowest {changes:.0f} ms — {yes(changes < 1000)}; "
                  f"`/api/m365/history` under 50 ms: slowest {history:.1f} ms — {yes(history < 50)}."]
    if big and "billing" in big:
        lines += ["", "**1M users: billing** (the 1M cell's two nights, one open month).", "",
                  *billing_section(big)]
        cold = max(t["first_ms"] for t in big["billing"]["serve"].values())
        warm = max(t["median_ms"] for t in big["billing"]["serve"].values())
        lines += ["", f"- `/api/m365/billing` and `/billing/items` at 1M: warm under 50 ms (slowest median "
                  f"{warm:.1f} ms) — {yes(warm < 50)}; cold under 1 s (slowest {cold:.0f} ms) — {yes(cold < 1000)}."]
    lines += ["", "## Backup coverage (rule 13): its share of the nightly transform", "",
              "On the same landed raw data (the last night of each cell), the transform (core.* and marts.* steps "
              "and their checks) run by Dagster with and without the coverage assets and their three WARN "
              "checks, interleaved (with, without, without, with, ...), medians. **share**: in each run with "
              "coverage, the coverage steps' own CPU against the rest of that run's transform plus the night's "
              "recording in DuckDB (`record_night`, of the cell's last night): the nightly transform without "
              "coverage, measured in the same run. *A/B*: the difference of the medians (with − without) against "
              "the transform without coverage, CPU and wall; a cross-check only: the CPU of the same steps moved "
              "±15 % between runs on the loaded machine, as much as the difference itself.",
              "", "| scale | pairs | transform without coverage | with coverage | record_night | **share** (CPU) "
              "| A/B (CPU / wall) | met (≤ 10 %) |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    own_per_night = []
    for name in ("100k", "1m"):
        if name not in results:
            continue
        own_per_night += [f"{name}: {pct(statistics.median(coverage_own(n) for n in results[name]['nights']))}"]
        if "coverage" not in results[name]:
            continue
        c = results[name]["coverage"]
        med = c["median"]
        recording = results[name]["nights"][-1]["night_work"].get("record_night", 0.0)
        shares = [e["coverage_cpu"] / (e["cpu"] - e["coverage_cpu"] + recording) for e in c["with"]]
        share = statistics.median(shares)
        lines.append(
            f"| {name}: {results[name]['orgs']:,} × {results[name]['users_per_org']} | {c['pairs']} "
            f"| {med['without']['cpu']:.2f} s CPU ({med['without']['wall']:.2f} s wall) "
            f"| {med['with']['cpu']:.2f} s CPU ({med['with']['wall']:.2f} s wall) | {recording:.2f} s "
            f"| **{pct(share)}** ({pct(min(shares))}–{pct(max(shares))}) "
            f"| {pct(c['added_cpu_share'])} / {pct(c['added_wall_share'])} | {'yes' if share <= 0.10 else '**no**'} |")
    lines += ["", "In every night of the nights above, the coverage steps' own CPU against the rest of the transform "
              "plus `record_night` (median): " + "; ".join(own_per_night) + "."]
    return lines


def billing_section(cell: dict[str, Any]) -> list[str]:
    """Billing months (issue 23): seal_and_write's share of the transform, and the billing endpoints."""
    per_night = cell["nights"]
    shares = [n["billing_cpu_s"] / n["transform_cpu_s"] for n in per_night]
    seals = [i for i, n in enumerate(per_night) if n["sealed"] and (not i or n["sealed"] != per_night[i - 1]["sealed"])]
    seal = "; ".join(f"night {i + 1} ({per_night[i]['date']}) sealed {sorted(per_night[i]['sealed'])[-1]}: "
                     f"{pct(shares[i])}" for i in seals) or "no month sealed"
    lines = [f"**Billing months (issue 23)**: `seal_and_write` (the open month every night, sealing a closed one) "
             f"and its files' ETags/gzip twins, CPU against the transform: median {pct(statistics.median(shares))}, "
             f"max {pct(max(shares))}; {seal} — {yes(max(shares) <= 0.10)} (target ≤ 10 %)."]
    billing = cell.get("billing")
    if billing:
        lines += ["", f"m365-serve on the last night's version (load {billing['load']}), `org` = {billing['org']!r}; "
                  "cold = the first request after the server started, warm = median of the repeats.", "",
                  "| request | status | body | cold | warm (median) |", "|---|---:|---:|---:|---:|"]
        for name, t in billing["serve"].items():
            lines.append(f"| `{name}` | {t['status']} | {t['bytes']:,} B | {t['first_ms']:.1f} ms "
                         f"| {t['median_ms']:.1f} ms |")
    return lines


def coverage_own(n: dict[str, Any]) -> float:
    rest = n["transform_cpu_s"] - n["coverage_cpu_s"] + n["night_work"].get("record_night", 0.0)
    return n["coverage_cpu_s"] / rest


if __name__ == "__main__":
    sys.exit(main())
