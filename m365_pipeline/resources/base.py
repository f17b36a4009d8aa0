"""Settings every vendor resource shares: timeouts, retries, pool size, and how URL and tokens are bound."""

from __future__ import annotations

from typing import ClassVar, Self

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from m365_pipeline.resources.http import HttpSettings
from m365_pipeline.settings import env_value


class VendorApiResource(ConfigurableResource):
    """Connection behaviour common to both sources. Defaults suit the real vendors."""

    timeout_s: float = Field(default=30.0, gt=0, description="Per-call connect and read timeout, seconds.")
    max_retries: int = Field(
        default=5, ge=0, le=20,
        description="Retries per call on connection errors and 5xx (exponential backoff), and as many on 429 "
                    "(Retry-After honoured, pausing every call of the source).",
    )
    backoff_factor: float = Field(
        default=0.5, ge=0, description="Exponential backoff, seconds: retries wait 0, 2x, 4x, ... this, at most 30 s.")
    retry_after_max_s: int = Field(default=120, ge=0, description="Longest Retry-After we wait for.")
    concurrency: int = Field(
        default=256, ge=1, le=1024,
        description="Ceiling on calls in flight. Below it the client finds the vendor's pace by itself "
                    "(more while calls succeed and latency holds, fewer on 429 or rising latency).",
    )
    max_response_mib: int = Field(
        default=64, ge=1, le=4096,
        description="Largest vendor answer read, MiB, before or after decompression (rule 19): a larger one "
                    "fails its call, naming the source and the path.")
    max_pages: int = Field(
        default=100_000, ge=1,
        description="Most pages one paged list may take: a list that claims more (or more than its "
                    "total_items need), or whose next_page never ends, fails with a clear error.")
    base_url: str | None = Field(default=None, description="The source's base URL; unset skips the source.")

    # Set by each source: its short name, and each deployment field with the variable it comes from
    # (``base_url``'s switches the source on).
    source_label: ClassVar[str] = "vendor"
    env_fields: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_environment(cls) -> Self:
        """The resource as deployed: an EnvVar per variable that is set, so the UI shows names, not values."""
        return cls(**{name: EnvVar(variable) for name, variable in cls.env_fields.items() if env_value(variable)})

    @classmethod
    def base_url_variable(cls) -> str:
        return cls.env_fields["base_url"]

    def deployed(self, name: str) -> str | None:
        """A deployment field (URL, token): its configured value, else its environment variable.

        Run config that sets any field of a resource replaces the resource's whole configured
        default, leaving the fields it does not name empty; reading the variable here keeps a
        tuning change (``concurrency: 4``) from silently dropping the source.
        """
        value = getattr(self, name)
        return value if value and value.strip() else env_value(self.env_fields[name])

    @property
    def url(self) -> str | None:
        return self.deployed("base_url")

    @property
    def is_configured(self) -> bool:
        return self.url is not None

    @property
    def skip_reason(self) -> str | None:
        """Why the source is skipped this run, or None when it is configured."""
        return None if self.is_configured else f"{self.source_label} skipped: {self.base_url_variable()} is not set"

    def http_settings(self) -> HttpSettings:
        return HttpSettings(
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_factor=self.backoff_factor,
            retry_after_max_s=self.retry_after_max_s,
            pool_size=self.concurrency,
            max_response_bytes=self.max_response_mib * 1024 * 1024,
            max_pages=self.max_pages,
        )


def configured_sources(*sources: VendorApiResource) -> list[str]:
    """The base-URL variables of the sources configured for this run: how a night records its sources."""
    return [source.base_url_variable() for source in sources if source.is_configured]
