"""flq.blas: one BLAS thread per process unless the environment sets a count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, numpy
from threadpoolctl import threadpool_info
from flq.blas import limit_blas_threads
before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
changed = limit_blas_threads()
after = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
print(json.dumps({"before": before, "changed": changed, "after": after}))
"""


def _probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_numpy_blas_is_limited_to_one_thread() -> None:
    probe = _probe()
    assert probe["changed"] is True
    assert probe["after"] and all(n == 1 for n in probe["after"])  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_a_thread_count_from_the_operator_wins(name: str) -> None:
    probe = _probe(**{name: "2"})
    assert probe["changed"] is False
    assert probe["after"] == probe["before"]
