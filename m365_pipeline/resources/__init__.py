"""Dagster resources: the vendor clients for source S and source B, the DuckDB file, and the publish policy."""

from m365_pipeline.resources.backup import BackupApiResource, BackupClient
from m365_pipeline.resources.publish_policy import PublishPolicy
from m365_pipeline.resources.saas import SaasApiResource, SaasClient
from m365_pipeline.resources.warehouse import WarehouseResource

__all__ = ["BackupApiResource", "BackupClient", "PublishPolicy", "SaasApiResource", "SaasClient", "WarehouseResource"]
