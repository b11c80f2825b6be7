"""Multi-segment and sparse attention over the paged KV pool.

Layers (DESIGN.md, "Kernels"): csrc/multi_segment_attention.cu -> :mod:`kvstore.kernels`
(the only module importing cupy: NVRTC compile, cache, launch on torch's stream) ->
:mod:`kvstore.attn.kernel` (stride/device checks, split-K plan) -> :mod:`kvstore.attn.api`
(validation, dispatch between the kernel and :mod:`kvstore.attn.reference`).

The kernel is off by default until validated on a GPU: see :data:`DEFAULT_BACKEND` and
``KVSTORE_ATTN_BACKEND`` in :mod:`kvstore.attn.api`.
"""

from kvstore.attn.api import (
    BACKEND_ENV,
    BACKENDS,
    DEFAULT_BACKEND,
    HEAD_DIMS,
    merge_states,
    multi_segment_attention,
    paged_attention,
    paged_token_attention,
    resolve_backend,
)
from kvstore.attn.segments import BlockSegments

__all__ = [
    "BACKEND_ENV",
    "BACKENDS",
    "DEFAULT_BACKEND",
    "HEAD_DIMS",
    "BlockSegments",
    "merge_states",
    "multi_segment_attention",
    "paged_attention",
    "paged_token_attention",
    "resolve_backend",
]
