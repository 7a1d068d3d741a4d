"""The probe endpoint and the model thread's watchdog, in process (fast; the real-process
versions are in tests/e2e/test_probes.py).

* ``serve_http``: /healthz answers 503 with the reason when the liveness check fails (it used to
  answer 200 whatever happened), /readyz 503 when not ready, and a check that raises fails its
  probe with the error instead of dropping the connection;
* ``Service.live``: a model call that makes no progress for longer than the bound while work
  waits on it fails liveness; an idle thread, a call that reports progress, and calls during
  ``setup`` (model loads) do not;
* ``run_services`` with a probe port: the endpoint answers before Redis is reachable (/healthz
  200, /readyz 503 naming Redis) and a stop while waiting for Redis ends it cleanly.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from wisp.bus import Keys
from wisp.httpd import serve_http
from wisp.service import Service
from wisp.services.runner import free_port, run_services
from wisp.settings import Settings


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_healthz_and_readyz_report_their_checks() -> None:
    verdict: dict[str, Any] = {"live": (True, {}), "ready": (False, {"why": "loading"})}

    def boom() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("bug in a check")

    port = free_port()
    server = await serve_http("127.0.0.1", port, lambda: verdict["ready"], lambda: verdict["live"])
    try:
        assert await _get(port, "/healthz") == (200, "ok\n")
        status, body = await _get(port, "/readyz")
        assert status == 503 and json.loads(body) == {"ready": False, "why": "loading"}
        verdict["ready"] = (True, {})
        assert (await _get(port, "/readyz"))[0] == 200
        verdict["live"] = (False, {"model_thread": "stuck"})
        status, body = await _get(port, "/healthz")
        assert status == 503 and json.loads(body) == {"live": False, "model_thread": "stuck"}
    finally:
        server.close()
    port = free_port()
    server = await serve_http("127.0.0.1", port, boom, boom)
    try:
        for path in ("/healthz", "/readyz"):
            status, body = await _get(port, path)
            assert status == 503 and "bug in a check" in body, (path, body)
    finally:
        server.close()


class _Bus:
    keys = Keys("wisp-test-probes")


class _Model(Service):
    role = "verifier"
    watchdog_s = 0.3


def _service() -> _Model:
    return _Model(Settings(), _Bus(), name="v")  # type: ignore[arg-type]


async def test_watchdog_fails_liveness_only_for_a_stuck_call_with_work_pending() -> None:
    svc = _service()
    release = threading.Event()
    # during setup (a model load) nothing is judged, however long it takes
    loading = asyncio.ensure_future(svc.in_worker(release.wait, 5))
    await asyncio.sleep(0.5)
    assert svc.live() == (True, {})
    release.set()
    await loading
    svc._set_up = True  # what run() does once setup returned
    await asyncio.sleep(0.5)
    assert svc.live() == (True, {}), "an idle model thread is not stuck"
    release.clear()
    stuck = asyncio.ensure_future(svc.in_worker(release.wait, 5))
    queued = asyncio.ensure_future(svc.in_worker(time.sleep, 0))
    await asyncio.sleep(0.1)
    assert svc.live()[0], "within the bound"
    await asyncio.sleep(0.4)
    ok, detail = svc.live()
    assert not ok and "no progress" in detail["model_thread"] and "2 call(s)" in detail["model_thread"]
    release.set()
    await asyncio.gather(stuck, queued)
    assert svc.live() == (True, {})


async def test_a_call_not_yet_picked_up_by_an_idle_thread_is_not_stuck() -> None:
    """An idle thread's last progress is long past when work arrives; until the thread starts
    the call (here: it is held up by something outside ``in_worker``, as a loaded machine's
    scheduler holds it up for a moment) the work has waited only since it arrived. On the code
    before, liveness failed at once (a CI run's /healthz went 503 before the bound)."""
    from concurrent.futures import ThreadPoolExecutor

    svc = _service()
    svc._set_up = True
    svc._pool = ThreadPoolExecutor(max_workers=1)
    hold = threading.Event()
    svc._pool.submit(hold.wait, 5)  # the one thread, busy outside in_worker
    await asyncio.sleep(0.5)  # idle past the 0.3 s bound
    call = asyncio.ensure_future(svc.in_worker(time.sleep, 0))
    await asyncio.sleep(0.05)
    assert svc.live()[0], "the call has waited 0.05 s, not the idle time before it"
    hold.set()
    await call


async def test_a_long_call_that_reports_progress_stays_alive() -> None:
    svc = _service()
    svc._set_up = True

    def chunked() -> None:
        for _ in range(8):
            time.sleep(0.1)
            svc.report_progress()

    call = asyncio.ensure_future(svc.in_worker(chunked))
    verdicts = []
    while not call.done():
        verdicts.append(svc.live()[0])
        await asyncio.sleep(0.05)
    assert verdicts and all(verdicts)


def test_watchdog_bound_follows_the_drain_timeout() -> None:
    class Plain(Service):
        role = "drafter"

    svc = Plain(Settings(drain_timeout_s=42), _Bus(), name="d")  # type: ignore[arg-type]
    assert svc.watchdog_bound_s == 42
    off = Plain(Settings(drain_timeout_s=0), _Bus(), name="d")  # type: ignore[arg-type]
    off._set_up, off._worker_calls, off._worker_progress = True, 1, time.monotonic() - 1e6
    assert off.live() == (True, {}), "drain timeout 0: no watchdog"
    # the operator's WISP_WATCHDOG_S wins over the role's bound and the drain timeout
    slow = Plain(Settings(drain_timeout_s=42, watchdog_s=600), _Bus(), name="d")  # type: ignore[arg-type]
    slow.watchdog_s = 5.0
    assert slow.watchdog_bound_s == 600


async def test_probe_endpoint_answers_before_redis_and_stops_cleanly() -> None:
    port, dead = free_port(), free_port()  # nothing listens on `dead`
    settings = Settings(http_port=port, http_host="127.0.0.1")
    stop = asyncio.Event()
    task = asyncio.create_task(run_services(["estimator"], settings,
                                            f"redis://127.0.0.1:{dead}/0", stop=stop))
    deadline = time.monotonic() + 10
    while True:
        try:
            status, _ = await _get(port, "/healthz")
            break
        except OSError:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.05)
    assert status == 200
    status, body = await _get(port, "/readyz")
    assert status == 503 and f"127.0.0.1:{dead}" in json.loads(body)["redis"], body
    stop.set()
    await asyncio.wait_for(task, 5)  # no exception: stopped while waiting is a clean stop
    with pytest.raises(OSError):
        await _get(port, "/healthz")
