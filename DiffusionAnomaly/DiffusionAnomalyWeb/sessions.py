"""``diffusion-anomaly web``: one app process per browser session, behind one address.

A trame-slicer process holds one MRML scene, which every page connected to it would share.
So that two users never see each other's images, this front server gives each browser
its own process: the first page load starts ``DiffusionAnomalyWeb.app`` on a private
loopback port and sets a session cookie; every later request and the page's WebSocket
are forwarded to that process. A process whose page has been gone for ``idle_seconds``
is stopped, and its scene with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import aiohttp
from aiohttp import WSMsgType, web

from DiffusionAnomalyLib.jobs import PACKAGE_PARENT

log = logging.getLogger("diffusion-anomaly.web")
COOKIE = "diffusion_anomaly_session"
# Hop-by-hop headers and those aiohttp recomputes; never forwarded.
DROPPED_HEADERS = {"host", "connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "proxy-connection", "te", "trailer"}


@dataclass
class Session:
    process: asyncio.subprocess.Process
    port: int
    log_path: Path
    sockets: int = 0
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.returncode is None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SessionServer:
    """Starts, forwards to and stops the per-browser app processes.

    Args:
        model: the model bundle every session uses (default: the bundled one).
        max_sessions: sessions at once; further browsers are told the server is busy.
        idle_seconds: how long a session lives on after its page was closed.
        start_timeout: seconds a new session may take to start.
    """

    def __init__(self, model: Optional[str] = None, max_sessions: int = 4, idle_seconds: float = 120.0, start_timeout: float = 180.0) -> None:
        self.model = model
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self.start_timeout = start_timeout
        self.sessions: Dict[str, Session] = {}
        self._logs = Path(tempfile.mkdtemp(prefix="diffusion-anomaly-web-"))
        self._starting = asyncio.Lock()
        self._client: Optional[aiohttp.ClientSession] = None

    # -- lifecycle -------------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/healthz", self.health)
        app.router.add_route("*", "/{path:.*}", self.forward)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app) -> None:
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        self._reaper = asyncio.create_task(self._reap_idle())

    async def _on_cleanup(self, _app) -> None:
        self._reaper.cancel()
        for session_id in list(self.sessions):
            await self._stop(session_id)
        await self._client.close()

    async def _start(self) -> str:
        session_id = secrets.token_urlsafe(24)
        port = _free_port()
        log_path = self._logs / f"session-{port}.log"
        arguments = [sys.executable, "-m", "DiffusionAnomalyWeb.app", "--host", "127.0.0.1", "--port", str(port), "--server"]
        if self.model:
            arguments += ["--model", str(self.model)]
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, environment.get("PYTHONPATH", "")) if p)
        with open(log_path, "wb") as output:
            process = await asyncio.create_subprocess_exec(*arguments, stdout=output, stderr=asyncio.subprocess.STDOUT, env=environment)
        session = Session(process, port, log_path)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not session.alive():
                raise RuntimeError(f"the session process stopped while starting: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                async with self._client.get(f"{session.url}/api/status") as response:
                    if response.status == 200:
                        self.sessions[session_id] = session
                        log.info("session on port %d started", port)
                        return session_id
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
        process.kill()
        raise RuntimeError(f"the session process did not start within {self.start_timeout:.0f} s")

    async def _stop(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None or not session.alive():
            return
        session.process.terminate()
        try:
            await asyncio.wait_for(session.process.wait(), 10)
        except asyncio.TimeoutError:
            session.process.kill()
        log.info("session on port %d stopped", session.port)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.idle_seconds / 2))
            now = time.monotonic()
            for session_id, session in list(self.sessions.items()):
                if not session.alive() or (session.sockets == 0 and now - session.last_seen > self.idle_seconds):
                    await self._stop(session_id)

    # -- forwarding --------------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"sessions": len(self.sessions), "max_sessions": self.max_sessions})

    async def forward(self, request: web.Request) -> web.StreamResponse:
        session_id = request.cookies.get(COOKIE)
        session = self.sessions.get(session_id) if session_id else None
        new_id = None
        if session is None or not session.alive():
            if request.method != "GET" or request.path not in ("/", "/index.html"):
                return web.Response(status=410, text="This session has ended: reload the page to start a new one.")
            async with self._starting:
                if len(self.sessions) >= self.max_sessions:
                    return web.Response(status=503, text=f"The server is busy ({self.max_sessions} sessions open): try again later.")
                try:
                    new_id = await self._start()
                except RuntimeError as error:
                    log.error("%s", error)
                    return web.Response(status=503, text=f"Could not start a session: {error}")
            session = self.sessions[new_id]
        session.last_seen = time.monotonic()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._forward_websocket(request, session)
        response = await self._forward_http(request, session)
        if new_id is not None:
            response.set_cookie(COOKIE, new_id, httponly=True, samesite="Strict")
        return response

    async def _forward_http(self, request: web.Request, session: Session) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS}
        async with self._client.request(request.method, session.url + request.path_qs, headers=headers,
                                        data=await request.read() if request.can_read_body else None,
                                        allow_redirects=False) as upstream:
            body = await upstream.read()
            reply_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in DROPPED_HEADERS | {"set-cookie"}}
            return web.Response(status=upstream.status, body=body, headers=reply_headers)

    async def _forward_websocket(self, request: web.Request, session: Session) -> web.WebSocketResponse:
        browser = web.WebSocketResponse(max_msg_size=0)
        await browser.prepare(request)
        session.sockets += 1
        try:
            async with self._client.ws_connect(session.url + request.path_qs, max_msg_size=0) as app:
                async def pump(source, sink) -> None:
                    async for message in source:
                        if message.type == WSMsgType.TEXT:
                            await sink.send_str(message.data)
                        elif message.type == WSMsgType.BINARY:
                            await sink.send_bytes(message.data)
                        else:
                            break
                    await sink.close()

                pumps = [asyncio.create_task(pump(browser, app)), asyncio.create_task(pump(app, browser))]
                _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
        except aiohttp.ClientError as error:
            log.warning("session on port %d: %s", session.port, error)
        finally:
            session.sockets -= 1
            session.last_seen = time.monotonic()
            if not browser.closed:
                await browser.close()
        return browser


def serve(host: str = "127.0.0.1", port: int = 8080, model: Optional[str] = None, max_sessions: int = 4, idle_seconds: float = 120.0) -> None:
    """Runs the web app until interrupted; each browser gets its own session process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = SessionServer(model, max_sessions=max_sessions, idle_seconds=idle_seconds)
    print(f"Diffusion Anomaly web app at http://{host}:{port}/ (one session per browser, at most {max_sessions})", flush=True)
    web.run_app(server.application(), host=host, port=port, print=None, access_log=None)
