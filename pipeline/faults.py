"""Deterministic fault injection for the crash-safety tests (inactive unless an env var is set).

``ANAUS_PRECOMPUTE_KILL_AT="<point>:<n>"`` makes the process SIGKILL itself the n-th time it
passes ``<point>``. Points: ``sample`` (a sample's pyramid entry is in the cache), ``shard``
(a shard file is final, its info sidecar not yet written), ``index`` (all shards final, the
index not yet written), ``cleanup`` (the new index is in place, stale shards not yet deleted).
The counter is per process; tests use it with in-process (``--workers 0``) execution.

``ANAUS_PRECOMPUTE_PAUSE_AT="<point>:<n>:<seconds>"`` sleeps instead, once (the concurrent-run
test uses it to hold a run open while a second one tries the same directory).
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "ANAUS_PRECOMPUTE_KILL_AT"
PAUSE_VAR = "ANAUS_PRECOMPUTE_PAUSE_AT"
_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    kill, pause = os.environ.get(ENV_VAR), os.environ.get(PAUSE_VAR)
    if not kill and not pause:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if kill:
        point, _, count = kill.partition(":")
        if point == name and _passes[name] >= int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
    if pause:
        point, _, rest = pause.partition(":")
        count, _, seconds = rest.partition(":")
        if point == name and _passes[name] == int(count or 1):
            import time

            time.sleep(float(seconds or 1.0))
