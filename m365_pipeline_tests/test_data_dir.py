"""Data-directory mistakes (issue "The first hour"): each is one line naming the variable or flag and
the path, at once, and nothing is created where it should not be. A first run says so in the run log."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from m365_pipeline.settings import DUCKDB_FILE, DataDirError, prepare_data_dir

from .helpers import BIN, all_definitions, make_resources
from .test_demo import demo_env, make


def as_read_only(path: Path, command: list[str]) -> list[str]:
    """``command`` seeing ``path`` read-only. Root writes through a chmod, so as root the command gets a
    private read-only bind mount (util-linux ``unshare``), visible to it alone."""
    path.chmod(0o555)
    if os.geteuid() != 0:
        return command
    return ["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(path), *command]


@pytest.mark.parametrize("case, fragment", [
    ("parent missing", "its parent {parent} does not exist"),
    ("a file", "is not a directory"),
])
def test_prepare_data_dir_refuses_with_one_line_naming_the_variable(tmp_path, case, fragment):
    path = tmp_path / "typo" / "data" if case == "parent missing" else tmp_path / "file"
    if case == "a file":
        path.write_text("")
    with pytest.raises(DataDirError) as error:
        prepare_data_dir(path)
    message = str(error.value)
    assert message.startswith(f"M365_DATA_DIR={path}") and "\n" not in message
    assert fragment.format(parent=path.parent) in message
    assert not (tmp_path / "typo").exists()


def test_prepare_data_dir_creates_only_the_last_component_and_reports_a_first_run(tmp_path):
    assert prepare_data_dir(tmp_path / "data") is True
    (tmp_path / "data" / DUCKDB_FILE).write_bytes(b"")
    assert prepare_data_dir(tmp_path / "data") is False


@pytest.mark.parametrize("case", ["parent missing", "a file", "read-only", "cannot be created"])
def test_make_demo_refuses_an_unusable_data_dir_within_a_second_naming_the_variable(tmp_path, case):
    command = make("demo")
    locked = tmp_path / "read-only"
    locked.mkdir()
    if case == "parent missing":
        data = tmp_path / "typo" / "data"
    elif case == "a file":
        data = tmp_path / "file"
        data.write_text("")
    else:
        data = locked / "data" if case == "cannot be created" else locked
        command = as_read_only(locked, command)
    started = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=demo_env(M365_DATA_DIR=str(data)), capture_output=True,
                            text=True, timeout=30)
    assert time.monotonic() - started < 5  # the Python start-up; the check itself is instant
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("[demo]")]
    assert f"M365_DATA_DIR={data}" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "typo").exists() and not (locked / "data").exists()
    assert "simulator" not in result.stdout  # nothing was started


@pytest.mark.parametrize("how", ["--data-dir", "M365_DATA_DIR"])
def test_m365_serve_refuses_a_data_dir_that_does_not_exist(tmp_path, unused_port, how):
    typo = tmp_path / "typo"
    args = [str(BIN / "m365-serve"), "--port", str(unused_port)]
    env = dict(os.environ)
    if how == "--data-dir":
        args += ["--data-dir", str(typo)]
    else:
        env["M365_DATA_DIR"] = str(typo)
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    expected = f"--data-dir {typo}" if how == "--data-dir" else f"M365_DATA_DIR={typo}"
    assert result.stderr.strip() == f"m365-serve: error: {expected} does not exist; point it at the directory " \
                                    "the pipeline publishes into"
    assert not typo.exists()


def _run_with_warehouse(simulator, data_dir: Path, instance: DagsterInstance | None = None):
    """The whole graph with the code location's resources, which check (and make) the data directory."""
    resources = make_resources(simulator, data_dir / DUCKDB_FILE)
    return materialize(all_definitions(), resources=resources, raise_on_error=False,
                       instance=instance or DagsterInstance.ephemeral())


def test_a_run_into_a_mistyped_data_dir_fails_at_its_start_naming_the_variable(simulator, tmp_path):
    typo = tmp_path / "typo" / "data"
    started = time.monotonic()
    result = _run_with_warehouse(simulator, typo)
    assert not result.success and time.monotonic() - started < 30
    errors = [error.to_string() for event in result.all_events
              if (error := getattr(event.event_specific_data, "error", None))]
    expected = f"M365_DATA_DIR={typo}: its parent {typo.parent} does not exist"
    assert any(expected in error for error in errors), errors
    assert not typo.parent.exists()
    assert not any(event.event_type_value == "STEP_START" for event in result.all_events)  # nothing pulled


def test_a_first_run_into_an_empty_data_dir_says_so_in_the_run_log(simulator, tmp_path):
    data = tmp_path / "data"
    instance = DagsterInstance.ephemeral()
    first = _run_with_warehouse(simulator, data, instance)
    second = _run_with_warehouse(simulator, data, instance)
    assert first.success and second.success

    def run_log(result) -> str:
        return "\n".join(entry.user_message for entry in instance.all_logs(result.run_id))

    assert f"first run into {data}" in run_log(first)
    assert "first run into" not in run_log(second)
