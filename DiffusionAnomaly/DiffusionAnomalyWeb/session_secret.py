"""The secret that lets only the front server talk to a session process (no Slicer, no trame: both sides import it)."""

from __future__ import annotations

import hmac

from aiohttp import web

SECRET_HEADER = "X-Diffusion-Anomaly-Session"
# Passed in the environment, not on the command line, where every user of the machine could read it.
SECRET_ENVIRONMENT = "DIFFUSION_ANOMALY_SESSION_SECRET"


def require_secret(secret: str):
    """An aiohttp middleware that answers 403 to any request without the session's secret."""

    @web.middleware
    async def check(request: web.Request, handler):
        if not hmac.compare_digest(request.headers.get(SECRET_HEADER, ""), secret):
            return web.Response(status=403, text="forbidden")
        return await handler(request)

    return check
