"""One BLAS thread per process unless the operator asks for more.

numpy's OpenBLAS starts a thread per core for every dot product and matrix-vector product. The
vectors FLQ multiplies (norms of a model update, the aggregate's weighted sum over workers) are
memory-bound, and the processes that compute them share their cores with TensorFlow, gRPC and
each other (a simulation, a board's worker). There the threads only wait on each other: on the
2-core test box under load, the squared norm of the 468k-parameter CNN update took 700 ms with
OpenBLAS's default threads and 32 ms with one (docs/benchmarks.md). TensorFlow's own thread pools
are not BLAS's and are not touched. OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or MKL_NUM_THREADS in
the environment win: then nothing is changed.
"""

from __future__ import annotations

import os

_OPERATOR_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def limit_blas_threads() -> bool:
    """Limit numpy's BLAS to one thread for this process; False (nothing changed) when the
    environment already sets a thread count."""
    if any(os.environ.get(name) for name in _OPERATOR_SETTINGS):
        return False
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")  # stays in force: no context manager
    return True
