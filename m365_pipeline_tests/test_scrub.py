"""Rule 19's scrubbing (m365_pipeline/scrub.py): no configured token and no owner token learned during the
pull survives in text a vendor sent, in any form the scrubber names. Pure: environment variables only."""

from __future__ import annotations

import base64
import json
import secrets
from urllib.parse import quote, quote_plus

import pytest

from m365_pipeline.scrub import remember_secret, scrub, token_variables

# The token variables the README documents, listed here by hand: the scrubber derives them from the resources.
DOCUMENTED = ("SAAS_API_TOKEN", "BACKUP_RESELLER_TOKEN", "BACKUP_ADMIN_TOKEN")


@pytest.fixture(autouse=True)
def no_configured_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DOCUMENTED:
        monkeypatch.delenv(name, raising=False)


def _token(length: int = 24) -> str:
    return secrets.token_urlsafe(length)[:length]


def test_every_documented_token_variable_is_scrubbed_and_nothing_else() -> None:
    assert set(token_variables()) == set(DOCUMENTED)


# Each form a vendor's page may show the token in; ``t`` is the token.
FORMS = {
    "as sent": lambda t: f"authorization: Bearer {t}",
    "in JSON": lambda t: json.dumps({"request_headers": {"x-access-token": t}}),
    "percent-encoded": lambda t: f"GET /x?token={quote(t, safe='')}",
    "form-encoded": lambda t: f"token={quote_plus(t, safe='')}",
    "percent-encoded, lower-case hex": lambda t: quote(t, safe="").replace("%2F", "%2f").replace("%3D", "%3d"),
    "Basic, token as password": lambda t: "Authorization: Basic " + base64.b64encode(f"api:{t}".encode()).decode(),
    "Basic, one more letter of user": lambda t: "Basic " + base64.b64encode(f"user:{t}".encode()).decode(),
    "Basic, two more": lambda t: "Basic " + base64.b64encode(f"admin1:{t}".encode()).decode(),
    "base64 alone, URL-safe": lambda t: base64.urlsafe_b64encode(t.encode()).decode(),
    "twice on one line": lambda t: f"{t}{t} and {t}",
}
TOKENS = {
    "url-safe": "Tk-9_aZ3xQ7pLm2vB8cR0s",
    "with / + = and a quote": 'ab/cd+ef=gh"ij\\kl',
    "non-ASCII": "clé-sécrète-ünïcode",
    "short (7)": "s3cr3t7",
    "one letter": "q",
}


@pytest.mark.parametrize("variable", DOCUMENTED)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("token", TOKENS.values(), ids=TOKENS)
def test_a_configured_token_is_replaced_by_its_variable_name_in_every_form(monkeypatch, variable, form, token):
    monkeypatch.setenv(variable, token)
    text = FORMS[form](token)
    scrubbed = scrub(text)
    if form.startswith(("Basic", "base64")) and len(token.encode()) < 5:
        return  # documented: base64 forms are found for tokens of 5 bytes or more
    assert f"[{variable}]" in scrubbed
    for shown in {token, quote(token, safe=""), quote_plus(token, safe=""), json.dumps(token)[1:-1]}:
        assert shown not in scrubbed
    if form.startswith(("Basic", "base64")) and len(token.encode()) >= 5:  # shorter: no alignment-free core
        assert text.rsplit(" ", 1)[-1] not in scrubbed and scrubbed.endswith(f"[{variable}]")


@pytest.mark.parametrize("form", FORMS)
def test_an_owner_token_learned_during_the_pull_is_replaced_by_owner_token(form):
    token = _token()
    remember_secret(token)
    scrubbed = scrub(FORMS[form](token))
    assert "[owner token]" in scrubbed and token not in scrubbed


def test_a_remembered_secret_keeps_its_own_label():
    token = _token()
    remember_secret(token, label="BACKUP_ADMIN_TOKEN")
    assert scrub(f"x {token} y") == "x [BACKUP_ADMIN_TOKEN] y"


def test_a_token_with_blanks_around_it_is_scrubbed_as_set_and_as_used(monkeypatch):
    monkeypatch.setenv("SAAS_API_TOKEN", "  padded-token-1\n")
    assert scrub("Bearer padded-token-1, really") == "Bearer [SAAS_API_TOKEN], really"


def test_a_token_inside_another_is_replaced_whole_and_labels_are_never_scrubbed_again(monkeypatch):
    monkeypatch.setenv("BACKUP_RESELLER_TOKEN", "abcdefgh")
    monkeypatch.setenv("BACKUP_ADMIN_TOKEN", "abcdefgh-longer")
    assert scrub("abcdefgh-longer abcdefgh") == "[BACKUP_ADMIN_TOKEN] [BACKUP_RESELLER_TOKEN]"
    monkeypatch.setenv("SAAS_API_TOKEN", "API")  # a token that is part of a label
    assert scrub("API key API") == "[SAAS_API_TOKEN] key [SAAS_API_TOKEN]"


@pytest.mark.parametrize("text", ["", "GET /users failed: HTTP 503", "ünïcode ✓ and [brackets]", "x" * 5000])
def test_text_without_a_secret_is_unchanged(monkeypatch, text):
    monkeypatch.setenv("SAAS_API_TOKEN", "zz-not-in-the-text-zz")
    assert scrub(text) == text


def test_unset_and_blank_tokens_scrub_nothing(monkeypatch):
    monkeypatch.setenv("SAAS_API_TOKEN", "   ")
    remember_secret("")
    remember_secret("  ")
    assert scrub("a b  c") == "a b  c"


def test_scrubbing_twice_changes_nothing_more(monkeypatch):
    monkeypatch.setenv("BACKUP_RESELLER_TOKEN", "r3s3ll3r-token")
    once = scrub("Basic " + base64.b64encode(b"u:r3s3ll3r-token").decode() + " r3s3ll3r-token")
    assert scrub(once) == once and "r3s3ll3r-token" not in once
