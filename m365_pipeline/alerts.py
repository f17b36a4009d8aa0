"""Alerts: one JSON message to a webhook when a night fails, is held back, or never happens.

``M365_ALERT_WEBHOOK_URL`` switches them on; ``M365_ALERT_FORMAT`` (json, slack or teams) picks
the payload an incoming webhook of that kind accepts; ``M365_DAGSTER_UI_URL`` adds a link to the
run. The sensors that send them run in ``dagster-daemon`` (m365_pipeline/definitions.py). No
message carries a token: our own errors never include one, and every reason passes through
``m365_pipeline.scrub`` (rule 19), which removes any configured or learned token a vendor echoed.

Behind an egress proxy the webhook is reached through the one ``HTTPS_PROXY`` or ``HTTP_PROXY`` names (by the
webhook's scheme; lower-case names too) unless ``NO_PROXY`` covers its host, read as ``urllib.request`` and curl
read them. Credentials in the proxy's URL go to the proxy as ``Proxy-Authorization`` and never into a message;
no message names the webhook's URL either (a Slack or Teams webhook URL is itself a secret).
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote

import urllib3
from urllib3.util import make_headers, parse_url

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
    "billing_closed": "M365 pipeline: a billing month closed and was sealed",
}
_MAX_REASON = 1500


@dataclass(frozen=True)
class Alert:
    kind: str  # a key of TITLES
    reason: str
    job: str | None = None
    run_id: str | None = None
    step: str | None = None
    details: tuple[tuple[str, str], ...] = ()  # more (label, value) facts, ours (never vendor text)

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
    facts += alert.details
    if fmt == "json":
        message = {"source": "m365-pipeline", "kind": alert.kind, "title": TITLES[alert.kind], "job": alert.job,
                   "run_id": alert.run_id, "step": alert.step, "reason": reason, "link": alert.link}
        return {**message, "details": dict(alert.details)} if alert.details else message
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


def webhook_pool(url: str) -> tuple[urllib3.PoolManager, str | None]:
    """How to reach ``url``: through the proxy the environment names for its scheme, unless ``NO_PROXY``
    covers its host; also the variable that named the proxy (None when direct)."""
    target = parse_url(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(target.scheme or "http")
    if not proxy or urllib.request.proxy_bypass_environment(target.host or "", proxies):
        return urllib3.PoolManager(), None
    variable = f"{(target.scheme or 'http').upper()}_PROXY"
    parsed = parse_url(proxy if "://" in proxy else f"http://{proxy}")  # "host:port" means http, as for curl
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{variable} is not a proxy URL (http://host:port)")
    headers = make_headers(proxy_basic_auth=unquote(parsed.auth)) if parsed.auth else None
    return urllib3.ProxyManager(parsed._replace(auth=None).url, proxy_headers=headers), variable


class _HideWebhook(logging.Filter):
    """urllib3 logs each retry with the URL it retries; the webhook's is a secret of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        url = (env_value(WEBHOOK_VARIABLE) or "").strip()
        if url and isinstance(record.args, tuple):
            path = parse_url(url).request_uri
            record.args = tuple(f"[{WEBHOOK_VARIABLE}]" if isinstance(arg, str) and (arg == url or arg.endswith(path))
                                else arg for arg in record.args)
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_HideWebhook())


def _cause(exc: BaseException) -> str:
    """The innermost cause of a urllib3 error, one short line with no URL in it."""
    while isinstance(inner := getattr(exc, "reason", None) or getattr(exc, "original_error", None), BaseException):
        exc = inner
    text = re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S*", "[URL]", str(exc)).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def send(alert: Alert) -> bool:
    """POST the alert when a webhook is configured; False when none is. Raises when the webhook (or the proxy
    on the way) refuses it or cannot be reached, naming the variable to check and never a URL."""
    url = env_value(WEBHOOK_VARIABLE)
    if not url:
        return False
    body = json.dumps(payload(alert, alert_format())).encode()
    pool, proxy_variable = webhook_pool(url.strip())
    via = f" through the proxy {proxy_variable} names" if proxy_variable else ""
    try:
        with pool:
            response = pool.request("POST", url.strip(), body=body, headers={"Content-Type": "application/json"},
                                    timeout=urllib3.Timeout(10), retries=urllib3.Retry(3, backoff_factor=1))
    except urllib3.exceptions.HTTPError as exc:  # not chained: urllib3's text holds the webhook's URL
        raise RuntimeError(f"the alert webhook ({WEBHOOK_VARIABLE}) could not be reached{via}: "
                           f"{_cause(exc)}") from None
    if response.status == 407 and proxy_variable:
        raise RuntimeError(f"the proxy {proxy_variable} names refused the alert webhook's request (HTTP 407): "
                           "check the credentials in its URL")
    if not 200 <= response.status < 300:
        raise RuntimeError(f"the alert webhook ({WEBHOOK_VARIABLE}) answered HTTP {response.status}{via}")
    return True
