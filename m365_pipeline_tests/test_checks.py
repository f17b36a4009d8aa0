"""Warning checks a human should see: license names never seen before."""

from __future__ import annotations

from datetime import UTC, datetime

from dagster import materialize

from m365_pipeline.assets.core import core_assets, core_checks

from .contract_fixtures import RawBuilder, contract_resources


def _night(path, when, *licenses):
    builder = RawBuilder(path, collected_at=when)
    builder.org("o1", "Acme").tenant("o1", "t1", "acme.com").account("o1", "t1", "ann@acme.com")
    builder.person("ann@acme.com", *licenses)
    builder.write()
    result = materialize([*core_assets, *core_checks], resources=contract_resources(path), raise_on_error=True)
    return next(e.event_specific_data for e in result.all_events
                if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.check_name ==
                "new_license_names")


def test_license_names_never_seen_before_are_reported_with_their_classification(tmp_path):
    path = tmp_path / "m365.duckdb"
    first = _night(path, datetime(2026, 11, 1, 23, tzinfo=UTC), "Microsoft 365 E3")
    assert first.passed  # the first night ever: everything is new, nothing to flag

    same = _night(path, datetime(2026, 11, 2, 23, tzinfo=UTC), "MICROSOFT 365 E3")
    assert same.passed  # the same name in another case is not new

    new = _night(path, datetime(2026, 11, 3, 23, tzinfo=UTC), "Microsoft 365 E3", "Microsoft 365 Copilot Chat")
    assert not new.passed and new.severity.value == "WARN"
    assert new.metadata["new_license_names"].value == 1
    assert "Microsoft 365 Copilot Chat" in new.metadata["names"].value
