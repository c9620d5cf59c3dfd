"""pytest plugin of the GPU run (``-p benchmarks.gpu_order``): the tests ordered by the backend they speak for,
shared kernel tests first, then cuda, triton, torch, then the rest (``benchmarks.gpu_run.PRIORITY``; the file order
kept within each), so that a run its cap stops has completed the first backends' tests; and, with
``GPU_RUN_COLLECTED`` set, the collected node ids written there, one a line, so that the verdict knows which tests
did not run. Under pytest-xdist every worker collects and sorts the same list (the same order on each, as xdist
requires); the first to get there writes the file."""

from __future__ import annotations

import os

from benchmarks.gpu_run import PRIORITY, classify, junit_id


def pytest_collection_modifyitems(session, config, items):
    rank = {group: i for i, group in enumerate(PRIORITY)}
    items.sort(key=lambda item: rank[classify(*junit_id(item.nodeid))])
    path = os.environ.get("GPU_RUN_COLLECTED")
    if path and not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(item.nodeid + "\n" for item in items)
        os.replace(tmp, path)
