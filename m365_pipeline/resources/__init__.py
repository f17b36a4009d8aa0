"""Vendor clients as Dagster resources: source S (SaaS management) and source B (backup reseller)."""

from m365_pipeline.resources.backup import BackupApiResource, BackupClient
from m365_pipeline.resources.saas import SaasApiResource, SaasClient

__all__ = ["BackupApiResource", "BackupClient", "SaasApiResource", "SaasClient"]
