"""The HTTP side of the simulator: both vendor APIs on one loopback port.

A lean ``asyncio.Protocol`` on a uvloop event loop in a background thread serves them (HTTP/1.1 keep-alive,
backlog 256, idle connections closed after 120 s; a delayed answer waits on the loop, not in a thread of its
own). Requests are parsed by httptools (llhttp, the C parser Node.js and uvicorn use); this module only
writes the answers: a status line, ``Content-Type``, ``Content-Length``, ``Retry-After``/``Allow`` where due
and ``Connection``. A connection's requests are answered one at a time, in order (pipelining is safe), and
a request the parser rejects gets a 400 and the connection closed. It serves

* source S under ``/api/saas/consolidated-view/v1`` (``Authorization: Bearer``), paged by
  ``page_size``/``page_number`` as docs/RULES.md, Source S, describes;
* source B under ``/api`` (``X-Reseller-Token`` + ``X-Access-Token``), paged by ``page``/``per_page``
  with ``next_page``/``prev_page`` links as docs/RULES.md, Source B, describes, including its quirks (201 on
  ``GET /users/{id}``, ``per_page: 0`` past the end, 401 for a tenant/type mismatch).

Faults from ``FaultConfig`` are applied around the real answer (see ``faults.py``), the hostile ones (an
oversized answer, a gzip bomb, lying page counts, an error page echoing the request's headers) to what the
endpoint answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import json
import logging
import math
import re
import secrets
import socket
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httptools
import msgspec
import uvloop

from m365_pipeline.simulator.dataset import Dataset, Owner, SimulatorConfig
from m365_pipeline.simulator.faults import CLAIMED_TOTAL_PAGES, Counters, FaultInjector, Plan, stable_hash

SAAS_PREFIX = "/api/saas/consolidated-view/v1"
BACKUP_PREFIX = "/api"
SAAS_MAX_PAGE_SIZE = 1000
BACKUP_MAX_PER_PAGE = 100
KEEPALIVE_S = 120.0  # an idle keep-alive connection is closed after this long
BACKLOG = 256
MIB = 1024 * 1024

_B_UNAUTHORIZED = {"errors": {"user": ["You are not authorized to perform this action"]}}
_B_BAD_CREDENTIALS = {"errors": {"user": ["Sorry, your credentials is not valid"]}}
_B_BAD_TYPE = {"errors": {"type": ["Invalid type. Please try again."]}}
_B_BAD_PER_PAGE = {"errors": {"type": ["Invalid per_page number. Please try again."]}}
_B_SERVER_ERROR = {"status": 500, "error": "Internal Server Error"}  # the documented answer to a bad page
_TENANT_TYPES = ("m365", "gws")

# (source, endpoint kind, path pattern); the kind names the counters in Simulator.stats(). The patterns
# exclude each other; subscriptions, nearly every call of a pull, is tried first.
_ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    ("saas", "saas_subscriptions", re.compile(re.escape(SAAS_PREFIX) + r"/users/([^/]+)/subscriptions")),
    ("saas", "saas_users", re.compile(re.escape(SAAS_PREFIX) + r"/users")),
    ("backup", "backup_owners", re.compile(r"/api/users")),
    ("backup", "backup_owner", re.compile(r"/api/users/([^/]+)")),
    ("backup", "backup_tenants", re.compile(r"/api/users/([^/]+)/tenants")),
    ("backup", "backup_accounts", re.compile(r"/api/users/([^/]+)/tenants/([^/]+)/accounts")),
]
# Which record field ``missing_field_match`` removes, per endpoint kind.
_KEY_FIELDS = {"saas_users": ("items", "id"), "saas_subscriptions": ("items", "id"),
               "backup_tenants": ("data", "domain"), "backup_accounts": ("data", "upn")}
_JSON = "application/json; charset=utf-8"

Response = tuple[int, Any]
Query = dict[str, list[str]]
# An answer as the connection writes it: status, body, Content-Type, extra headers. A body may be a list of
# chunks (an oversized answer: the JSON, then a big padding shared by every such answer), written unjoined.
Answer = tuple[int, bytes | list[bytes], str, list[tuple[str, str]]]

log = logging.getLogger(__name__)


class _Request:
    """What an endpoint sees of one request: ``headers`` has lower-case names (the first of repeated ones)."""

    __slots__ = ("method", "target", "headers", "transport", "keep_alive", "http10")

    def __init__(self, method: str, target: str, headers: dict[str, str], transport: asyncio.Transport,
                 keep_alive: bool, http10: bool) -> None:
        self.method, self.target, self.headers, self.transport = method, target, headers, transport
        self.keep_alive, self.http10 = keep_alive, http10


class _Reject(Exception):
    """An error answer, raised from deep inside an endpoint (auth, validation, lookups)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status, self.body = status, body


class _App:
    """Routing, authentication, paging and faults; one instance per Simulator."""

    def __init__(self, config: SimulatorConfig, dataset: Dataset, counters: Counters) -> None:
        self.config = config
        self.dataset = dataset
        self.counters = counters
        self.faults = FaultInjector(config.faults, config.seed, counters)
        self._delete_lock = threading.Lock()
        self.deleted_users: list[str] = []
        self._user_pages_built: set[int] = set()  # source S /users page numbers, for delete_saas_user
        self.deleted_accounts: list[str] = []
        self._endpoints: dict[str, Callable[..., Response]] = {
            kind: getattr(self, f"_{kind}") for kind in [*(kind for _, kind, _ in _ROUTES), "unknown"]}
        if config.faults.gzip_bomb_match:  # seconds of zlib for 1 GiB: at start, never on the serving loop
            _deflated_spaces(config.faults.gzip_bomb_mib)

    def handle(self, request: _Request) -> Answer | Coroutine[Any, Any, Answer | None] | None:
        """Every request: faults first (see ``faults.py``), then the endpoint's answer. A delayed answer is a
        coroutine for the loop to run; None means the connection was reset and nothing is sent."""
        if request.method != "GET":
            refused = self.send(405, _encode({"error": "Method not allowed"}), headers=[("Allow", "GET")])
            return self._echo(request, _route(_split(request.target)[0])[0], refused)
        target = request.target  # as sent, query included: what the fault plan matches
        path, query = _split(target)
        source, kind, args = _route(path)
        self.counters.add("requests", kind)
        plan = self.faults.plan(source, target)
        self.faults.throttle(plan, source, _api_token(request, source))
        if plan.delay_s:
            return self._delayed(request, plan, source, kind, query, args)
        return self._answer(request, plan, source, kind, query, args)

    async def _delayed(self, request: _Request, plan: Plan, source: str | None, kind: str, query: str,
                       args: tuple[str, ...]) -> Answer | None:
        await asyncio.sleep(plan.delay_s)
        return self._answer(request, plan, source, kind, query, args)

    def _answer(self, request: _Request, plan: Plan, source: str | None, kind: str, query: str,
                args: tuple[str, ...]) -> Answer | None:
        if plan.reset:
            _reset(request)
            return None
        if plan.status is not None:
            return self._echo(request, source, self._send_fault(source, plan))
        try:
            parsed = _parse_query(query)
            status, decoded = self._endpoints[kind](request, parsed, *args)
            if plan.hostile and 200 <= status < 300:
                self._lie(plan, source, request.target, parsed, decoded)
            body = _encode(decoded)
            if plan.missing_field or plan.malformed:
                body = self._damage(kind, request.target, plan, body)
        except _Reject as reject:
            return self._echo(request, source, self.send(reject.status, _encode(reject.body)))
        if plan.hostile and 200 <= status < 300:
            return self._bloat(plan, self.send(status, body))
        return self.send(status, body)

    def send(self, status: int, body: bytes, content_type: str = _JSON,
             headers: list[tuple[str, str]] | None = None) -> Answer:
        self.counters.add("responses", str(status))
        return status, body, content_type, headers or []

    def _send_fault(self, source: str | None, plan: Plan) -> Answer:
        assert plan.status is not None
        if plan.status == 502:  # what a proxy in front of the vendor says: HTML, not JSON
            return self.send(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
        headers = [("Retry-After", str(plan.retry_after))] if plan.retry_after is not None else []
        message = {429: "Too Many Requests", 503: "Service Unavailable"}.get(plan.status, "Internal Server Error")
        body = {"status": plan.status, "error": message} if source == "backup" else \
            {"code": plan.status, "message": message}
        return self.send(plan.status, _encode(body), headers=headers)

    def _echo(self, request: _Request, source: str | None, answer: Answer) -> Answer:
        """``echo_headers_on_error``: an error answer as a vendor's debug page shows it, every request header
        (tokens included) in the body and the request's token in ``X-Debug-Request-Token``."""
        status, body, content_type, headers = answer
        if not self.config.faults.echo_headers_on_error or status < 400:
            return answer
        assert isinstance(body, bytes)
        if content_type is _JSON and isinstance(decoded := json.loads(body), dict):
            body = _encode({**decoded, "request_headers": request.headers})
        else:  # the HTML of the 502
            shown = "".join(f"{name}: {value}\n" for name, value in request.headers.items())
            body = body.replace(b"</body>", f"<pre>{html.escape(shown)}</pre></body>".encode())
        token = _api_token(request, source, own=True)
        if token:
            headers = [*headers, ("X-Debug-Request-Token", token.removeprefix("Bearer "))]
        self.faults.record("echo_headers")
        return status, body, content_type, headers

    def _lie(self, plan: Plan, source: str | None, target: str, query: Query, body: Any) -> None:
        """``claim_pages_match`` and ``endless_next_match``: the page's own paging fields lie."""
        pagination = body.get("pagination") if isinstance(body, dict) else None
        if pagination is None:
            return
        if "claim_pages_match" in plan.hostile and source == "saas":
            pagination["total_pages"] = CLAIMED_TOTAL_PAGES
            self.faults.record("claim_pages")
        if "endless_next_match" in plan.hostile and source == "backup":
            following = pagination["current_page"] + 1
            params = {name: values[0] for name, values in query.items()}
            params["page"] = str(following)
            pagination.update(next_page=following, next_url=f"{_split(target)[0]}?{urlencode(params)}")
            self.faults.record("endless_next")

    def _bloat(self, plan: Plan, answer: Answer) -> Answer:
        """``gzip_bomb_match`` (which wins when both match) and ``oversize_match``: the same JSON, far bigger."""
        status, body, content_type, headers = answer
        assert isinstance(body, bytes)
        faults = self.config.faults
        if "gzip_bomb_match" in plan.hostile:
            self.faults.record("gzip_bomb")
            return status, gzip_bomb(body, faults.gzip_bomb_mib), content_type, [("Content-Encoding", "gzip")]
        if "oversize_match" in plan.hostile:
            self.faults.record("oversize")
            return status, [body, _spaces(faults.oversize_mib)], content_type, headers
        return answer

    def _damage(self, kind: str, target: str, plan: Plan, body: bytes) -> bytes:
        """Apply the permanent response faults to a successful answer."""
        if plan.missing_field and kind in _KEY_FIELDS:
            container, field = _KEY_FIELDS[kind]
            decoded = json.loads(body)
            records = decoded[container]
            if records:
                del records[stable_hash(self.config.seed, "missing", target) % len(records)][field]
                self.faults.record("missing_field")
                body = _encode(decoded)
        if plan.malformed:
            self.faults.record("malformed")
            body = body[: len(body) // 2]
        return body

    # -- source S -------------------------------------------------------------------------------------
    def _saas_auth(self, handler: _Request) -> None:
        if not _same(handler.headers.get("authorization"), f"Bearer {self.config.saas_token}"):
            raise _Reject(401, {"code": 401, "message": "Unauthorized: missing or invalid bearer token"})

    @staticmethod
    def _saas_page(query: Query, total: int, fetch: Callable[[int, int], list[Any]]) -> Response:
        size, number = _int_param(query, "page_size", 100), _int_param(query, "page_number", 1)
        if size is None or not 1 <= size <= SAAS_MAX_PAGE_SIZE:
            raise _Reject(400, {"code": 400, "message": f"page_size must be an integer from 1 to {SAAS_MAX_PAGE_SIZE}"})
        if number is None or number < 1:
            raise _Reject(400, {"code": 400, "message": "page_number must be a positive integer"})
        start = (number - 1) * size
        return 200, {"pagination": {"page_size": size, "page_number": number,
                                    "total_pages": math.ceil(total / size), "total_items": total},
                     "items": fetch(start, start + size) if start < total else []}

    def _saas_users(self, handler: _Request, query: Query) -> Response:
        self._saas_auth(handler)
        status, body = self._saas_page(query, self.dataset.saas_user_count, self.dataset.saas_user_page)
        self._maybe_delete_user(body["pagination"])
        return status, body

    def _maybe_delete_user(self, pagination: dict[str, Any]) -> None:
        """The ``delete_saas_user`` fault: once, delete the list's first user after page 1 was built
        (``after_first_page``), or after every page of the list was (``after_last_page``: clients may ask
        for pages out of order, so the last page number alone does not mean the list was read)."""
        moment = self.config.faults.delete_saas_user
        if not moment:
            return
        with self._delete_lock:
            self._user_pages_built.add(pagination["page_number"])
            read = (1 in self._user_pages_built if moment == "after_first_page" else
                    self._user_pages_built.issuperset(range(1, pagination["total_pages"] + 1)))
            if read and not self.deleted_users:
                self.deleted_users.append(self.dataset.delete_saas_user(0))
                self.faults.record("delete_saas_user")

    def _saas_subscriptions(self, handler: _Request, query: Query, user_id: str) -> Response:
        self._saas_auth(handler)
        subs = self.dataset.subscription_records(user_id)
        if subs is None:
            raise _Reject(404, {"code": 404, "message": f"User {user_id} not found"})
        return self._saas_page(query, len(subs), lambda start, stop: subs[start:stop])

    # -- source B -------------------------------------------------------------------------------------
    def _backup_auth(self, handler: _Request, access_token: str | None) -> None:
        headers = handler.headers
        if not (_same(headers.get("x-reseller-token"), self.config.reseller_token)
                and access_token is not None and _same(headers.get("x-access-token"), access_token)):
            raise _Reject(401, _B_UNAUTHORIZED)

    def _owner(self, handler: _Request, owner_id: str, moment: str) -> Owner:
        """The owner whose own token authenticates this request (an unknown owner is a 401 too, a deleted one 404)."""
        self._maybe_delete_owner(owner_id, moment)
        if owner_id in self.dataset.deleted_owners:
            raise _Reject(404, {"errors": {"user": ["Record not found"]}})
        owner = self.dataset.owner(owner_id)
        self._backup_auth(handler, owner.token if owner else None)
        assert owner is not None
        return owner

    def _backup_owners(self, handler: _Request, query: Query) -> Response:
        self._backup_auth(handler, self.config.admin_token)
        records = [self.dataset.owner_record(owner, full=False) for owner in self.dataset.listed_owners()]
        for name in ("email", "external_id"):  # the documented optional filters
            if name in query:
                wanted = query[name][0].lower()
                records = [r for r in records if str(r[name] or "").lower() == wanted]
        return 200, records

    def _backup_owner(self, handler: _Request, query: Query, owner_id: str) -> Response:
        self._backup_auth(handler, self.config.admin_token)
        owner = self.dataset.owner(owner_id)
        if owner is None:
            raise _Reject(404, {"errors": {"user": ["Record not found"]}})
        body = self.dataset.owner_record(owner, full=True)
        self._maybe_delete_owner(owner_id, "after_detail")
        return 201, body

    def _maybe_delete_owner(self, owner_id: str, moment: str) -> None:
        """The ``delete_backup_owner`` fault: once, at its moment, delete the first owner GET /users lists."""
        if self.config.faults.delete_backup_owner != moment:
            return
        with self._delete_lock:
            if not self.dataset.deleted_owners and owner_id == self.dataset.listed_owners()[0].id:
                self.dataset.delete_owner(owner_id)
                self.faults.record("delete_backup_owner")

    def _backup_tenants(self, handler: _Request, query: Query, owner_id: str) -> Response:
        owner = self._owner(handler, owner_id, "at_tenants")
        type_ = _str_param(query, "type")
        if type_ is not None and type_ not in _TENANT_TYPES:
            raise _Reject(400, _B_BAD_TYPE)
        tenants = [t for t in self.dataset.tenant_records(owner) if type_ is None or t["type"] == type_]
        return _backup_page(query, f"/api/users/{owner.id}/tenants", type_, len(tenants),
                            lambda start, stop: tenants[start:stop])

    def _backup_accounts(self, handler: _Request, query: Query, owner_id: str, tenant_id: str) -> Response:
        owner = self._owner(handler, owner_id, "at_accounts")
        tenant = self.dataset.tenant(owner, tenant_id)
        type_ = _str_param(query, "type")
        if tenant is None or type_ != tenant.type:
            raise _Reject(401, _B_BAD_CREDENTIALS)
        status, body = _backup_page(query, f"/api/users/{owner.id}/tenants/{tenant.id}/accounts", type_,
                                    self.dataset.account_count(tenant),
                                    lambda start, stop: self.dataset.account_page(owner, tenant, start, stop))
        self._maybe_delete_account(tenant, body["pagination"])
        return status, body

    def _maybe_delete_account(self, tenant: Any, pagination: dict[str, Any]) -> None:
        """The ``delete_backup_account`` fault: once, after page 1 of the largest m365 tenant's accounts was
        built (and more pages follow), delete that list's first account."""
        if self.config.faults.delete_backup_account != "after_first_page":
            return
        with self._delete_lock:
            if (not self.deleted_accounts and pagination["current_page"] == 1 and "next_page" in pagination
                    and tenant == self.dataset.largest_m365_tenant()[1]):
                self.deleted_accounts.append(self.dataset.delete_account(tenant, 0))
                self.faults.record("delete_backup_account")

    def _unknown(self, handler: _Request, query: Query) -> Response:
        raise _Reject(404, {"error": "Not found", "path": _split(handler.target)[0]})


def _route(path: str) -> tuple[str | None, str, tuple[str, ...]]:
    for source, kind, pattern in _ROUTES:
        if match := pattern.fullmatch(path):
            return source, kind, match.groups()
    source = "saas" if path.startswith(SAAS_PREFIX) else "backup" if path.startswith(BACKUP_PREFIX + "/") else None
    return source, "unknown", ()


def _split(target: str) -> tuple[str, str]:
    """(path, query) of a request target; urlsplit only for the rare target it is needed for."""
    if "#" in target or not target.startswith("/"):  # a fragment, or absolute-form
        parts = urlsplit(target)
        return parts.path, parts.query
    path, _, query = target.partition("?")
    return path, query


def _parse_query(query: str) -> Query:
    """``parse_qs(query, keep_blank_values=True)``, without its cost for the plain queries clients send."""
    if "%" in query or "+" in query:
        return parse_qs(query, keep_blank_values=True)
    parsed: Query = {}
    for field in query.split("&"):
        if field:
            name, _, value = field.partition("=")
            parsed.setdefault(name, []).append(value)
    return parsed


def _backup_page(query: Query, path: str, type_: str | None, total: int,
                 fetch: Callable[[int, int], list[Any]]) -> Response:
    """Doc 003's paging: links only where a neighbour page exists; ``per_page: 0`` past the end."""
    per_page = _int_param(query, "per_page", BACKUP_MAX_PER_PAGE)
    if per_page is None or not 1 <= per_page <= BACKUP_MAX_PER_PAGE:
        raise _Reject(400, _B_BAD_PER_PAGE)
    page = _int_param(query, "page", 1)
    if page is None or page < 1:
        raise _Reject(500, _B_SERVER_ERROR)
    last = max(1, math.ceil(total / per_page))
    explicit_per_page = _str_param(query, "per_page") is not None

    def url(number: int) -> str:
        params = ([("type", type_)] if type_ else []) + [("page", number)]
        return f"{path}?{urlencode(params + ([('per_page', per_page)] if explicit_per_page else []))}"

    if page > last:
        return 200, {"pagination": {"current_page": page, "per_page": 0, "prev_page": last, "prev_url": url(last)},
                     "data": []}
    pagination: dict[str, Any] = {"current_page": page, "per_page": per_page}
    if page < last:
        pagination.update(next_page=page + 1, next_url=url(page + 1))
    if page > 1:
        pagination.update(prev_page=page - 1, prev_url=url(page - 1))
    start = (page - 1) * per_page
    return 200, {"pagination": pagination, "data": fetch(start, start + per_page)}


def _str_param(query: Query, name: str) -> str | None:
    """A query parameter, None when absent or blank (source B: blank means the default)."""
    value = query.get(name, [""])[0]
    return value if value != "" else None


def _int_param(query: Query, name: str, default: int) -> int | None:
    """The parameter as an int, ``default`` when absent or blank, None when it is not an integer."""
    value = _str_param(query, name)
    if value is None:
        return default
    return int(value) if _DIGITS.fullmatch(value) else None


_DIGITS = re.compile(r"[0-9]{1,12}")


def _api_token(handler: _Request, source: str | None, own: bool = False) -> str | None:
    """The credential a vendor's rate limit counts against: source S's bearer, source B's reseller token (its
    owner's or admin's X-Access-Token with ``own``)."""
    return handler.headers.get("authorization" if source == "saas" else "x-access-token" if own else
                               "x-reseller-token")


@functools.lru_cache(maxsize=2)
def _spaces(mib: int) -> bytes:
    """``mib`` MiB of JSON whitespace, made once and shared by every oversized answer."""
    return b" " * (mib * MIB)


@functools.lru_cache(maxsize=2)
def _deflated_spaces(mib: int) -> tuple[bytes, int]:
    """``mib`` MiB of spaces as raw deflate blocks ending on a full flush (so any deflate stream may follow),
    and their CRC-32. Built by streaming 1 MiB at a time through zlib: nothing this size is ever held."""
    compressor, chunk = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS), b" " * MIB
    parts, crc = [], 0
    for _ in range(mib):
        parts.append(compressor.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    parts.append(compressor.flush(zlib.Z_FULL_FLUSH))
    return b"".join(parts), crc


def gzip_bomb(body: bytes, mib: int) -> bytes:
    """One gzip member (RFC 1952) inflating to ``mib`` MiB of spaces, then ``body``: still the same JSON once
    inflated, but about a thousand times its compressed size. The spaces' blocks are made once per size."""
    padding, crc = _deflated_spaces(mib)
    tail = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = tail.compress(body) + tail.flush()
    size = mib * MIB + len(body)
    return b"".join((b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", padding, deflated,
                     struct.pack("<II", zlib.crc32(body, crc), size & 0xFFFFFFFF)))


def _same(given: str | None, expected: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


_encode = msgspec.json.Encoder().encode  # compact UTF-8 JSON, as json.dumps(ensure_ascii=False) but faster


def _reset(request: _Request) -> None:
    """Abort the connection: SO_LINGER 0 makes close() send RST instead of FIN."""
    transport = request.transport
    if transport is not None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


_BAD_REQUEST = object()  # queued in place of a request the parser rejected
_JSON_HEADERS = f"Content-Type: {_JSON}\r\nContent-Length: ".encode()
_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus}


def _response(answer: Answer, keep_alive: bool, http10: bool, head: bool) -> bytes | list[bytes]:
    """The bytes of one answer: status line, headers, body (none for HEAD); a list for a body of chunks."""
    status, body, content_type, extra = answer
    status_line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode()
    if keep_alive and not http10 and not extra and content_type is _JSON and not head and type(body) is bytes:
        return b"%s%s%d\r\n\r\n%s" % (status_line, _JSON_HEADERS, len(body), body)  # nearly every answer
    chunks = body if isinstance(body, list) else [body]
    lines = [f"Content-Type: {content_type}\r\nContent-Length: {sum(map(len, chunks))}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in extra)
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif http10:  # HTTP/1.0 closes unless told otherwise
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    head_bytes = status_line + "".join(lines).encode("latin-1")
    if head:
        return head_bytes
    return [head_bytes, *chunks] if isinstance(body, list) else head_bytes + body


class _Connection(asyncio.Protocol):
    """One client connection: httptools parses, ``_App.handle`` answers, one request at a time, in order."""

    def __init__(self, server: _HttpServer) -> None:
        self._server = server
        self._app = server.app
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url: list[bytes] = []
        self._headers: dict[str, str] = {}
        self._pending: deque[Any] = deque()  # parsed requests not answered yet (_Request or _BAD_REQUEST)
        self._waiting: asyncio.Task[Any] | None = None  # the delayed answer under way, if any
        self._failed = False  # the parser gave up on this stream: nothing more is read
        self._paused = False
        self._eof = False  # the client half-closed its side
        self._last = 0.0  # when the connection last did something, for the idle timeout
        self._idle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass
        self._app.counters.add("connections", "accepted")
        self._server.connections.add(self)
        self._last = self._loop.time()
        self._idle = self._loop.call_later(KEEPALIVE_S, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._pending.clear()
        if self._waiting is not None:
            self._waiting.cancel()
        if self._idle is not None:
            self._idle.cancel()

    def data_received(self, data: bytes) -> None:
        if self._failed:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # what follows is not HTTP: answer what came before, then close
            self._failed = True
            if self._pending and self._pending[-1] is not _BAD_REQUEST:
                self._pending[-1].keep_alive = False
            else:
                self._pending.append(_BAD_REQUEST)
        except httptools.HttpParserError:
            self._failed = True
            self._pending.append(_BAD_REQUEST)
        self._answer_pending()
        transport = self.transport
        if len(self._pending) > 32 and not self._paused and not transport.is_closing():  # type: ignore[union-attr]
            self._paused = True  # a client pipelining far ahead of a delayed answer
            transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        """The client will send no more: answer what it asked (a delayed answer may still be under way), then
        close."""
        self._eof = True
        return bool(self._pending or self._waiting is not None)  # True keeps the transport open to answer

    # -- httptools callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = []
        self._headers = {}

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_message_complete(self) -> None:
        parser = self._parser
        assert self.transport is not None
        self._pending.append(_Request(parser.get_method().decode("latin-1"),
                                      b"".join(self._url).decode("utf-8", "replace"), self._headers,
                                      self.transport, parser.should_keep_alive(),
                                      parser.get_http_version() == "1.0"))

    # -- answering ------------------------------------------------------------------------------------
    def _answer_pending(self) -> None:
        """Answer queued requests in order until one has to wait (a delay) or the connection closes."""
        transport = self.transport
        assert transport is not None
        while self._pending and self._waiting is None and not transport.is_closing():
            request = self._pending.popleft()
            if request is _BAD_REQUEST:
                # Not a request the app saw (nor counts), as with any server's parser error.
                transport.write(_response((400, _encode({"error": "Bad request"}), _JSON, []), False, False, False))
                transport.close()
                return
            try:
                answer = self._app.handle(request)
            except Exception:  # a bug in an endpoint: answer 500 as any server would, keep serving
                log.exception("simulator: error answering %s %s", request.method, request.target)
                answer = self._app.send(500, _encode({"error": "Internal Server Error"}))
            if answer is None or isinstance(answer, tuple):
                self._write(request, answer)
            else:  # a delayed answer: later requests on this connection wait for it
                self._waiting = self._loop.create_task(answer)
                self._waiting.add_done_callback(lambda task, request=request: self._delayed_done(request, task))
        if transport.is_closing():
            return
        if self._eof and not self._pending and self._waiting is None:
            transport.close()
        elif self._paused and len(self._pending) < 8:
            self._paused = False
            transport.resume_reading()

    def _delayed_done(self, request: _Request, task: asyncio.Task[Any]) -> None:
        self._waiting = None
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("simulator: error answering %s %s", request.method, request.target, exc_info=exc)
            self._write(request, self._app.send(500, _encode({"error": "Internal Server Error"})))
        else:
            self._write(request, task.result())
        if self.transport is not None and not self.transport.is_closing():
            self._answer_pending()

    def _write(self, request: _Request, answer: Answer | None) -> None:
        transport = request.transport
        self._last = self._loop.time()
        if answer is None or transport.is_closing():  # reset: nothing is sent
            return
        data = _response(answer, request.keep_alive, request.http10, request.method == "HEAD")
        if isinstance(data, list):
            transport.writelines(data)
        else:
            transport.write(data)
        if not request.keep_alive:
            transport.close()

    def _check_idle(self) -> None:
        """Close the connection once it has been idle for KEEPALIVE_S (it is not idle while answering)."""
        assert self.transport is not None
        idle_for = self._loop.time() - self._last
        if self.transport.is_closing():
            return
        if self._waiting is not None or self._pending or idle_for < KEEPALIVE_S:
            self._idle = self._loop.call_later(max(KEEPALIVE_S - idle_for, 1.0), self._check_idle)
        else:
            self.transport.close()


class _HttpServer:
    """The listening socket and the connections it accepted (``close`` ends them all)."""

    def __init__(self, app: _App, loop: asyncio.AbstractEventLoop) -> None:
        self.app, self.loop = app, loop
        self.connections: set[_Connection] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await self.loop.create_server(lambda: _Connection(self), host, port, backlog=BACKLOG)

    async def close(self) -> None:
        """Stop listening and close every connection now, idle keep-alive ones included."""
        assert self.server is not None
        self.server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        with contextlib.suppress(TimeoutError):  # stop() must not hang on a connection that will not go
            await asyncio.wait_for(self.server.wait_closed(), timeout=2)


class Simulator:
    """Both vendor APIs on ``host:port`` in a background thread (``port=0`` picks a free port).

    ``with Simulator(config) as sim:`` starts and stops it; ``sim.env`` holds the variables that
    point the pipeline at it; ``sim.dataset`` is what it serves; ``sim.stats()`` what happened.
    """

    def __init__(self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SimulatorConfig()
        self.host = host
        self._requested_port = port
        self.dataset = Dataset(self.config)
        self._counters = Counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Simulator:
        """Bind and serve; raises OSError when the address is taken."""
        if self._server is None:
            loop = uvloop.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="m365-simulate", daemon=True)
            thread.start()
            server = _HttpServer(_App(self.config, self.dataset, self._counters), loop)
            try:
                asyncio.run_coroutine_threadsafe(server.start(self.host, self._requested_port), loop).result()
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=5)
                loop.close()
                raise
            self._loop, self._server, self._thread = loop, server, thread
        return self

    def stop(self) -> None:
        """Stop serving and close every connection, idle keep-alive ones included."""
        server, loop, self._server = self._server, self._loop, None
        if server is None or loop is None:
            return
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        loop.close()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None or self._server.server is None:
            raise RuntimeError("the simulator is not running")
        return int(self._server.server.sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def saas_base_url(self) -> str:
        return self.base_url + SAAS_PREFIX

    @property
    def backup_base_url(self) -> str:
        return self.base_url + BACKUP_PREFIX

    @property
    def env(self) -> dict[str, str]:
        return {"SAAS_API_BASE_URL": self.saas_base_url, "SAAS_API_TOKEN": self.config.saas_token,
                "BACKUP_API_BASE_URL": self.backup_base_url, "BACKUP_RESELLER_TOKEN": self.config.reseller_token,
                "BACKUP_ADMIN_TOKEN": self.config.admin_token}

    def stats(self) -> dict[str, Any]:
        """Counters: ``requests`` per endpoint kind (``saas_users``, ``saas_subscriptions``, ``backup_owners``,
        ``backup_owner``, ``backup_tenants``, ``backup_accounts``, ``unknown``), ``faults`` per kind
        (``latency``, ``slow``, ``429``, ``5xx``, ``reset``, ``fail_once``, ``malformed``,
        ``missing_field``, ``down``, ``delete_saas_user``, ``delete_backup_account``,
        ``delete_backup_owner``, ``rate_limit``, ``oversize``, ``gzip_bomb``, ``claim_pages``, ``endless_next``,
        ``echo_headers``), ``responses`` per status code, ``connections`` accepted, and
        ``requests_total``."""
        return self._counters.snapshot()
