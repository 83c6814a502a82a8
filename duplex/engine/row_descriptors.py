"""Where a batched decode pass's attention kernel finds each row's cache: per layer, the key and
value buffers' addresses, their capacity, and the row's place in the pass
(``duplex_gqa_decode_rows_bf16``'s descriptors, see :mod:`duplex.engine.attention`).

Checking every layer's buffers on every pass cost ~5 us a layer (1.3 ms of a 24 ms 8-row forward
on the 2-core EPYC), so a cache keeps its rows' descriptors between passes, behind weak references
to its buffers, and a pass re-checks only that those are still the same living tensors with room.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from duplex.engine.kv import GrowableLayer

__all__ = ["new_descriptors", "reuse_descriptors"]


def reuse_descriptors(cache: Any, layers: list[Any], s: int, e: int, out: np.ndarray) -> bool:
    """Fill ``out`` ([layers, 6]: one row's descriptors) from what :func:`new_descriptors` kept on
    ``cache``, if its buffers are still the same (living) tensors (none grown, reset or replaced since), every
    layer holds the same number of positions and the new ones fit: a batched pass's rows then cost
    a few list passes each, where checking every layer's buffers cost ~5 us a layer (1.3 of a 24 ms
    8-row forward on the 2-core EPYC)."""
    kept = getattr(cache, "_duplex_rows_desc", None)
    if kept is None:
        return False
    ks, vs, static, room = kept
    if len(ks) != len(layers):
        return False
    lengths = {layer._length for layer in layers}
    if len(lengths) != 1:
        return False
    length = lengths.pop()
    if length + e - s > room:
        return False
    # a buffer given up since (reset) is None on the layer and dead in the reference: no match
    if not all(k() is layer._k is not None and v() is layer._v is not None for k, v, layer in zip(ks, vs, layers)):
        return False
    out[:, :3] = static
    out[:, 3], out[:, 4], out[:, 5] = s, e - s, length
    return True


def new_descriptors(cache: Any, layers: list[Any], s: int, e: int, k: torch.Tensor, v: torch.Tensor, nkv: int,
                     d: int, out: np.ndarray) -> bool:
    """Check every layer of one row's cache, grow it up front for the row's ``e - s`` new tokens
    and fill ``out`` ([layers, 6]); keep the buffers' addresses on ``cache`` for
    :func:`reuse_descriptors`. False where the row needs the per-row path."""
    bf16 = torch.bfloat16
    n = e - s
    for i, layer in enumerate(layers):
        if type(layer) is not GrowableLayer:
            return False
        kb = getattr(layer, "_k", None) if layer.is_initialized else None
        if kb is not None:
            vb, shape = layer._v, kb.shape
            if (kb.dtype is not bf16 or vb is None or vb.dtype is not bf16 or not kb.is_cpu or len(shape) != 4
                    or shape[0] != 1 or shape[1] != nkv or shape[3] != d or vb.shape != shape
                    or not kb.is_contiguous() or not vb.is_contiguous()):
                return False
            if layer._length + n <= shape[2]:
                out[i] = (kb.data_ptr(), vb.data_ptr(), shape[2] * d, s, n, layer._length)
                continue
        elif layer.is_initialized and (getattr(layer, "_v", None) is not None or layer._length):
            return False
        # room for the new tokens, grown up front (a new buffer: checked again, pointers taken below)
        layer.reserve(k[:, :, s:e], v[:, :, s:e], n)
        kb, vb = layer._k, layer._v
        if kb.dtype is not bf16 or vb.dtype is not bf16 or not kb.is_cpu or kb.shape[0] != 1:
            return False
        out[i] = (kb.data_ptr(), vb.data_ptr(), kb.shape[2] * d, s, n, layer._length)
    # weak references: a buffer replaced since (grown, reset) is not kept alive, and a new one at the
    # same address is never taken for it
    cache._duplex_rows_desc = (tuple(weakref.ref(layer._k) for layer in layers),
                               tuple(weakref.ref(layer._v) for layer in layers),
                               out[:, :3].copy(), min(layer._k.shape[2] for layer in layers))
    return True
