"""The README's commands are the tested ones: its analyst queries return rows on the demo's data,
`make run` runs the real nightly job, and the variables and packages it names are the code's."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from dataclasses import replace

import pytest
from dagster import DagsterInstance

from m365_pipeline.demo import PORT_DEFAULTS
from m365_pipeline.settings import ANALYTICS_FILE
from m365_pipeline.simulator import Simulator, SimulatorConfig

from .helpers import query, run_pipeline, run_pipeline_at
from .test_demo import REPO, demo_env, make

README = (REPO / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


@pytest.mark.slow
def test_the_readme_analyst_queries_return_rows_on_the_demo_data(tmp_path):
    # What `make demo` builds (m365-simulate's defaults), on two nights: yesterday's simulator night 0
    # at its date under libfaketime, then tonight's night 8, so the history and change queries have rows.
    demo = SimulatorConfig()
    yesterday = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).strftime("%Y-%m-%d 23:00:00")
    with Simulator(demo, host="127.0.0.1", port=0) as sim:
        assert run_pipeline_at(sim, tmp_path, yesterday)
    with Simulator(replace(demo, night=8), host="127.0.0.1", port=0) as sim:
        run_pipeline(sim, tmp_path)
    (sql,) = code_blocks("sql")
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    assert len(statements) >= 4
    for statement in statements:
        assert query(tmp_path / ANALYTICS_FILE, statement), f"no rows on the demo data:\n{statement}"


@pytest.mark.slow
def test_make_run_from_the_readme_runs_the_nightly_refresh_job_without_warnings(simulator, tmp_path):
    assert "make run\n" in "".join(code_blocks("sh"))
    env = demo_env(**simulator.env, M365_DATA_DIR=str(tmp_path / "data"), DAGSTER_HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    result = subprocess.run(make("run"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr
    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        (run,) = instance.get_runs()
    assert run.job_name == "nightly_refresh" and run.status.value == "SUCCESS"
    assert (tmp_path / "data" / ANALYTICS_FILE).is_file()


def test_the_readme_names_every_port_variable_with_its_default():
    for variable, default in PORT_DEFAULTS.items():
        assert re.search(rf"`{variable}` \([^)]*{default}\)", README), variable


def test_the_readme_says_which_debian_packages_make_test_installs():
    makefile = (REPO / "Makefile").read_text()
    (packages,) = re.findall(r"^test-system-packages:\n\t@sh scripts/system-packages.sh (.+)$", makefile, re.M)
    for package in packages.split():
        assert f"`{package}`" in README.split("## Where things live")[0], package
