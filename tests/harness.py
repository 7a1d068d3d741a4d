"""Run WISP services as real processes (`wisp-cli serve ROLE`) against a real Redis, and submit
through the real CLI (`wisp-cli submit --json`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

CLI = [sys.executable, "-m", "wisp.services.cli"]


def redis_answers(url: str) -> bool:
    """Whether a Redis answers PING at ``url`` within half a second."""
    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        ok = bool(r.ping())
        r.close()
        return ok
    except (redis.RedisError, OSError):
        return False


def clean_namespace(redis_url: str, namespace: str) -> None:
    """Delete every key under ``namespace`` (a test's own prefix; never anyone else's keys)."""
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


def service_env(redis_url: str, namespace: str, **settings: Any) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "WISP_REDIS_URL": redis_url,
        "WISP_NAMESPACE": namespace,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        # a drafter's own API binds 127.0.0.1:8000 by default: the tests' many drafters would
        # race for it; the test of that API turns it on with a free port
        "WISP_DEVICE_API": "false",
    })
    for k, v in settings.items():
        env[f"WISP_{k.upper()}"] = str(v)
    return env


@dataclass
class Cluster:
    """A set of service processes sharing one Redis namespace."""

    redis_url: str
    namespace: str
    log_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self, **extra: Any) -> dict[str, str]:
        merged = {**self.settings, **extra}
        return service_env(merged.pop("redis_url", self.redis_url), self.namespace, **merged)

    def start(self, role: str, name: str, threads: int = 1, **extra: Any) -> None:
        """Start `wisp-cli serve ROLE` as ``name``; ``threads`` is its torch/OpenMP thread count
        (1 by default: many processes share two cores in the tests)."""
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        env = self.env(**extra)
        env["OMP_NUM_THREADS"] = str(threads)
        self.procs[name] = subprocess.Popen(
            [*CLI, "serve", role, "--name", name], env=env,
            stdout=log, stderr=subprocess.STDOUT,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(name)
        p.send_signal(sig)
        p.wait(30)

    def wait_ready(self, names: Sequence[str], timeout_s: float = 180.0) -> None:
        """Until every named service heartbeats ready=True; fail fast if one exits."""
        r = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                ready = set()
                for key in r.scan_iter(match=f"{self.namespace}:hb:*"):
                    raw = r.get(key)
                    if raw:
                        info = json.loads(raw)
                        if info.get("ready"):
                            ready.add(info["name"])
                if set(names) <= ready:
                    return
                for n, p in self.procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{n} exited with {p.returncode}:\n{self.log(n)[-3000:]}")
                time.sleep(0.2)
        finally:
            r.close()
        raise TimeoutError(f"services not ready: {set(names)}; logs: {self.log_dir}")

    def http_port(self, name: str, timeout_s: float = 60.0) -> int:
        """The HTTP port ``name`` bound, from its log. Start a service with ``http_port=0`` and
        read its port here: a port picked before the process binds it can be taken meanwhile
        (CI saw it twice: "address already in use"); the kernel's choice at bind time cannot."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(r"probes and metrics on http://[^:\s]+:(\d+)", self.log(name))
            if found:
                return int(found.group(1))
            p = self.procs.get(name)
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log(name)[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{name} logged no HTTP port in {timeout_s:.0f} s")

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def cli(args: Sequence[str], env: dict[str, str], timeout: float = 600.0,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, input=stdin)


def submit_json(prompt: str, env: dict[str, str], *args: str, timeout: float = 600.0) -> dict[str, Any]:
    res = cli(["submit", prompt, "--json", *args], env, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"submit failed ({res.returncode}): {res.stderr.strip()}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def spawn_submit(prompt: str, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Start `wisp-cli submit --json` without waiting (for concurrent requests)."""
    return subprocess.Popen([*CLI, "submit", prompt, "--json", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(p: subprocess.Popen[str], timeout: float = 600.0) -> dict[str, Any]:
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"submit failed ({p.returncode}): {err.strip()}")
    return json.loads(out.strip().splitlines()[-1])


def api_get(url: str, timeout: float = 30.0) -> Any:
    """GET a JSON answer of the HTTP API (plain urllib: the test checks the wire, not a client)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def api_completion(api: str, model: str, prompt: str, max_tokens: int,
                   timeout: float = 120.0) -> Any:
    """A greedy, non-streamed ``/v1/completions`` request to the API at ``api`` (``.../v1``)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{api}/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())
