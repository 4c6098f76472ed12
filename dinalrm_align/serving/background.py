"""Run the reward server in a background thread of this process (tests, notebooks, examples)."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any


class BackgroundServer:
    """``with BackgroundServer(app) as server: RewardClient(server.url)``; always shut down on exit.

    Binds ``host`` (loopback by default) on ``port`` (0 = a free port chosen by the OS). The server
    is a :class:`~dinalrm_align.serving.runner.RewardServer`: ``stop()`` is the same graceful
    shutdown as SIGTERM on ``dinalrm-align serve``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0) -> None:
        from dinalrm_align.serving.runner import RewardServer, exposure_warning, server_config

        settings = getattr(app.state, "settings", None)
        warning = exposure_warning(host, getattr(settings, "token", None))
        if warning:
            warnings.warn(warning, stacklevel=2)
        config = server_config(app, host=host, port=port, log_level="warning", access_log=False)
        self._server = RewardServer(config)
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self._server.run, name="reward-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the reward server failed to start (see its log)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the reward server did not start within {self.start_timeout} s")
            time.sleep(0.01)
        sockets = [s for server in self._server.servers for s in server.sockets]
        self.port = int(sockets[0].getsockname()[1])
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
