"""The dashboard's nights features (docs/RULES.md, rules 11 and 12) in real headless Chromium against a
real m365-serve, on two nights the real pipeline published at their dates (libfaketime) from the
evolving simulator. Expected numbers come from the simulator's ground truth of each night."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig, ground_truth
from m365_pipeline.simulator.dataset import DEPARTURE_NIGHT

from .helpers import expected_changes, run_pipeline_at, spawn_serve
from .test_dashboard_page import CHROMIUM, browser, context, open_dashboard  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.skipif(shutil.which("faketime") is None, reason="needs libfaketime: sh scripts/system-packages.sh "
                       "faketime"),
]
NIGHTS = {"2026-03-01": 0, "2026-03-02": DEPARTURE_NIGHT}  # date -> simulator night


def config(night: int) -> SimulatorConfig:
    return SimulatorConfig(orgs=10, users_per_org=12, seed=7, night=night, faults=FaultConfig())


def users(night: int) -> dict[str, dict[str, Any]]:
    truth = ground_truth(config(night))
    return {u["user_principal_name"]: {**u, "organization_name": org}
            for org, rows in truth["users"].items() for u in rows}


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("dashboard-nights") / "data"
    for day, night in NIGHTS.items():
        with Simulator(config(night), host="127.0.0.1", port=0) as sim:
            assert run_pipeline_at(sim, data_dir, f"{day} 23:00:00"), day
    port = free_port()
    with (data_dir.parent / "serve.log").open("w") as log:
        proc = spawn_serve(data_dir, port, log)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_each_organization_shows_users_in_and_out_since_the_previous_night(context, two_nights):  # noqa: F811
    arrived, left = Counter(), Counter()
    for row in expected_changes(*(users(n) for n in NIGHTS.values())):
        if row["change"] in ("added", "moved"):
            arrived[row["organization_name"]] += 1
        if row["change"] == "removed":
            left[row["organization_name"]] += 1
        if row["change"] == "moved":
            left[row["previous_organization_name"]] += 1
    assert arrived and left and any(r["change"] == "moved" for r in expected_changes(
        *(users(n) for n in NIGHTS.values())))
    page, seen = open_dashboard(context, two_nights)
    expect(page.locator("#delta-heading")).to_be_visible()
    shown = dict(page.evaluate("""() => [...document.querySelectorAll('#org-rows tr')]
        .filter((tr) => tr.querySelector('button.org-link'))
        .map((tr) => [tr.querySelector('button.org-link').textContent, tr.querySelector('.col-delta').textContent])"""))
    tonight = [o["organization_name"] for o in ground_truth(config(DEPARTURE_NIGHT))["organizations"]]
    assert shown == {org: f"+{arrived[org]} / \u2212{left[org]}" for org in tonight}
    added = sum(r["change"] == "added" for r in expected_changes(*(users(n) for n in NIGHTS.values())))
    removed = sum(r["change"] == "removed" for r in expected_changes(*(users(n) for n in NIGHTS.values())))
    assert page.locator("#total-delta").text_content() == f"+{added} / \u2212{removed}"
    seen.assert_clean(page)
