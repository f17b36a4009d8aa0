"""Issue 23, outcome 6: a run that closes a billing month announces it once to the alert webhook (rule 15's
seal, the month's customers and totals on every basis), also when the night is re-run, and a webhook that
is down when the month closes gets the message from the next publishing run. A run that closes nothing
sends nothing. Real nights (the whole graph in a child process at each date), a real webhook receiver."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from m365_pipeline import alerts
from m365_pipeline.api_bodies import BILLING_BASES, BILLING_METRICS
from m365_pipeline.assets.billing import closed_month_alert
from m365_pipeline.processes import free_port
from m365_pipeline.settings import DUCKDB_FILE
from m365_pipeline.simulator import Simulator, SimulatorConfig

from .helpers import Receiver, query, run_pipeline_at

pytestmark = pytest.mark.slow


def night(data_dir: Path, number: int, moment: str) -> None:
    with Simulator(SimulatorConfig(orgs=4, users_per_org=6, seed=7, night=number), host="127.0.0.1", port=0) as sim:
        assert run_pipeline_at(sim, data_dir, moment), f"the night of {moment} failed"


def closed_months(hook: Receiver) -> list[str]:
    return [message["details"]["Month"] for message in hook.messages() if message["kind"] == "billing_closed"]


def test_a_closed_month_is_announced_exactly_once_and_a_month_closing_nothing_sends_nothing(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    hook = Receiver()
    monkeypatch.setenv(alerts.WEBHOOK_VARIABLE, hook.url)

    night(data_dir, 0, "2026-10-30 23:00:00")
    assert closed_months(hook) == []  # the first night closes nothing
    night(data_dir, 3, "2026-11-03 23:00:00")  # closes October
    assert closed_months(hook) == ["2026-10"]
    night(data_dir, 3, "2026-11-03 23:30:00")  # the same date re-run: October is sealed and announced already
    night(data_dir, 5, "2026-11-10 23:00:00")  # closes nothing
    assert closed_months(hook) == ["2026-10"]

    (message,) = hook.messages()
    sealed = query(data_dir / DUCKDB_FILE, """
        SELECT body FROM marts.billing_sealed WHERE month = '2026-10' AND part = 'report' AND fmt = 'json'""")
    report = json.loads(bytes(sealed[0][0]))
    details = message["details"]
    assert details["SHA-256 of the month's CSV"] == report["sha256"] and len(report["sha256"]) == 64
    assert details["Customers"] == str(report["totals"]["total_organizations"])
    for metric, label in zip(BILLING_METRICS, ("ES users", "M365-licensed users", "Backup seats"), strict=True):
        for basis in BILLING_BASES:
            assert f"{basis.replace('_', '-')} {report['totals'][f'total_{metric}_{basis}']}" in details[label]

    # November closes on a night whose webhook is down: that run still publishes, and the next one announces it.
    monkeypatch.setenv(alerts.WEBHOOK_VARIABLE, f"http://127.0.0.1:{free_port()}/hook")
    night(data_dir, 8, "2026-12-02 23:00:00")
    assert query(data_dir / DUCKDB_FILE, """
        SELECT count(*) FROM marts.billing_sealed WHERE month = '2026-11' AND announced_at IS NULL""")[0][0] > 0
    monkeypatch.setenv(alerts.WEBHOOK_VARIABLE, hook.url)
    night(data_dir, 8, "2026-12-02 23:30:00")
    night(data_dir, 9, "2026-12-03 23:00:00")
    assert closed_months(hook) == ["2026-10", "2026-11"]


@pytest.mark.parametrize("fmt", alerts.FORMATS)
def test_the_month_closed_message_carries_the_month_and_its_seal_in_every_format(fmt):
    report = {"nights": 3, "first_night": "2026-11-03", "last_night": "2026-11-28", "sha256": "ab" * 32,
              "totals": {"total_organizations": 7, **{f"total_{metric}_{basis}": 12.5 if basis == "average" else 12
                                                     for metric in BILLING_METRICS for basis in BILLING_BASES}}}
    text = json.dumps(alerts.payload(closed_month_alert("2026-11", json.dumps(report).encode(), "run-1", "job"), fmt))
    assert alerts.TITLES["billing_closed"] in text and "2026-11" in text and "ab" * 32 in text
    assert "average 12.5" in text and "seat-days 12" in text and re.search(r"Customers\W+(?:value\W+)?7\b", text)
