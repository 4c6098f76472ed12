"""HTTP reward server and client (needs the ``serve`` extra: fastapi, uvicorn, httpx).

* :func:`~dinalrm_align.serving.app.create_app` / :class:`~dinalrm_align.serving.settings.ServerSettings`
  (limits, queue bounds, token)
* :class:`~dinalrm_align.serving.engine.ScoringEngine` (validation + merged-batch scoring)
* :class:`~dinalrm_align.serving.batcher.MicroBatcher`
* :class:`~dinalrm_align.serving.client.RewardClient`, :class:`~dinalrm_align.serving.client.RemoteRewardError`
* :class:`~dinalrm_align.serving.background.BackgroundServer` (a server in a thread),
  :class:`~dinalrm_align.serving.runner.RewardServer` (uvicorn with a fast graceful shutdown)
* ``python -m dinalrm_align.serving.loadtest``: throughput, flood and SIGTERM measurements
* payload format: :mod:`dinalrm_align.serving.wire`; command line: ``dinalrm-align serve``
"""

from __future__ import annotations

from dinalrm_align._lazy import lazy_exports

_LAZY = {
    "create_app": "app",
    "ServerSettings": "settings",
    "ScoringEngine": "engine",
    "MicroBatcher": "batcher",
    "RewardClient": "client",
    "RemoteRewardError": "client",
    "RemoteScores": "client",
    "BackgroundServer": "background",
    "RewardServer": "runner",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
