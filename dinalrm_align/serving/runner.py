"""Run the reward app under uvicorn with a fast, graceful shutdown, and warn about open binds.

uvicorn's graceful shutdown (SIGTERM / SIGINT, or ``server.should_exit = True``) stops accepting
connections, waits for open requests up to ``timeout_graceful_shutdown`` (here the settings'
``shutdown_timeout_s``; then it cancels them) and runs the app's lifespan shutdown. Requests
queued for the model would each wait for a forward pass, so :class:`RewardServer` first tells
the micro-batcher to answer them 503 (only the pass in progress finishes): shutdown takes about
one forward pass, not the whole queue.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import uvicorn

from dinalrm_align.serving.settings import TOKEN_ENV


class RewardServer(uvicorn.Server):
    """``uvicorn.Server`` that sheds the app's queued work as soon as shutdown starts."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        batcher = getattr(getattr(self.config.app, "state", None), "batcher", None)
        if batcher is not None:
            batcher.begin_shutdown()
        await super().shutdown(sockets)


def server_config(
    app: Any, *, host: str, port: int, log_level: str = "info", **kwargs: Any
) -> uvicorn.Config:
    """uvicorn config for ``create_app(...)``: graceful-shutdown timeout from the app's settings."""
    settings = getattr(app.state, "settings", None)
    timeout = kwargs.pop("timeout_graceful_shutdown", getattr(settings, "shutdown_timeout_s", None))
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=timeout,
        **kwargs,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, token: str | None) -> str | None:
    """The warning to print when binding ``host`` without a token exposes the server, else ``None``."""
    if token or is_loopback(host):
        return None
    return (
        f"warning: binding {host} makes the reward server reachable from other machines without "
        f"authentication; anyone who can connect can use the model. Set {TOKEN_ENV} (or pass --token) "
        "so that every request needs 'Authorization: Bearer <token>', or bind 127.0.0.1."
    )
