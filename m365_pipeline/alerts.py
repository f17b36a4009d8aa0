"""Alerts: one JSON message to a webhook when a night fails, is held back, or never happens.

``M365_ALERT_WEBHOOK_URL`` switches them on; ``M365_ALERT_FORMAT`` (json, slack or teams) picks
the payload an incoming webhook of that kind accepts; ``M365_DAGSTER_UI_URL`` adds a link to the
run. The sensors that send them run in ``dagster-daemon`` (m365_pipeline/definitions.py). No
message carries a token: our own errors never include one, and every reason passes through
``m365_pipeline.scrub`` (rule 19), which removes any configured or learned token a vendor echoed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import urllib3

from m365_pipeline.scrub import scrub
from m365_pipeline.settings import env_value

WEBHOOK_VARIABLE = "M365_ALERT_WEBHOOK_URL"
FORMAT_VARIABLE = "M365_ALERT_FORMAT"
UI_VARIABLE = "M365_DAGSTER_UI_URL"
FORMATS = ("json", "slack", "teams")
MISSED_AFTER_HOURS = 25
TITLES = {
    "failed": "M365 pipeline: the nightly run failed",
    "held_back": "M365 pipeline: tonight's numbers were held back by a blocking check",
    "missed": f"M365 pipeline: nothing published for more than {MISSED_AFTER_HOURS} hours",
}
_MAX_REASON = 1500


@dataclass(frozen=True)
class Alert:
    kind: str  # a key of TITLES
    reason: str
    job: str | None = None
    run_id: str | None = None
    step: str | None = None

    @property
    def link(self) -> str | None:
        base = env_value(UI_VARIABLE)
        return f"{base.strip().rstrip('/')}/runs/{self.run_id}" if base and self.run_id else None


def reason_text(text: str) -> str:
    """The reason as an alert shows it: scrubbed, then cut to a readable length (in that order, so a cut never
    leaves part of a token the scrubber could no longer recognise)."""
    text = scrub(text)
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + " ..."


def alert_format() -> str:
    fmt = (os.environ.get(FORMAT_VARIABLE, "").strip() or "json").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{FORMAT_VARIABLE}={fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def payload(alert: Alert, fmt: str) -> dict:
    """The message body: our JSON, a Slack incoming-webhook message, or a Teams adaptive card."""
    reason = reason_text(alert.reason)
    facts = [(label, value) for label, value in (("Job", alert.job), ("Run", alert.run_id),
                                                  ("Step", alert.step), ("Reason", reason)) if value]
    if fmt == "json":
        return {"source": "m365-pipeline", "kind": alert.kind, "title": TITLES[alert.kind], "job": alert.job,
                "run_id": alert.run_id, "step": alert.step, "reason": reason, "link": alert.link}
    if fmt == "slack":
        lines = [f"*{TITLES[alert.kind]}*", *(f"*{label}:* {value}" for label, value in facts)]
        if alert.link:
            lines.append(f"<{alert.link}|Open the run in Dagster>")
        return {"text": "\n".join(lines)}
    card: dict = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard", "version": "1.4",
        "body": [{"type": "TextBlock", "text": TITLES[alert.kind], "weight": "Bolder", "size": "Medium",
                  "wrap": True},
                 {"type": "FactSet", "facts": [{"title": label, "value": value} for label, value in facts]}],
    }
    if alert.link:
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open the run in Dagster", "url": alert.link}]
    return {"type": "message",
            "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content": card}]}


def send(alert: Alert) -> bool:
    """POST the alert when a webhook is configured; False when none is. Raises when the webhook refuses it."""
    url = env_value(WEBHOOK_VARIABLE)
    if not url:
        return False
    body = json.dumps(payload(alert, alert_format())).encode()
    response = urllib3.request("POST", url.strip(), body=body, headers={"Content-Type": "application/json"},
                               timeout=urllib3.Timeout(10), retries=urllib3.Retry(3, backoff_factor=1))
    if not 200 <= response.status < 300:
        raise RuntimeError(f"the alert webhook ({WEBHOOK_VARIABLE}) answered HTTP {response.status}")
    return True
