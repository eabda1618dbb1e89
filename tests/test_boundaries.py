"""Network boundaries (issue 5, point 6), with real sockets, servers and processes:

* private / loopback / link-local addresses named by a DID document, a did:web or a PDS
  endpoint are refused unless ALLOW_PRIVATE_NETWORK, names that resolve to them too, also
  when the DNS answer changes between the check and the connect (rebinding);
* response bodies are capped (DID document / listRepos JSON, getRepo CAR) with bounded
  reading, whether or not Content-Length says so;
* TLS is verified: a self-signed HTTPS server and a self-signed wss:// relay are refused;
* the database password never appears in logs (text and json, DEBUG), /status, /readyz,
  /metrics, `firehose status`, nor on the connection-refused, wrong-password and
  configuration-error paths.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support import ROOT, WorkerProcess, free_port, serve_frames

from backfill.download import fetch_repo
from backfill.hosts import MAX_JSON_BYTES, STREAM_CHUNK_BYTES, FetchError, HostClient
from backfill.http_rules import is_forbidden_ip
from backfill.identity import IdentityError, IdentityResolver
from firehose.live.relay import SUBSCRIBE_PATH, RelayClient
from firehose.metrics import LiveMetrics
from firehose.redact import redact_dsn, redact_secrets
from firehose.settings import RelaySettings

# --- address rules ------------------------------------------------------------------------

FORBIDDEN = [
    "127.0.0.1",
    "127.255.255.254",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "0.0.0.0",
    "169.254.169.254",
    "100.64.0.1",
    "100.127.255.254",
    "224.0.0.1",
    "239.1.2.3",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "240.0.0.1",
    "::",
    "::1",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "ff0e::1",
    "fec0::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::127.0.0.1",  # IPv4-compatible
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::1",  # NAT64
    "2002:7f00:1::",
    "2002:a00:1::1",  # 6to4 of loopback / RFC 1918
    "not an address",
    "",
]
ALLOWED = ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_address(address: str) -> None:
    assert is_forbidden_ip(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_global_address_allowed(address: str) -> None:
    assert not is_forbidden_ip(address)


@given(st.ip_addresses(v=4))
def test_ipv4_mapped_and_nat64_judged_as_their_ipv4(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
    assert is_forbidden_ip(str(mapped)) == is_forbidden_ip(str(address))
    assert is_forbidden_ip(str(nat64)) == is_forbidden_ip(str(address))


# --- real local servers -------------------------------------------------------------------


@asynccontextmanager
async def serve(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


def counting_app(hits: list[str]) -> web.Application:
    async def doc(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"ok": True, "id": "did:web:example.com"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", doc)
    return app


@asynccontextmanager
async def client(**kwargs: Any) -> AsyncIterator[HostClient]:
    async with aiohttp.ClientSession() as session:
        yield HostClient(session, **kwargs)


# Names and spellings of loopback that a DID document could use; each resolves for real
# (/etc/hosts, inet_aton forms) or is an IP literal.
LOOPBACK_SPELLINGS = [
    "localhost",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "127.0.0.1",
    "[::ffff:127.0.0.1]",
    "0.0.0.0",
    "[::]",
    "[::1]",
]


async def test_loopback_names_refused_unless_allowed() -> None:
    hits: list[str] = []
    async with serve(counting_app(hits)) as port:
        async with client(allow_private=False) as http:
            for host in LOOPBACK_SPELLINGS:
                with pytest.raises(FetchError) as err:
                    await http.get_json(f"http://{host}:{port}/.well-known/did.json")
                assert err.value.reason == "forbidden_address", (host, err.value)
                assert not err.value.transient
        assert hits == []
        # The same server IS reachable when private addresses are allowed (the devnet).
        async with client(allow_private=True) as http:
            assert (await http.get_json(f"http://localhost:{port}/x"))["ok"] is True
        assert hits == ["/x"]


async def test_did_web_and_pds_on_loopback_refused(tmp_path: Path) -> None:
    hits: list[str] = []
    async with serve(counting_app(hits)) as port, client(allow_private=False) as http:
        resolver = IdentityResolver(http, f"http://127.0.0.1:{port}")
        for did in (f"did:web:localhost%3A{port}", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"):
            with pytest.raises(IdentityError) as err:
                await resolver.resolve(did)
            assert err.value.reason == "forbidden_address", err.value
        with pytest.raises(FetchError) as fetch_err:
            await fetch_repo(
                http, f"http://localhost:{port}", "did:plc:x", max_bytes=1 << 20, spool_dir=tmp_path
            )
        assert fetch_err.value.reason == "forbidden_address"
    assert hits == []


class RebindingResolver(AbstractResolver):
    """A DNS server under an attacker's control: the first answer for a name is a public
    address (it passes any check made before the request), every later one is loopback."""

    def __init__(self) -> None:
        self.answers: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = "93.184.216.34" if not self.answers else "127.0.0.1"
        self.answers.append(address)
        return [
            ResolveResult(
                hostname=host, host=address, port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        pass


async def test_dns_rebinding_refused_at_connect_time() -> None:
    hits: list[str] = []
    async with serve(counting_app(hits)) as port:
        url = f"http://rebind.example:{port}/.well-known/did.json"
        # The attack is real: a session trusting the second answer reaches the local server.
        naive = RebindingResolver()
        connector = aiohttp.TCPConnector(resolver=naive)
        async with aiohttp.ClientSession(connector=connector) as session:
            await naive.resolve("rebind.example")  # the "check" sees the public address
            async with session.get(url) as resp:
                assert resp.status == 200
        assert hits == [urlsplit(url).path]
        hits.clear()
        # HostClient: its own check passes (public answer), the connect-time guard refuses.
        rebinding = RebindingResolver()
        connector = aiohttp.TCPConnector(resolver=rebinding)
        async with aiohttp.ClientSession(connector=connector) as session:
            http = HostClient(session, allow_private=False)
            with pytest.raises(FetchError) as err:
                await http.get_json(url)
        assert err.value.reason == "forbidden_address"
        assert "127.0.0.1" in str(err.value)
        assert rebinding.answers == ["93.184.216.34", "127.0.0.1"]
        assert hits == []


# --- response size caps ---------------------------------------------------------------------

HUGE_BYTES = 256 * 1024 * 1024  # what the server would send if the client kept reading


def oversized_app(sent: dict[str, int]) -> web.Application:
    async def with_length(request: web.Request) -> web.Response:
        body = b"[" + b"0," * (MAX_JSON_BYTES // 2) + b"0]"
        return web.Response(body=body, content_type="application/json")

    async def endless(request: web.Request) -> web.StreamResponse:
        # No Content-Length (chunked): only counting while reading can stop this.
        resp = web.StreamResponse()
        resp.content_type = "application/vnd.ipld.car"
        await resp.prepare(request)
        chunk = b"\x00" * STREAM_CHUNK_BYTES
        key = request.path
        sent[key] = 0
        try:
            while sent[key] < HUGE_BYTES:
                await resp.write(chunk)
                sent[key] += len(chunk)
        except (ConnectionResetError, ConnectionError):
            pass
        return resp

    app = web.Application()
    app.router.add_get("/length.json", with_length)
    app.router.add_get("/endless.json", endless)
    app.router.add_get("/xrpc/com.atproto.sync.getRepo", endless)
    return app


async def test_oversized_bodies_refused_with_bounded_reading(tmp_path: Path) -> None:
    sent: dict[str, int] = {}
    async with serve(oversized_app(sent)) as port, client(allow_private=True) as http:
        base = f"http://127.0.0.1:{port}"
        # Content-Length over the cap: refused before the body is read.
        with pytest.raises(FetchError) as err:
            await http.get_json(base + "/length.json")
        assert err.value.reason == "too_large" and "Content-Length" in str(err.value)
        assert http.bytes_received == 0

        # No Content-Length: refused once the count passes the cap, the socket dropped,
        # and memory stays around the cap (the body is never held whole).
        started = time.monotonic()
        tracemalloc.start()
        try:
            with pytest.raises(FetchError) as err:
                await http.get_json(base + "/endless.json")
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert err.value.reason == "too_large"
        assert http.bytes_received <= MAX_JSON_BYTES + 2 * STREAM_CHUNK_BYTES
        assert peak_bytes < 8 * MAX_JSON_BYTES, peak_bytes

        # getRepo: BACKFILL_MAX_REPO_MB's byte cap, same way.
        cap = 4 * 1024 * 1024
        before = http.bytes_received
        with pytest.raises(FetchError) as err:
            await fetch_repo(http, base, "did:plc:x", max_bytes=cap, spool_dir=tmp_path)
        assert err.value.reason in ("too_large", "bad_response")  # zeros are no CAR either
        assert http.bytes_received - before <= cap + 2 * STREAM_CHUNK_BYTES
        assert time.monotonic() - started < 10
        await asyncio.sleep(0.2)  # the server notices the dropped connections
    # The servers stopped far short of the 256 MiB they would have sent.
    assert sent and all(n < 64 * 1024 * 1024 for n in sent.values()), sent
    assert os.listdir(tmp_path) == []  # no spool left behind


async def test_oversized_car_refused_by_size_not_content(tmp_path: Path) -> None:
    """A real CAR stream (valid header, then a huge block) hits the byte cap itself."""
    from firehose.devnet.dagcbor import car_header, cid_for_block, encode, varint

    root_block = encode({"did": "did:plc:x"})
    root = cid_for_block(root_block)
    head = car_header([root])

    async def car(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(head)
        size = 64 * 1024 * 1024  # a declared 64 MiB section, then its bytes
        await resp.write(varint(size))
        try:
            for _ in range(size // STREAM_CHUNK_BYTES):
                await resp.write(b"\x01" * STREAM_CHUNK_BYTES)
        except ConnectionError:
            pass
        return resp

    app = web.Application()
    app.router.add_get("/xrpc/com.atproto.sync.getRepo", car)
    async with serve(app) as port, client(allow_private=True) as http:
        with pytest.raises(FetchError) as err:
            await fetch_repo(
                http, f"http://127.0.0.1:{port}", "did:plc:x", max_bytes=2 << 20, spool_dir=tmp_path
            )
        assert err.value.reason == "too_large"
        assert http.bytes_received <= (2 << 20) + 2 * STREAM_CHUNK_BYTES


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (cert, key) made with cryptography."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_context(cert: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*cert)
    return context


async def test_https_with_untrusted_certificate_refused(self_signed: tuple[Path, Path]) -> None:
    hits: list[str] = []
    async with serve(counting_app(hits), server_context(self_signed)) as port:
        url = f"https://127.0.0.1:{port}/.well-known/did.json"
        # ALLOW_PRIVATE_NETWORK on: the address is not what refuses it, the certificate is.
        async with client(allow_private=True) as http:
            with pytest.raises(FetchError) as err:
                await http.get_json(url)
        assert err.value.reason == "tls" and "certificate" in str(err.value).lower()
        assert hits == []
        # Control: a client that trusts this certificate gets the document from the server.
        trusting = ssl.create_default_context(cafile=str(self_signed[0]))
        connector = aiohttp.TCPConnector(ssl=trusting)
        async with aiohttp.ClientSession(connector=connector) as session:
            http = HostClient(session, allow_private=True)
            assert (await http.get_json(url))["ok"] is True
        assert hits == ["/.well-known/did.json"]


async def test_wss_relay_with_untrusted_certificate_refused(
    self_signed: tuple[Path, Path],
) -> None:
    opened: list[str] = []

    async def subscribe(request: web.Request) -> web.WebSocketResponse:
        opened.append(request.path)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"never delivered")
        return ws

    app = web.Application()
    app.router.add_get(SUBSCRIBE_PATH, subscribe)
    registry = CollectorRegistry()
    metrics = LiveMetrics.create(registry)
    async with serve(app, server_context(self_signed)) as port:
        relay = RelayClient(
            RelaySettings(url=f"wss://localhost:{port}", start_cursor=None), metrics, None
        )
        stop = asyncio.Event()
        frames: list[bytes] = []

        async def read() -> None:
            async for frame in relay.frames(stop):
                frames.append(frame)

        task = asyncio.create_task(read())
        await _until(lambda: _reconnects(registry) >= 1, timeout_s=10)
        stop.set()
        await asyncio.wait_for(task, 10)
    assert _reconnects(registry) >= 1
    assert frames == [] and opened == []


def _reconnects(registry: CollectorRegistry) -> float:
    total = 0.0
    for family in registry.collect():
        if family.name == "firehose_reconnects":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


# --- the database password ------------------------------------------------------------------


def test_redaction_helpers() -> None:
    url = "postgresql://indexer:pa%40ss:w0rd@db.example:5432/atproto?sslmode=require"
    assert redact_dsn(url) == "postgresql://indexer:***@db.example:5432/atproto?sslmode=require"
    assert redact_dsn("postgresql://indexer@db/atproto") == "postgresql://indexer@db/atproto"
    assert "s3cr3t" not in redact_secrets("connect to postgres://u:s3cr3t@h/db failed")
    assert "s3cr3t" not in redact_secrets("host=h user=u password=s3cr3t dbname=atproto")
    assert "s3cr3t" not in redact_secrets("postgresql://u@h/db?password=s3cr3t&x=1")
    assert "s3cr3t" not in redact_secrets("DATABASE_URL='postgresql://u:p@s3cr3t@h/db'")


@given(
    st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=1),
    st.sampled_from(["postgresql", "postgres"]),
)
def test_redact_dsn_never_shows_the_password(password: str, scheme: str) -> None:
    from urllib.parse import quote

    url = f"{scheme}://indexer:{quote(password, safe='')}@db.example:5432/atproto"
    assert redact_dsn(url) == f"{scheme}://indexer:***@db.example:5432/atproto"
    assert (
        redact_secrets(f"failed: {url}!")
        == f"failed: {scheme}://indexer:***@db.example:5432/atproto!"
    )


@pytest_asyncio.fixture
async def password_role(pg_admin_dsn: str, db_dsn: str) -> AsyncIterator[tuple[str, str, str]]:
    """A login role that must give its password (scram-sha-256), for a fresh migrated
    database: (dsn with the password, the password, the role). Needs the test server's
    pg_hba.conf on this machine (the embedded server), else skipped."""
    role = f"hyg_{uuid.uuid4().hex[:10]}"
    secret = f"Pw-{uuid.uuid4().hex}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        hba = str(await admin.fetchval("SHOW hba_file"))
        if not os.access(hba, os.W_OK):
            pytest.skip("the test server's pg_hba.conf is not on this machine")
        original = _read(hba)
        # role and secret are our own hex: no quoting issue; CREATE ROLE takes no parameters.
        await admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{secret}'")
        _write(
            hba, f"local all {role} scram-sha-256\nhost all {role} all scram-sha-256\n" + original
        )
        await admin.execute("SELECT pg_reload_conf()")
        try:
            yield _with_user(db_dsn, role, secret), secret, role
        finally:
            _write(hba, original)
            await admin.execute("SELECT pg_reload_conf()")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
    finally:
        await admin.close()


def _with_user(dsn: str, user: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, ""))


async def _get(port: int, path: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return await resp.text()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_password_never_shown(
    password_role: tuple[str, str, str], tmp_path: Path, log_format: str
) -> None:
    dsn, secret, role = password_role
    seen: list[str] = []
    env = {"LOG_LEVEL": "DEBUG", "LOG_FORMAT": log_format, "BACKFILL_DAYS": "0"}

    async with serve_frames([]) as relay_url:
        # 1. A good password: start-up, /status, /readyz, /metrics, `firehose status`.
        port = free_port()
        worker = WorkerProcess.start(tmp_path, dsn, relay_url, METRICS_PORT=str(port), **env)
        try:
            deadline = time.monotonic() + 30
            while "connected to relay" not in worker.log():
                assert worker.proc.poll() is None, worker.log()[-2000:]
                assert time.monotonic() < deadline, worker.log()[-2000:]
                await asyncio.sleep(0.1)
            for path in ("/status", "/readyz", "/metrics", "/healthz"):
                seen.append(await _get(port, path))
            assert '"cursor_service"' in seen[0]
            for args in (
                ["status"],
                ["status", "--json"],
                ["status", "--url", f"http://127.0.0.1:{port}"],
            ):
                out = await asyncio.to_thread(_firehose, args, {**env, "DATABASE_URL": dsn})
                assert out.returncode == 0, out.stderr
                seen += [out.stdout, out.stderr]
        finally:
            assert worker.terminate(timeout_s=15) == 0
        seen.append(worker.log())
        if log_format == "json":  # the json formatter was the one in use
            assert all(json.loads(line)["level"] for line in worker.log().splitlines())

        # 2. A wrong password: refused by the server, start-up stops with a clear message.
        wrong_secret = f"Wrong-{uuid.uuid4().hex}"
        wrong = dsn.replace(secret, wrong_secret)
        run_env = {**env, "DATABASE_URL": wrong, "RELAY_URL": relay_url, "METRICS_PORT": "0"}
        out = await asyncio.to_thread(_firehose, ["run"], run_env)
        assert out.returncode != 0
        assert "password authentication failed" in out.stderr, out.stderr[-2000:]
        assert wrong_secret not in out.stdout + out.stderr

    # 3. Nothing listening: the worker waits and retries, saying so, without the password.
    port = free_port()
    unreachable = f"postgresql://{role}:{secret}@127.0.0.1:{port}/atproto"
    worker = WorkerProcess.start(tmp_path, unreachable, "ws://127.0.0.1:9", **env)
    try:
        await _until(lambda: worker.log().count("retrying in") >= 2, timeout_s=20)
        assert worker.log().count("retrying in") >= 2, worker.log()[-2000:]
    finally:
        worker.kill9()
    seen.append(worker.log())

    # 4. A configuration error that quotes the value.
    out = _firehose(["run"], {"DATABASE_URL": f"mysql://{role}:{secret}@db/atproto"})
    assert out.returncode == 2 and "DATABASE_URL=" in out.stderr
    seen.append(out.stderr)

    for text in seen:
        assert secret not in text, text[max(0, text.find(secret) - 300) :][:600]


async def _until(check: Any, *, timeout_s: float) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _firehose(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "firehose", *args],
        cwd=ROOT,
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_query_password_redacted() -> None:
    text = "postgresql://u@/atproto?host=/tmp/x&password=s3cr3t"
    assert parse_qs(urlsplit(redact_secrets(text)).query)["password"] == ["***"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logged_and_uncaught_exceptions_masked(log_format: str) -> None:
    """A library exception quoting the URL, logged at DEBUG with its traceback, and one that
    nobody catches (printed by sys.excepthook): both masked."""
    secret = f"Pw-{uuid.uuid4().hex}"
    code = f"""
import logging
from firehose import logs
logs.configure("DEBUG", "{log_format}")
url = "postgresql://indexer:{secret}@db:5432/atproto"
try:
    raise ConnectionError("could not connect to " + url)
except ConnectionError:
    logging.getLogger("firehose.db").debug("retrying %s", url, exc_info=True)
raise RuntimeError("giving up on " + url)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    # the log message, its traceback, the uncaught exception
    assert out.stderr.count("indexer:***@db") == 3, out.stderr
    assert secret not in out.stdout + out.stderr
