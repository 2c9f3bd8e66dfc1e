"""``diffusion-anomaly web``: one app process per browser session, behind one address.

A trame-slicer process holds one MRML scene, which every page connected to it would share.
So that two users never see each other's images, this front server gives each browser its
own process, and keeps those processes private:

- a session starts only when the user clicks *Start a session* on the front page (a POST
  from this site, not a bare GET, so crawlers and stray requests cost nothing), at most
  ``sessions_per_client`` per client address and ``max_sessions`` in all;
- each session process listens on a loopback port but answers only requests that carry
  its own random secret, which only this server knows and adds when it forwards (HTTP and
  WebSocket); another user of the machine who finds the port gets 403;
- a session's output is kept in memory only until it has started (to report a failed
  start) and then discarded: no log ever holds a patient's file or volume name;
- a session whose page has been gone for ``idle_seconds`` is stopped, and its scene with it.
"""

from __future__ import annotations

import asyncio
import collections
import html
import logging
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, Optional
from urllib.parse import urlsplit

import aiohttp
from aiohttp import WSMsgType, web

from DiffusionAnomalyLib.process_job import PACKAGE_PARENT

from .session_secret import SECRET_ENVIRONMENT, SECRET_HEADER

log = logging.getLogger("diffusion-anomaly.web")
COOKIE = "diffusion_anomaly_session"
# Hop-by-hop headers and those aiohttp recomputes; never forwarded.
DROPPED_HEADERS = {"host", "connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "proxy-connection", "te", "trailer"}
START_OUTPUT_CHARACTERS = 4000

FRONT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Diffusion Anomaly</title>
<style>body{{font-family:sans-serif;background:#121212;color:#eee;display:flex;align-items:center;justify-content:center;height:100vh;margin:0}}
main{{max-width:34em}}button{{font-size:1.1em;padding:.6em 1.4em;background:#1976d2;color:#fff;border:0;border-radius:4px;cursor:pointer}}
.note{{color:#ffb74d}}</style></head>
<body><main><h1>Diffusion Anomaly</h1>
<p>Anomaly maps of brain MRI with a classifier-guided diffusion model, in Slicer's views.
Each session has its own scene: nobody else sees the images you load.</p>
{note}
<form method="post" action="/session"><button id="start-session" type="submit">Start a session</button></form>
</main></body></html>
"""


@dataclass
class Session:
    process: asyncio.subprocess.Process
    port: int
    secret: str
    client: str
    output: Deque[str] = field(default_factory=lambda: collections.deque(maxlen=200))
    started: bool = False
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
        sessions_per_client: sessions at once from one client address.
        idle_seconds: how long a session lives on after its page was closed.
        start_timeout: seconds a new session may take to start.
    """

    def __init__(self, model: Optional[str] = None, max_sessions: int = 4, idle_seconds: float = 120.0, start_timeout: float = 180.0,
                 sessions_per_client: int = 2) -> None:
        self.model = model
        self.max_sessions = max_sessions
        self.sessions_per_client = sessions_per_client
        self.idle_seconds = idle_seconds
        self.start_timeout = start_timeout
        self.sessions: Dict[str, Session] = {}
        self._starting = asyncio.Lock()
        self._client: Optional[aiohttp.ClientSession] = None

    # -- lifecycle -------------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/healthz", self.health)
        app.router.add_post("/session", self.start_session)
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

    async def _start(self, client: str) -> str:
        session_id = secrets.token_urlsafe(24)
        port = _free_port()
        arguments = [sys.executable, "-m", "DiffusionAnomalyWeb.app", "--host", "127.0.0.1", "--port", str(port), "--server"]
        if self.model:
            arguments += ["--model", str(self.model)]
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, environment.get("PYTHONPATH", "")) if p)
        environment[SECRET_ENVIRONMENT] = secrets.token_urlsafe(32)
        process = await asyncio.create_subprocess_exec(*arguments, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=environment)
        session = Session(process, port, environment[SECRET_ENVIRONMENT], client)
        asyncio.create_task(self._drain(session))
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not session.alive():
                raise RuntimeError(f"the session process stopped while starting: {self._start_output(session)}")
            try:
                async with self._client.get(f"{session.url}/api/status", headers={SECRET_HEADER: session.secret}) as response:
                    if response.status == 200:
                        session.started = True
                        session.last_seen = time.monotonic()  # idle from now, not from the start of a slow start
                        session.output.clear()
                        self.sessions[session_id] = session
                        log.info("session on port %d started", port)
                        return session_id
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
        process.kill()
        raise RuntimeError(f"the session process did not start within {self.start_timeout:.0f} s")

    @staticmethod
    async def _drain(session: Session) -> None:
        """Reads the session's output so its pipe never fills; keeps it only until the session has started."""
        while True:
            line = await session.process.stdout.readline()
            if not line:
                return
            if not session.started:
                session.output.append(line.decode("utf-8", errors="replace"))

    @staticmethod
    def _start_output(session: Session) -> str:
        return "".join(session.output)[-START_OUTPUT_CHARACTERS:]

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

    # -- the front page and starting a session ----------------------------------------------------

    def _live_session(self, request: web.Request) -> Optional[Session]:
        session_id = request.cookies.get(COOKIE)
        session = self.sessions.get(session_id) if session_id else None
        return session if session is not None and session.alive() else None

    @staticmethod
    def _front_page(note: str = "", status: int = 200) -> web.Response:
        text = FRONT_PAGE.format(note=f'<p class="note" id="note">{html.escape(note)}</p>' if note else "")
        return web.Response(status=status, text=text, content_type="text/html")

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"sessions": len(self.sessions), "max_sessions": self.max_sessions})

    async def start_session(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.host:
            return web.Response(status=403, text="a session can only be started from this site's own page")
        if self._live_session(request) is not None:
            raise web.HTTPSeeOther("/")
        client = request.remote or "unknown"
        async with self._starting:
            if sum(s.client == client for s in self.sessions.values()) >= self.sessions_per_client:
                return self._front_page(f"This address already has {self.sessions_per_client} session(s) open: close one "
                                        "(sessions end shortly after their page is closed) and try again.", status=429)
            if len(self.sessions) >= self.max_sessions:
                return self._front_page(f"The server is busy ({self.max_sessions} sessions open): try again later.", status=503)
            try:
                session_id = await self._start(client)
            except RuntimeError as error:
                log.error("%s", error)
                return self._front_page("The session could not be started; the server's log says why.", status=503)
        response = web.HTTPSeeOther("/")
        response.set_cookie(COOKIE, session_id, httponly=True, samesite="Strict")
        raise response

    # -- forwarding --------------------------------------------------------------------------

    async def forward(self, request: web.Request) -> web.StreamResponse:
        session = self._live_session(request)
        if session is None:
            if request.method == "GET" and request.path in ("/", "/index.html"):
                return self._front_page()
            return web.Response(status=410, text="This session has ended: reload the page to start a new one.")
        session.last_seen = time.monotonic()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._forward_websocket(request, session)
        return await self._forward_http(request, session)

    @staticmethod
    def _upstream_headers(request: web.Request, session: Session) -> Dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS | {SECRET_HEADER.lower(), "cookie"}}
        headers[SECRET_HEADER] = session.secret
        return headers

    async def _forward_http(self, request: web.Request, session: Session) -> web.Response:
        async with self._client.request(request.method, session.url + request.path_qs, headers=self._upstream_headers(request, session),
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
            async with self._client.ws_connect(session.url + request.path_qs, max_msg_size=0,
                                               headers={SECRET_HEADER: session.secret}) as app:
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


def serve(host: str = "127.0.0.1", port: int = 8080, model: Optional[str] = None, max_sessions: int = 4, idle_seconds: float = 120.0,
          sessions_per_client: int = 2) -> None:
    """Runs the web app until interrupted; each browser gets its own session process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = SessionServer(model, max_sessions=max_sessions, idle_seconds=idle_seconds, sessions_per_client=sessions_per_client)
    print(f"Diffusion Anomaly web app at http://{host}:{port}/ (one session per browser, at most {max_sessions})", flush=True)
    web.run_app(server.application(), host=host, port=port, print=None, access_log=None)
