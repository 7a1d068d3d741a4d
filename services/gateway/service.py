"""The gateway service: the OpenAI-compatible HTTP API (``app``) served by uvicorn inside a
WISP ``Service``, so it heartbeats, stops and drains like every other role (``wisp-cli serve
gateway``; ``wisp-cli up`` runs one on 127.0.0.1:8000)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from wisp.bus import Bus
from wisp.service import Service
from wisp.settings import Settings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the process's services stop together on
    SIGINT/SIGTERM (``run_services``), and uvicorn re-raising the signal after its shutdown
    would stop the others a second time."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayService(Service):
    role = "gateway"

    def __init__(self, settings: Settings, bus: Bus, name: str | None = None) -> None:
        super().__init__(settings, bus, name)
        self.sock: socket.socket | None = None
        self.server: _Server | None = None

    @property
    def base_url(self) -> str:
        """The API's base URL as clients use it (``.../v1``)."""
        host, port = self.settings.api_host, self.settings.api_port
        if self.sock is not None:
            port = self.sock.getsockname()[1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{port}/v1"

    def heartbeat_info(self) -> dict[str, Any]:
        return {**super().heartbeat_info(), "url": self.base_url}

    async def setup(self) -> None:
        """Bind the port now, so a port in use is a one-line error at start (uvicorn itself
        would exit the whole process)."""
        s = self.settings
        family = socket.AF_INET6 if ":" in s.api_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.api_host, s.api_port))
        except OSError as err:
            sock.close()
            raise OSError(f"the API cannot listen on {s.api_host}:{s.api_port}: {err.strerror} "
                          "(choose another with --api-port / WISP_API_PORT)") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.sock = sock

    def loops(self) -> list:
        return [self.serve_loop]

    async def serve_loop(self) -> None:
        from wisp.services.gateway.app import create_app

        assert self.sock is not None
        config = uvicorn.Config(create_app(self.settings, self.bus), log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        self.server = _Server(config)
        task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.server.should_exit = True
            stop.cancel()
            await task

    async def teardown(self) -> None:
        if self.sock is not None:
            self.sock.close()
