"""Named places where the crash tests kill the pipeline with SIGKILL, to prove it recovers.

``M365_CRASH_AT=<name>`` makes the process kill itself when it reaches that point; nothing
else reads the variable, and unset (always, outside the test suite) it costs one lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("pull", "transform", "publish", "publish-swap", "analytics")


def crash_point(name: str) -> None:
    if os.environ.get("M365_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

