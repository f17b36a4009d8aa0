"""Running unattended: configuration cannot drop a source, a missing source holds publishing back,
one writer at a time. Each test drives the real ``dagster`` CLI or real processes against the simulator."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from m365_pipeline.publishing import CURRENT, export_dir
from m365_pipeline.simulator import Simulator, ground_truth

from .helpers import BIN, SOURCE_VARIABLES

pytestmark = pytest.mark.slow  # each starts the dagster CLI (a few seconds to load) and runs the whole job


def cli_env(tmp_path: Path, sim: Simulator | None, **extra: str) -> dict[str, str]:
    """The environment a service unit gives the CLI: the simulator's variables, a data dir, a DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in SOURCE_VARIABLES}
    return {**env, **(sim.env if sim else {}), "DAGSTER_HOME": str(home),
            "M365_DATA_DIR": str(tmp_path / "data"), **extra}


def materialize_all(env: dict[str, str], cwd: Path, config: dict[str, Any] | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """The README's CLI run, ``dagster asset materialize --select '*'``, as an operator types it."""
    args = [str(BIN / "dagster"), "asset", "materialize", "-m", "m365_pipeline.definitions", "--select", "*"]
    if config is not None:
        args += ["--config-json", json.dumps(config)]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def published_summary(data_dir: Path) -> dict[str, Any]:
    return json.loads((export_dir(data_dir) / CURRENT / "summary.json").read_bytes())


def test_run_config_tuning_one_setting_keeps_base_urls_and_tokens_bound_to_the_environment(
        start_simulator, tmp_path):
    sim = start_simulator(orgs=5, users_per_org=8, seed=3)
    proc = materialize_all(cli_env(tmp_path, sim), tmp_path,
                       {"resources": {"saas": {"config": {"concurrency": 4}},
                                      "backup": {"config": {"per_page": 7}}}})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "skipped" not in output, "a source was skipped although its variables are set"
    truth = ground_truth(sim.dataset)
    summary = published_summary(tmp_path / "data")
    assert summary["totals"] == truth["totals"]
    assert summary["organizations"] == truth["organizations"]
    assert sim.config.saas_token not in output and sim.config.admin_token not in output
