"""Sparse ternary compression of a whole model update (Sattler et al., arXiv 1903.02891, Alg. 1).

The top ceil(p * n) values of each tensor of the update (n its size), or with model scope the top
k = max(1, round(p * n)) over all tensors together (n the model's parameter count), become +-mu
with mu their mean magnitude (per tensor, or one for the model); everything else becomes 0.
Each tensor travels as a sparse ternary tensor (flq/codec/sparse.py) holding its share of the k
positions, Golomb-coded with the parameter that is optimal for its own density, or as gap classes
under a Huffman code (flq/codec/gapclass.py), whichever is smaller for that tensor. Selection is a
partition (np.argpartition), O(n), not a sort.

The error accumulation around it (what was not sent is added to the next update) lives with the
caller's state: the worker's UploadReference residual and, on the downlink, the gap between the
master's model and the reference the workers hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from flq.codec import Codec, EncodedTensor
from flq.codec.sparse import check_density, keep_count, ternary_tensor, ternary_top, top_k


def sparsify(
    values: Sequence[np.ndarray], density: float, gap_classes: bool = True, per_tensor: bool = True
) -> list[EncodedTensor]:
    """STC_p of the update `values` (finite float32 tensors), one encoded tensor each; without
    `gap_classes` every tensor's positions are Golomb-Rice-coded, as in the paper.

    `per_tensor`: every tensor keeps its own top ceil(p * n) values as +-mu with its own mu, as
    the STC reference code compresses each parameter tensor (felisat/federated-learning,
    compression_utils.stc). Over the whole model instead, one top-k and one mu, the layers whose
    updates are small (here the middle convolutions, 0.07-0.09 % of their values after 100
    steps at p = 1 %) are hardly ever sent, which a per-coordinate server step (Adam) feels."""
    check_density(density)
    if per_tensor:
        tensors = [np.asarray(v, dtype=np.float32) for v in values]
        return [ternary_top(t, tensor_keep_count(t.size, density), gap_classes) for t in tensors]
    flats = [np.asarray(v, dtype=np.float32).reshape(-1) for v in values]
    whole = np.concatenate(flats) if flats else np.zeros(0, np.float32)
    positions = top_k(np.abs(whole), keep_count(whole.size, density))
    picked = whole[positions]
    mu = _mean_magnitude(picked)
    bounds = np.cumsum([0] + [f.size for f in flats])
    cuts = np.searchsorted(positions, bounds)
    encoded = []
    for index, value in enumerate(values):
        first, last = cuts[index], cuts[index + 1]
        local = positions[first:last] - bounds[index]
        positive = picked[first:last] > 0
        encoded.append(ternary_tensor(np.shape(value), local, positive, mu, gap_classes))
    return encoded


def tensor_keep_count(count: int, density: float) -> int:
    """Values a tensor of `count` keeps at density p with per-tensor scope: ceil(p * count)."""
    return min(count, math.ceil(density * count))


def allowed_kept(shapes: Sequence[tuple[int, ...]], density: float, per_tensor: bool) -> int:
    """The most values a sparse upload of these shapes may keep at `density`."""
    if per_tensor:
        return sum(tensor_keep_count(math.prod(shape), density) for shape in shapes)
    return keep_count(sum(math.prod(shape) for shape in shapes), density)


def _mean_magnitude(picked: np.ndarray) -> float:
    return float(np.abs(picked).mean(dtype=np.float64)) if picked.size else 0.0


SPARSE_CODECS = frozenset({Codec.SPARSE_TERNARY, Codec.SPARSE_TERNARY_GAPCLASS})


def kept_count(encoded: Sequence[EncodedTensor]) -> int:
    """Nonzero values the sparse ternary tensors of one update carry in total."""
    return sum(int(e.scales[1]) for e in encoded if e.codec in SPARSE_CODECS)
