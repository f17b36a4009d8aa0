"""The publish policy: how much worse than the last good night a pull may look before it is held back."""

from dagster import ConfigurableResource
from pydantic import Field


class PublishPolicy(ConfigurableResource):
    """How much worse than the last good night a pull may look before it is held back.

    A real drop (a customer leaving) is published by re-running with a looser policy
    from the Dagster launchpad, e.g. ``max_drop_fraction: 1.0``; a source switched off on
    purpose, with ``allow_missing_sources: true``.
    """

    min_organizations: int = Field(default=1, ge=0, description="Fewer organizations than this is a broken pull.")
    max_drop_fraction: float = Field(
        default=0.5, ge=0, le=1,
        description="Largest tolerated fall in organizations or licensed users versus the last good night.",
    )
    allow_missing_sources: bool = Field(
        default=False,
        description="Publish although a source that contributed to the last published night is not configured "
                    "tonight (a source retired on purpose). Off: such a night is held back.",
    )
