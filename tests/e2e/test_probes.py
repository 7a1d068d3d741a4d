"""Probes that mean something, checked on real `wisp-cli serve` processes and a real (private)
Redis; each test fails on the code before the change it covers.

* Redis not reachable yet (in Kubernetes its volume may still be provisioning): the probe
  endpoint is up at once, /healthz 200 and /readyz 503 naming Redis, the process keeps retrying
  past the old 10 s give-up with one clear log line per attempt, and turns ready once Redis
  answers. It used to start the endpoint only after reaching Redis and exit after 10 s, so the
  pods crash-looped.
* SIGTERM: /readyz answers 503 for as long as the process drains (a gateway finishing a request
  in flight), instead of the endpoint closing at once.
* A stuck model thread (a drafter whose tokenizer call never returns, injected through a
  ``sitecustomize`` like tests/sabotage.py) fails /healthz once it has made no progress for
  longer than the bound (``WISP_DRAIN_TIMEOUT_S``) while work waits; idle, it stays alive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from wisp.bus import Keys
from wisp.services.runner import EmbeddedRedis, free_port

from tests.harness import CLI, service_env

PASSWORD = "probe-test-password"


def _get(port: int, path: str) -> tuple[int | None, str]:
    """(status, body) of GET ``path``; (None, why) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return None, str(err)


def _until(pred: Callable[[], bool], timeout_s: float, proc: subprocess.Popen[bytes], log: Path,
           what: str) -> None:
    """Poll ``pred`` until it holds; fail with the log if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert proc.poll() is None, f"exited with {proc.returncode} while waiting for {what}:\n" \
                                    f"{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s:\n" \
                                            f"{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _serve(role: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([*CLI, "serve", role], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, with a password, as in the cluster."""
    with EmbeddedRedis(password=PASSWORD) as server:
        yield server


def _env(port: int, http_port: int, ns: str, **settings: object) -> dict[str, str]:
    return service_env(f"redis://127.0.0.1:{port}/0", ns, http_port=http_port,
                       redis_password=PASSWORD, **settings)


def test_probe_endpoint_is_up_before_redis_and_ready_once_it_answers(tmp_path: Path) -> None:
    redis_port, http_port = free_port(), free_port()
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    log = tmp_path / "estimator.log"
    proc = _serve("estimator", _env(redis_port, http_port, ns, name="e1"), log)
    server = EmbeddedRedis(port=redis_port, password=PASSWORD)
    try:
        _until(lambda: _get(http_port, "/healthz")[0] == 200, 30, proc, log, "/healthz 200")
        status, body = _get(http_port, "/readyz")
        assert status == 503 and f"127.0.0.1:{redis_port}" in json.loads(body)["redis"], body
        # past the old 10 s give-up: still running, one line per attempt saying what it waits for
        _until(lambda: "still retrying" in log.read_text(), 30, proc, log, "a retry log line")
        line = next(x for x in log.read_text().splitlines() if "still retrying" in x)
        assert f"cannot reach Redis at redis://127.0.0.1:{redis_port}/0" in line, line
        assert PASSWORD not in log.read_text()
        assert _get(http_port, "/readyz")[0] == 503
        server.start()
        _until(lambda: _get(http_port, "/readyz")[0] == 200, 30, proc, log, "/readyz 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        server.cleanup()


def test_readiness_is_503_while_draining(private_redis: EmbeddedRedis, tmp_path: Path) -> None:
    """A gateway with a request in flight drains for up to uvicorn's 5 s grace; all that time
    /readyz must answer, and answer 503."""
    http_port, api_port = free_port(), free_port()
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    log = tmp_path / "gateway.log"
    proc = _serve("gateway", _env(private_redis.port, http_port, ns, name="g1",
                                  api_port=api_port, api_host="127.0.0.1"), log)
    # a drafter's heartbeat (none runs): the request is queued and waits for its answer
    admin = redis.Redis(port=private_redis.port, password=PASSWORD)
    admin.set(Keys(ns).heartbeat("drafter", "d1"), json.dumps({"name": "d1", "ready": True}), ex=60)
    try:
        _until(lambda: _get(http_port, "/readyz")[0] == 200, 60, proc, log, "/readyz 200")
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": "hello", "max_tokens": 4}).encode()

        def in_flight() -> None:
            req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=30).read()
            except OSError:
                pass

        client = threading.Thread(target=in_flight, daemon=True)
        client.start()
        _until(lambda: admin.xlen(Keys(ns).requests) > 0, 10, proc, log, "the request queued")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        answers: list[tuple[float, int | None]] = []
        while proc.poll() is None and time.monotonic() - t0 < 30:
            answers.append((time.monotonic() - t0, _get(http_port, "/readyz")[0]))
            time.sleep(0.05)
        drained = time.monotonic() - t0
        assert proc.wait(5) == 0, log.read_text()[-2000:]
        assert 200 not in {s for _, s in answers}, answers
        answered = [t for t, s in answers if s == 503]
        # refused only once the drain is over (the endpoint closes as the process exits)
        refused = [t for t, s in answers if s is None]
        assert answered and answered[-1] >= 1.0 and all(t > answered[-1] for t in refused), (
            f"/readyz must keep answering 503 while the gateway drains ({drained:.1f} s): "
            f"{len(answered)} answers, the last at {answered[-1] if answered else 0:.2f} s; "
            f"{len(refused)} refused from {refused[0] if refused else 0:.2f} s")
        assert drained < 15, drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


STALL = '''
import importlib.util
import os
import time

# first any other sitecustomize on the path (tests/sabotage.py's, coverage's): this one shadows it
_here = os.path.dirname(os.path.abspath(__file__))
for _folder in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    _other = os.path.join(_folder, "sitecustomize.py")
    if _folder and os.path.abspath(_folder) != _here and os.path.exists(_other):
        _spec = importlib.util.spec_from_file_location("_next_sitecustomize", _other)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break

from wisp.services.drafter import service as _drafter

_tokenize = _drafter.DrafterService._tokenize

def _stalled(self, req):
    if "STALL" in (req.prompt or ""):
        time.sleep(60)
    return _tokenize(self, req)

_drafter.DrafterService._tokenize = _stalled
'''


def test_healthz_fails_when_the_model_thread_is_stuck(private_redis: EmbeddedRedis,
                                                       tiny_pair: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    target, _ = tiny_pair
    (tmp_path / "stall").mkdir()
    (tmp_path / "stall" / "sitecustomize.py").write_text(STALL)
    http_port = free_port()
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    bound = 2.0
    env = _env(private_redis.port, http_port, ns, name="d1", mode="centralized",
               target_model=target, drain_timeout_s=bound)
    old = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{tmp_path / 'stall'}{os.pathsep}{old}" if old else str(tmp_path / "stall")
    log = tmp_path / "drafter.log"
    proc = _serve("drafter", env, log)
    submit = None
    try:
        _until(lambda: _get(http_port, "/readyz")[0] == 200, 120, proc, log, "/readyz 200")
        time.sleep(bound + 1)
        assert _get(http_port, "/healthz") == (200, "ok\n"), "an idle model thread is alive"
        submit = subprocess.Popen([*CLI, "submit", "STALL here", "--via-redis", "--max-new-tokens",
                                   "4"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        _until(lambda: _get(http_port, "/healthz")[0] == 503, 30, proc, log, "/healthz 503")
        assert time.monotonic() - t0 >= bound, "liveness failed before the bound"
        status, body = _get(http_port, "/healthz")
        assert status == 503 and "no progress" in json.loads(body)["model_thread"], body
    finally:
        for p in (submit, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
