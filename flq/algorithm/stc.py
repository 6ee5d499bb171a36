"""Sparse ternary compression of a whole model update (Sattler et al., arXiv 1903.02891, Alg. 1).

The top k = max(1, round(p * n)) values of the update, over all its tensors together (n is the
model's parameter count), become +-mu with mu their mean magnitude; everything else becomes 0.
Each tensor travels as a sparse ternary tensor (flq/codec/sparse.py) holding its share of the k
positions, Golomb-coded with the parameter that is optimal for its own density, or as gap classes
under a Huffman code (flq/codec/gapclass.py), whichever is smaller for that tensor. Selection is a
partition (np.argpartition), O(n), not a sort.

The error accumulation around it (what was not sent is added to the next update) lives with the
caller's state: the worker's UploadReference residual and, on the downlink, the gap between the
master's model and the reference the workers hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flq.codec import Codec, EncodedTensor
from flq.codec.sparse import check_density, keep_count, ternary_tensor, top_k


def sparsify(
    values: Sequence[np.ndarray], density: float, gap_classes: bool = True
) -> list[EncodedTensor]:
    """STC_p of the update `values` (finite float32 tensors), one encoded tensor each; without
    `gap_classes` every tensor's positions are Golomb-Rice-coded, as in the paper."""
    check_density(density)
    flats = [np.asarray(v, dtype=np.float32).reshape(-1) for v in values]
    whole = np.concatenate(flats) if flats else np.zeros(0, np.float32)
    positions = top_k(np.abs(whole), keep_count(whole.size, density))
    picked = whole[positions]
    mu = float(np.abs(picked).mean(dtype=np.float64)) if picked.size else 0.0
    bounds = np.cumsum([0] + [f.size for f in flats])
    cuts = np.searchsorted(positions, bounds)
    encoded = []
    for index, value in enumerate(values):
        first, last = cuts[index], cuts[index + 1]
        local = positions[first:last] - bounds[index]
        positive = picked[first:last] > 0
        encoded.append(ternary_tensor(np.shape(value), local, positive, mu, gap_classes))
    return encoded


SPARSE_CODECS = frozenset({Codec.SPARSE_TERNARY, Codec.SPARSE_TERNARY_GAPCLASS})


def kept_count(encoded: Sequence[EncodedTensor]) -> int:
    """Nonzero values the sparse ternary tensors of one update carry in total."""
    return sum(int(e.scales[1]) for e in encoded if e.codec in SPARSE_CODECS)
