"""A minimal HTTP endpoint per service process: ``/healthz`` (liveness), ``/readyz`` (readiness)
and Prometheus ``/metrics``. asyncio streams only: no web framework for three routes.

What the probes mean (Kubernetes acts on them, so each must say something it can act on):

* ``/readyz`` 200 only while every service of the process is set up, connected to Redis and
  not draining; 503 with a JSON reason otherwise: still connecting to Redis, loading a model,
  or draining after SIGTERM. The endpoint stays up through the drain (answering 503), so the
  kubelet sees "not ready", not a refused connection it might take for a crash.
* ``/healthz`` 200 while the process is worth keeping: its event loop answers (a blocked loop
  times the probe out) and, with ``live`` given, no model thread is stuck (the services'
  watchdog, ``Service.live``); 503 with a JSON reason otherwise, so the kubelet restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

Check = Callable[[], tuple[bool, dict[str, Any]]]
"""A probe's verdict: (passed, details for the JSON body)."""


async def serve_http(host: str, port: int, ready: Check, live: Check | None = None
                     ) -> asyncio.base_events.Server:
    """Serve the three routes on ``host:port``. ``ready`` decides ``/readyz``; ``live`` (None:
    always alive) decides ``/healthz``, whose body stays ``ok`` while alive."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
            if path == "/healthz":
                ok, detail = _check(live) if live is not None else (True, {})
                if ok:
                    status, ctype, body = 200, "text/plain", b"ok\n"
                else:
                    status, ctype = 503, "application/json"
                    body = json.dumps({"live": False, **detail}).encode() + b"\n"
            elif path == "/readyz":
                ok, detail = _check(ready)
                status, ctype = (200 if ok else 503), "application/json"
                body = json.dumps({"ready": ok, **detail}).encode() + b"\n"
            elif path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest()
            else:
                status, ctype, body = 404, "text/plain", b"not found: try /healthz /readyz /metrics\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError, UnicodeDecodeError):
            pass
        except asyncio.CancelledError:
            # the process is exiting (asyncio.run cancels what is left) with a probe in
            # mid-request: drop that connection quietly. Re-raised, asyncio 3.11 would log the
            # cancelled connection task as an error with a traceback.
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    return await asyncio.start_server(handle, host, port)


def _check(check: Check) -> tuple[bool, dict[str, Any]]:
    """Run a probe's check; one that raises fails the probe with the error as its reason
    (instead of a dropped connection, which says nothing)."""
    try:
        return check()
    except Exception as err:  # noqa: BLE001 - the probe's answer is the report
        return False, {"error": repr(err)}
