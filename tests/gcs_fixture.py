"""A Google Cloud Storage stand-in on loopback for the gs:// tests; no internet, no account.

Use it as a pytest plugin (``pytest_plugins = ["tests.gcs_fixture"]``) and ask for the
fixture ``gcs``: for one test it routes this process's gs:// traffic to a loopback bucket that
the session starts once (``gcs_server``); subprocesses get ``gcs.child_env()``. No setting
outlives the test that asked for it. The session starts:

- ``gcp-storage-emulator --in-memory`` in a subprocess (the JSON and XML APIs, one bucket);
- a small asyncio proxy in a second subprocess, which every client reaches:
  - TensorFlow's own gs:// client (libcurl) has Google's host names compiled in, but honours
    ``https_proxy`` and ``CURL_CA_BUNDLE``: it sends ``CONNECT www.googleapis.com:443`` and
    ``CONNECT storage.googleapis.com:443`` to the proxy, which answers the TLS handshake with a
    certificate from a throw-away CA made here, and forwards the requests inside;
  - google-cloud-storage reaches the same proxy over plain HTTP through
    ``STORAGE_EMULATOR_HOST``.

So a test sees one path for all traffic, and can make it fail: ``gcs.proxy.fail_next(3, 503)``
answers the next three matching requests with 503 instead of forwarding them.

The emulator's quirks are worked around in the proxy, not in the product:
- TensorFlow's upload PUT sends both ``Content-Length`` and ``Transfer-Encoding: chunked``, and
  the emulator would store the chunk framing: the proxy de-chunks and forwards a plain body;
- libcurl waits a second for ``100 Continue`` before each upload body: the proxy answers it;
- the emulator (``http.server``, HTTP/1.0) closes every connection: the proxy keeps the
  client's connection alive and opens one to the emulator per request;
- its resumable-upload ``Location`` says ``http://`` (it sees no TLS): rewritten to ``https://``;
- empty upload bodies: forwarded with ``Content-Length: 0`` and no framing at all.
Credentials: TensorFlow takes ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (no OAuth or metadata server
call; ``NO_GCE_CHECK=true`` too); google-cloud-storage is anonymous under the emulator host.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

BUCKET = "cxr-test"
CONTROL = "/__proxy__/"
GOOGLE_HOSTS = ("storage.googleapis.com", "www.googleapis.com", "oauth2.googleapis.com")
HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "expect",
              "content-length", "te", "upgrade"}


# --------------------------------------------------------------------------- certificates


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for Google's API hosts, signed by it.

    Returns (ca.pem, server.pem, server.key).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(days=1),
                 not_valid_after=now + datetime.timedelta(days=7))

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("cxr-test throw-away CA"))
               .issuer_name(name("cxr-test throw-away CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(valid["not_valid_before"])
               .not_valid_after(valid["not_valid_after"])
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(h) for h in (*GOOGLE_HOSTS, "*.googleapis.com")]
    cert = (x509.CertificateBuilder().subject_name(name("storage.googleapis.com"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"])
            .not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# --------------------------------------------------------------------------- the proxy


@dataclasses.dataclass
class Fault:
    """Answer the next ``remaining`` requests that match with ``status`` (and ``body``)."""

    remaining: int
    status: int
    method: str | None = None  # e.g. "PUT"; None: any
    path_contains: str | None = None  # substring of the request path; None: any
    body: bytes = b""

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and (self.method in (None, method)) and \
            (self.path_contains is None or self.path_contains in path)


@dataclasses.dataclass
class Seen:
    """One request the proxy handled: what it asked and what it got."""

    method: str
    host: str
    path: str
    status: int
    injected: bool


class GcsProxy:
    """TLS-terminating forward proxy (for TensorFlow) and reverse proxy (for the Python client)
    in front of the emulator, with fault injection; runs its own event loop in a thread."""

    def __init__(self, upstream: tuple[str, int], cert: Path, key: Path):
        self.upstream = upstream
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(cert, key)
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="gcs-proxy",
                                        daemon=True)
        self.port = 0

    # ----- control, from the test's thread

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)

    def stop(self) -> None:
        async def close():
            self._server.close()
            await self._server.wait_closed()
        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - best effort on teardown
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def fail_next(self, count: int, status: int = 503, method: str | None = None,
                  path_contains: str | None = None, body: bytes | None = None) -> Fault:
        payload = body if body is not None else json.dumps(
            {"error": {"code": status, "message": "injected by the test proxy"}}).encode()
        fault = Fault(count, status, method, path_contains, payload)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def reset_log(self) -> None:
        with self._lock:
            self.seen.clear()

    # ----- the event loop side

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, secure = "", False
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                method, target, headers = head
                if method == "CONNECT":
                    host = target.rsplit(":", 1)[0]
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    secure = True
                    continue
                path = target
                if target.startswith(("http://", "https://")):  # absolute form: plain proxying
                    rest = target.split("://", 1)[1]
                    host, _, path = rest.partition("/")
                    path = "/" + path
                body = await _read_body(reader, writer, method, headers)
                if path.startswith(CONTROL):
                    status, out_headers, out_body = self._control(method, path, body)
                    _write_response(writer, method, status, out_headers, out_body)
                    await writer.drain()
                    continue
                status, out_headers, out_body = await self._answer(
                    method, host or headers.get("host", ""), path, headers, body, secure)
                _write_response(writer, method, status, out_headers, out_body)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    def _control(self, method: str, path: str, body: bytes):
        """The test's remote control: /__proxy__/{fail,clear,seen,reset}."""
        action = path[len(CONTROL):].strip("/")
        if action == "fail":
            spec = json.loads(body)
            spec["body"] = spec["body"].encode("latin-1") if spec.get("body") is not None else None
            self.fail_next(**spec)
        elif action == "clear":
            self.clear_faults()
        elif action == "reset":
            self.reset_log()
        elif action == "seen":
            with self._lock:
                seen = [dataclasses.asdict(s) for s in self.seen]
            return 200, [("Content-Type", "application/json")], json.dumps(seen).encode()
        else:
            return 404, [], b""
        return 200, [], b""

    async def _answer(self, method: str, host: str, path: str, headers: dict, body: bytes,
                      secure: bool) -> tuple[int, list[tuple[str, str]], bytes]:
        with self._lock:
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault:
                fault.remaining -= 1
        if fault:
            self._log(method, host, path, fault.status, True)
            return fault.status, [("Content-Type", "application/json")], fault.body
        if method == "POST" and not body and "uploadType=media" in path:
            path, headers, body = _empty_media_as_multipart(path, headers)
        status, out_headers, out_body = await self._forward(method, path, headers, body)
        if secure:
            out_headers = [(k, v.replace("http://", "https://", 1) if k.lower() == "location"
                            else v) for k, v in out_headers]
        self._log(method, host, path, status, False)
        return status, out_headers, out_body

    def _log(self, method: str, host: str, path: str, status: int, injected: bool) -> None:
        with self._lock:
            self.seen.append(Seen(method, host, path, status, injected))

    async def _forward(self, method: str, path: str, headers: dict,
                       body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            lines = [f"{method} {path} HTTP/1.1"]
            lines += [f"{k}: {v}" for k, v in headers.items() if k not in HOP_BY_HOP]
            if body or method in ("POST", "PUT", "PATCH"):
                lines.append(f"Content-Length: {len(body)}")
            lines.append("Connection: close")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        if not raw:  # the emulator raised inside its handler and closed the connection
            return 502, [("Content-Type", "text/plain")], b"emulator closed without answering"
        head, _, rest = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        out_headers = []
        for line in header_lines:
            key, _, value = line.partition(":")
            if key.strip().lower() not in HOP_BY_HOP:
                out_headers.append((key.strip(), value.strip()))
        return status, out_headers, b"" if method == "HEAD" else rest


def _empty_media_as_multipart(path: str, headers: dict) -> tuple[str, dict, bytes]:
    """The emulator raises on an empty media upload (TensorFlow's folder markers and empty
    files); the same empty object as a multipart upload goes through."""
    boundary = "cxr-empty-object"
    body = (f"--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n"
            f"--{boundary}\r\nContent-Type: {headers.get('content-type') or 'application/octet-stream'}"
            f"\r\n\r\n\r\n--{boundary}--\r\n").encode()
    headers = {**headers, "content-type": f"multipart/related; boundary={boundary}"}
    return path.replace("uploadType=media", "uploadType=multipart"), headers, body


async def _read_head(reader: asyncio.StreamReader):
    """(method, target, lower-cased headers) of the next request, or None at end of stream."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return method, target, headers


async def _read_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
                     headers: dict) -> bytes:
    """The request body without any chunk framing (TensorFlow may send Content-Length and
    chunked together: chunked wins, as RFC 9112 says)."""
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


def _write_response(writer: asyncio.StreamWriter, method: str, status: int,
                    headers: list[tuple[str, str]], body: bytes) -> None:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: keep-alive"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                 + (b"" if method == "HEAD" else body))


def _reason(status: int) -> str:
    from http import HTTPStatus
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Resume Incomplete" if status == 308 else "Status"


class ProxyControl:
    """The test side of the proxy, which runs in its own process (a TensorFlow call that keeps
    the GIL while it waits on the network would deadlock a proxy thread in the test process)."""

    def __init__(self, port: int):
        self.port = port
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, action: str, payload: dict | None = None) -> bytes:
        data = json.dumps(payload).encode() if payload is not None else b""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{CONTROL}{action}",
                                         data=data, method="POST" if payload is not None
                                         or action != "seen" else "GET")
        with self._opener.open(request, timeout=10) as response:
            return response.read()

    def fail_next(self, count: int, status: int = 503, method: str | None = None,
                  path_contains: str | None = None, body: bytes | None = None) -> None:
        """Makes the next ``count`` matching requests fail with ``status`` (not forwarded);
        with ``body`` (and e.g. status 200) they get those bytes instead of the real answer."""
        self._call("fail", {"count": count, "status": status, "method": method,
                            "path_contains": path_contains,
                            "body": body.decode("latin-1") if body is not None else None})

    def clear_faults(self) -> None:
        self._call("clear", {})

    def reset_log(self) -> None:
        self._call("reset", {})

    @property
    def seen(self) -> list[Seen]:
        return [Seen(**s) for s in json.loads(self._call("seen"))]


def serve_proxy(upstream_port: int, cert: str, key: str) -> None:
    """Subprocess entry point: runs the proxy until killed, printing its port first."""
    proxy = GcsProxy(("127.0.0.1", upstream_port), Path(cert), Path(key))
    proxy.start()
    print(proxy.port, flush=True)
    proxy._thread.join()


def start_proxy(upstream_port: int, cert: Path, key: Path, log: Path) -> tuple:
    proc = subprocess.Popen([sys.executable, __file__, "--proxy", str(upstream_port), str(cert),
                             str(key)], stdout=subprocess.PIPE, stderr=log.open("wb"), text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"the GCS test proxy did not start: {log.read_text()[-2000:]}")
    return proc, int(line)


# --------------------------------------------------------------------------- the emulator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator(port: int, bucket: str, log: Path) -> subprocess.Popen:
    exe = shutil.which("gcp-storage-emulator")
    cmd = [exe] if exe else [sys.executable, "-m", "gcp_storage_emulator"]
    proc = subprocess.Popen(cmd + ["start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                                   f"--default-bucket={bucket}"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("gcp-storage-emulator did not answer within 30 s")


# --------------------------------------------------------------------------- the fixture


# Variables a gs:// client must not see while it talks to the loopback bucket.
UNSET = ("GOOGLE_APPLICATION_CREDENTIALS", "http_proxy", "HTTP_PROXY")


@dataclasses.dataclass
class FakeGcs:
    bucket: str
    proxy: ProxyControl
    env: dict  # the variables that route gs:// traffic to the loopback bucket

    def url(self, *parts: str) -> str:
        """gs://BUCKET/<a fresh prefix>/parts... so tests never see each other's objects."""
        return "/".join([f"gs://{self.bucket}", *parts])

    def fresh(self, name: str = "t") -> str:
        return self.url(f"{name}-{uuid.uuid4().hex[:8]}")

    def client(self):
        from google.cloud import storage
        return storage.Client()

    def blob_names(self, prefix_url: str) -> list[str]:
        """Object names below a gs:// prefix, relative to it."""
        bucket, _, prefix = prefix_url[len("gs://"):].partition("/")
        prefix = prefix.rstrip("/") + "/"
        return sorted(b.name[len(prefix):] for b in self.client().list_blobs(bucket, prefix=prefix))

    def route(self, patch: pytest.MonkeyPatch) -> None:
        """Sends this process's gs:// traffic to the loopback bucket until ``patch`` undoes it."""
        for name in UNSET:
            patch.delenv(name, raising=False)
        for name, value in self.env.items():
            patch.setenv(name, value)

    def child_env(self, **extra: str) -> dict:
        """The environment for a subprocess that talks to the loopback bucket."""
        env = {k: v for k, v in os.environ.items() if k not in UNSET}
        return {**env, **self.env, **extra}


@pytest.fixture(scope="session")
def gcs_server():
    """The loopback GCS (emulator + proxy), started once; it changes no environment variable:
    tests take ``gcs`` (this process) or ``gcs.child_env()`` (subprocesses)."""
    pytest.importorskip("cryptography")
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("google.cloud.storage")
    folder = Path(tempfile.mkdtemp(prefix="cxr-gcs-"))
    ca, cert, key = make_certificates(folder)
    port = _free_port()
    emulator = start_emulator(port, BUCKET, folder / "emulator.log")
    proxy_proc, proxy_port = start_proxy(port, cert, key, folder / "proxy.log")
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    env = {
        "https_proxy": proxy_url, "HTTPS_PROXY": proxy_url,
        "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": str(ca),
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",  # TensorFlow: no OAuth, no metadata
        "NO_GCE_CHECK": "true",
        "STORAGE_EMULATOR_HOST": proxy_url,  # google-cloud-storage: anonymous, via the proxy
        "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "10000",  # fast retries of injected faults
    }
    try:
        yield FakeGcs(BUCKET, ProxyControl(proxy_port), env)
    finally:
        for proc in (proxy_proc, emulator):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """The loopback GCS with this process's gs:// traffic routed to it for one test only."""
    gcs_server.route(monkeypatch)
    return gcs_server


if __name__ == "__main__" and sys.argv[1:2] == ["--proxy"]:
    serve_proxy(int(sys.argv[2]), sys.argv[3], sys.argv[4])
