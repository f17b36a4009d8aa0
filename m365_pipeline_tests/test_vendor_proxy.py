"""Vendor calls behind an egress proxy and a TLS-inspecting CA: a real forward proxy (Debian's tinyproxy).

Proves that HTTP_PROXY and HTTPS_PROXY carry the calls (absolute-form GETs, and CONNECT tunnels for an
https vendor), that NO_PROXY bypasses the proxy, that the proxy's credentials are sent and never shown, and
that a wrong proxy or CA bundle fails with a one-line message naming the variable to fix.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from m365_pipeline.assets.raw import raw_assets
from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.resources import SaasApiResource
from m365_pipeline.resources.http import VendorError, VendorUnreachableError

from . import test_transport
from .helpers import FAST_HTTP, make_certificate, make_resources
from .test_raw_assets import _assert_landed_exactly
from .test_transport import BODY, Client, answer, client, keep_answering

vendor = test_transport.vendor  # the scripted vendor fixture

pytestmark = pytest.mark.skipif(shutil.which("tinyproxy") is None,
                                reason="tinyproxy is not installed (make test-system-packages)")

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
USER, PASSWORD = "proxyuser", "proxy-pass-77x"


@dataclass
class Proxy:
    port: int
    log: Path

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines the proxy received (tinyproxy logs each one, headers never)."""
        return [line.split("): ", 1)[1] for line in self.log.read_text().splitlines() if "Request (file" in line]


@pytest.fixture
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tinyproxy(tmp_path: Path, no_proxy_variables: None) -> Iterator[Proxy]:
    port, log = free_port(), tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nLogLevel Connect\n"
                    f"LogFile \"{log}\"\nBasicAuth {USER} {PASSWORD}\n")
    process = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield Proxy(port, log)
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def tls_vendor(vendor, tmp_path, monkeypatch):
    """An https vendor whose certificate M365_CA_BUNDLE names (as a TLS-inspecting proxy's CA would be)."""
    cert, key = make_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("M365_CA_BUNDLE", str(cert))
    return vendor(keep_answering(answer()), tls=context)


def _failure_text(result) -> str:
    return "\n".join(event.event_specific_data.error.to_string() for event in result.all_events
                     if event.event_type_value == "STEP_FAILURE")


def test_an_http_vendor_is_pulled_through_http_proxy_with_its_credentials_never_shown(
        tinyproxy, start_simulator, db_path, monkeypatch):
    sim = start_simulator(orgs=3, users_per_org=4)
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url(f"{USER}:{PASSWORD}@"))
    instance = DagsterInstance.ephemeral()
    result = materialize(raw_assets, instance=instance, resources=make_resources(sim, db_path))
    assert result.success
    _assert_landed_exactly(sim, db_path)
    seen = tinyproxy.requests()
    assert any(line.startswith(f"GET {sim.saas_base_url}/users?") for line in seen), seen[:5]
    assert any(line.startswith(f"GET {sim.backup_base_url}/users/") for line in seen), seen[:5]
    assert len(seen) == sim.stats()["requests_total"]  # every vendor call went through the proxy
    logs = "\n".join(entry.user_message for entry in instance.all_logs(result.run_id))
    assert PASSWORD not in logs


def test_an_https_vendor_is_called_through_https_proxy_in_a_connect_tunnel(tinyproxy, tls_vendor, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url(f"{USER}:{PASSWORD}@"))
    with client(tls_vendor.url.replace("127.0.0.1", "localhost")) as c:
        assert c.get_json("/users") == BODY
        assert c.get_json("/users") == BODY
    port = tls_vendor.url.split(":")[2].split("/")[0]
    assert tinyproxy.requests() == [f"CONNECT localhost:{port} HTTP/1.1"]  # one tunnel, kept alive
    assert len(tls_vendor.requests) == 2 and tls_vendor.connections == 1


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
def test_no_proxy_bypasses_the_proxy(tinyproxy, vendor, monkeypatch, no_proxy):
    served = vendor(keep_answering(answer()))
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url(f"{USER}:{PASSWORD}@"))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    with client(served.url) as c:
        assert c.get_json("/users") == BODY
    assert tinyproxy.requests() == [] and len(served.requests) == 1


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_a_wrong_proxy_fails_the_night_with_a_message_naming_the_variable(start_simulator, db_path, monkeypatch,
                                                                          no_proxy_variables, variable):
    sim = start_simulator(orgs=2, users_per_org=3)
    monkeypatch.setenv(variable, f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}")  # nothing listens there
    result = materialize(raw_assets, resources=make_resources(sim, db_path, saas={"max_retries": 1},
                                                              backup={"max_retries": 1}), raise_on_error=False)
    assert not result.success
    failure = _failure_text(result)
    assert f"check {variable}" in failure and "cannot reach the proxy" in failure and "Connection refused" in failure
    assert PASSWORD not in failure and sim.stats()["requests_total"] == 0


def test_proxy_credentials_the_proxy_refuses_fail_naming_the_variable_never_showing_them(tinyproxy, tls_vendor,
                                                                                        monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url(f"{USER}:wrong-{PASSWORD}@"))
    with client(tls_vendor.url.replace("127.0.0.1", "localhost")) as c, \
            pytest.raises(VendorUnreachableError) as failure:
        c.get_json("/users")
    message = str(failure.value)
    # tinyproxy answers a CONNECT it will not authorise with 401 (407 for a plain GET)
    assert "refused to carry" in message and "HTTP 401" in message and "check HTTPS_PROXY" in message
    assert PASSWORD not in message
    assert not tls_vendor.requests


@pytest.mark.parametrize("value", ["127.0.0.1:3128", "https://127.0.0.1:3128", "socks5://127.0.0.1:1080"])
def test_a_proxy_variable_that_is_not_an_http_url_is_named(no_proxy_variables, monkeypatch, value):
    monkeypatch.setenv("HTTPS_PROXY", value)
    with pytest.raises(VendorError, match=r"^HTTPS_PROXY must be an http:// proxy URL"):
        SaasApiResource(base_url="https://vendor.invalid/api", token="t0ken", **FAST_HTTP).client()


def test_an_https_vendor_is_trusted_through_the_ca_bundle_named_by_m365_ca_bundle(tls_vendor, monkeypatch,
                                                                               no_proxy_variables):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system store alone would refuse the certificate
    with client(tls_vendor.url) as c:
        assert c.get_json("/users") == BODY
    monkeypatch.delenv("M365_CA_BUNDLE")
    with client(tls_vendor.url, max_retries=0) as c, pytest.raises(VendorUnreachableError,
                                                                    match="certificate verify failed"):
        c.get_json("/users")


@pytest.mark.parametrize("variable", ["M365_CA_BUNDLE", "SSL_CERT_FILE"])
def test_a_ca_bundle_variable_naming_a_missing_file_is_one_line_naming_it(monkeypatch, tmp_path, variable):
    missing = tmp_path / "no-such-bundle.pem"
    monkeypatch.setenv(variable, str(missing))
    with pytest.raises(VendorError) as failure:
        SaasApiResource(base_url="https://vendor.invalid/api", token="t0ken", **FAST_HTTP).client()
    message = str(failure.value)
    assert message.startswith(f"{variable}={missing} is not a file") and "\n" not in message


def test_a_ca_bundle_that_is_not_pem_is_named(monkeypatch, tmp_path):
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("not a certificate\n")
    monkeypatch.setenv("M365_CA_BUNDLE", str(bundle))
    with pytest.raises(VendorError, match=r"^M365_CA_BUNDLE=.* is not a PEM CA bundle"):
        Client(SaasApiResource(base_url="https://vendor.invalid/api", token="t0ken", **FAST_HTTP).client())
