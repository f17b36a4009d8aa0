"""The code location: every asset, check, resource, job and schedule of m365-pipeline."""

from __future__ import annotations

from dagster import Definitions, in_process_executor
from dagster_duckdb import DuckDBResource

from m365_pipeline.assets.core import core_assets, core_checks
from m365_pipeline.assets.export import export_assets
from m365_pipeline.assets.marts import PublishPolicy, marts_assets, marts_checks
from m365_pipeline.assets.raw import raw_assets
from m365_pipeline.resources import BackupApiResource, SaasApiResource
from m365_pipeline.settings import DUCKDB_FILE, data_dir, load_env_file, optional_env

load_env_file()
DATA_DIR = data_dir()
DATA_DIR.mkdir(parents=True, exist_ok=True)

defs = Definitions(
    assets=[*raw_assets, *core_assets, *marts_assets, *export_assets],
    asset_checks=[*core_checks, *marts_checks],
    resources={
        "saas": SaasApiResource(
            base_url=optional_env("SAAS_API_BASE_URL"),
            token=optional_env("SAAS_API_TOKEN"),
        ),
        "backup": BackupApiResource(
            base_url=optional_env("BACKUP_API_BASE_URL"),
            reseller_token=optional_env("BACKUP_RESELLER_TOKEN"),
            admin_token=optional_env("BACKUP_ADMIN_TOKEN"),
        ),
        "duckdb": DuckDBResource(database=str(DATA_DIR / DUCKDB_FILE)),
        "publish_policy": PublishPolicy(),
    },
    # Steps take milliseconds; a process per step would cost ~2 s each (see issue 5).
    executor=in_process_executor,
)
