"""The simulator alone: how many per-user subscription calls/s it answers, without the pipeline.

Two clients against the same running simulator, over distinct users (more of them than the simulator's
4096-record cache): wrk (1 thread, 16 connections) cycling through the users' subscription URLs, the
simulator's ceiling with a client that costs nothing; and the project's own client (bench/client_probe.py:
SaasClient on run_concurrently) at one or more concurrencies, with its calls/s and client CPU per call.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import BENCH, wrk


def probe_simulator(sim_env: dict[str, str], work: Path, quick: bool) -> dict[str, Any]:
    """Subscriptions calls/s of the simulator alone: wrk over distinct users, and the project's client."""
    results: dict[str, Any] = {}
    base = sim_env["SAAS_API_BASE_URL"]
    host = base.split("/api/")[0]
    prefix = "/api/" + base.split("/api/", 1)[1]
    conn = http.client.HTTPConnection(host.removeprefix("http://"), timeout=30)
    ids: list[str] = []
    for page in range(1, 4 if quick else 13):  # more users than the simulator's 4096-record cache
        conn.request("GET", f"{prefix}/users?page_size=1000&page_number={page}",
                     headers={"Authorization": f"Bearer {sim_env['SAAS_API_TOKEN']}"})
        items = json.loads(conn.getresponse().read())["items"]
        ids += [item["id"] for item in items]
        if not items:
            break
    conn.close()
    script = work / "subscriptions.lua"
    paths = ",".join(json.dumps(f"{prefix}/users/{i}/subscriptions?page_size=1000&page_number=1") for i in ids)
    script.write_text(f"paths = {{{paths}}}\ncounter = 0\n"
                      'wrk.headers["Authorization"] = "Bearer ' + sim_env["SAAS_API_TOKEN"] + '"\n'
                      "request = function()\n  counter = counter + 1\n"
                      '  return wrk.format("GET", paths[(counter % #paths) + 1])\nend\n')
    if shutil.which("wrk"):
        results["wrk"] = wrk(host, connections=16, duration_s=4 if quick else 10, script=script)
        results["wrk"]["distinct_users"] = len(ids)
    users = min(len(ids), 2000 if quick else 12000)
    results["client"] = []
    for concurrency in ((16,) if quick else (4, 16, 32)):
        out = subprocess.run([sys.executable, str(BENCH / "client_probe.py"), str(users), str(concurrency)],
                             env={**os.environ, **sim_env}, capture_output=True, text=True, timeout=300, check=True)
        results["client"].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results
