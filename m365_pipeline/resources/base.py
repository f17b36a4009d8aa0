"""Settings every vendor resource shares: timeouts, retries, pool size."""

from __future__ import annotations

from typing import ClassVar

from dagster import ConfigurableResource
from pydantic import Field

from m365_pipeline.resources.http import HttpSettings


class VendorApiResource(ConfigurableResource):
    """Connection behaviour common to both sources. Defaults suit the real vendors."""

    timeout_s: float = Field(default=30.0, gt=0, description="Per-call connect and read timeout, seconds.")
    max_retries: int = Field(
        default=5, ge=0, le=20,
        description="Retries per call on connection errors and 5xx (exponential backoff), and as many on 429 "
                    "(Retry-After honoured, pausing every call of the source).",
    )
    backoff_factor: float = Field(default=0.5, ge=0, description="urllib3 backoff factor, seconds.")
    retry_after_max_s: int = Field(default=120, ge=0, description="Longest Retry-After we wait for.")
    concurrency: int = Field(
        default=256, ge=1, le=1024,
        description="Ceiling on calls in flight. Below it the client finds the vendor's pace by itself "
                    "(more while calls succeed and latency holds, fewer on 429 or rising latency).",
    )
    base_url: str | None = Field(default=None, description="The source's base URL; unset skips the source.")

    # Set by each source: its short name and the variable that switches it on.
    source_label: ClassVar[str] = "vendor"
    base_url_variable: ClassVar[str] = ""

    @property
    def is_configured(self) -> bool:
        return bool(self.base_url and self.base_url.strip())

    @property
    def skip_reason(self) -> str | None:
        """Why the source is skipped this run, or None when it is configured."""
        return None if self.is_configured else f"{self.source_label} skipped: {self.base_url_variable} is not set"

    def http_settings(self) -> HttpSettings:
        return HttpSettings(
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_factor=self.backoff_factor,
            retry_after_max_s=self.retry_after_max_s,
            pool_size=self.concurrency,
        )
