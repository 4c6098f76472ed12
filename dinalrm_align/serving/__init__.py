"""HTTP reward server and client (needs the ``serve`` extra: fastapi, uvicorn, httpx).

* :func:`~dinalrm_align.serving.app.create_app` / :class:`~dinalrm_align.serving.app.ServerSettings`
* :class:`~dinalrm_align.serving.engine.ScoringEngine` (validation + merged-batch scoring)
* :class:`~dinalrm_align.serving.batcher.MicroBatcher`
* :class:`~dinalrm_align.serving.client.RewardClient`, :class:`~dinalrm_align.serving.client.RemoteRewardError`
* :class:`~dinalrm_align.serving.background.BackgroundServer` (a server in a thread)
* payload format: :mod:`dinalrm_align.serving.wire`; command line: ``dinalrm-align serve``
"""

from __future__ import annotations

from dinalrm_align._lazy import lazy_exports

_LAZY = {
    "create_app": "app",
    "ServerSettings": "app",
    "ScoringEngine": "engine",
    "MicroBatcher": "batcher",
    "RewardClient": "client",
    "RemoteRewardError": "client",
    "RemoteScores": "client",
    "BackgroundServer": "background",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
