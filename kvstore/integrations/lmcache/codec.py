"""The bytes of a block in a shared store: a header that says whose block it is, then the KV.

A remote server is shared by engines that may serve other models, other layouts or other
kvstore versions, and a value can be cut short or damaged in transit or by the server. So a
stored block carries what a reader must check before it hands KV to vLLM::

    offset  size  field
         0     8  magic    b"KVSTBLK1" (format version 1)
         8    16  layout   BLAKE2b-128 of the model name, the block shape and dtype
        24     8  key      the block's key (low 64 bits, little-endian)
        32     8  length   payload bytes
        40     4  crc32    of the payload (zlib.crc32)
        44    20  zero
        64     *  payload  the block, ``[L, 2, block_size, Hkv, D]`` contiguous

A reader rejects a value whose magic, layout, key, length or checksum disagree
(:class:`CorruptBlockError`): the caller reports a load error and vLLM recomputes. CRC-32
catches every burst error up to 32 bits and random damage with probability 1 - 2**-32;
it is not a defence against a malicious server (anyone who can write the server can write
a matching checksum), which is the server's access control's job.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

import torch

from kvstore.errors import BlockStateError
from kvstore.spec import KVSpec

__all__ = ["BlockCodec", "CorruptBlockError", "HEADER_BYTES"]

MAGIC = b"KVSTBLK1"
HEADER_BYTES = 64
_HEADER = struct.Struct("<8s16sQQI20x")
assert _HEADER.size == HEADER_BYTES


class CorruptBlockError(BlockStateError):
    """A stored value is not the block it claims to be (wrong layout, key, length or checksum)."""


def layout_digest(spec: KVSpec, model_name: str) -> bytes:
    """16 bytes naming the model and the block layout: equal for every engine that can share a block."""
    text = f"kvstore-v1|{model_name}|{spec.num_layers}x2x{spec.block_size}x{spec.num_kv_heads}x{spec.head_dim}|{spec.dtype}"
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class BlockCodec:
    """Encode blocks of ``spec`` into ``[HEADER_BYTES + bytes_per_block]`` uint8 buffers and back.

    Args:
        spec: block shape and dtype.
        model_name: the model the KV belongs to (part of the layout digest).
    """

    def __init__(self, spec: KVSpec, model_name: str) -> None:
        self.spec = spec
        self.layout = layout_digest(spec, model_name)
        self.payload_bytes = spec.bytes_per_block
        self.nbytes = HEADER_BYTES + self.payload_bytes

    @staticmethod
    def _bytes(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)

    def encode(self, key: int, block: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``block`` (``spec.block_shape``, CPU) and its header into ``out`` (``[nbytes]`` uint8)."""
        payload = out[HEADER_BYTES:]
        payload.copy_(self._bytes(block.contiguous()))
        crc = zlib.crc32(payload.numpy())
        header = _HEADER.pack(MAGIC, self.layout, key & (2**64 - 1), self.payload_bytes, crc)
        out[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))

    def decode(self, key: int, buf: torch.Tensor, out: torch.Tensor) -> None:
        """Check ``buf`` (uint8) and copy its block into ``out`` (``spec.block_shape``, CPU).

        Raises :class:`CorruptBlockError` naming what disagrees; ``out`` is then untouched.
        """
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != self.nbytes:
            raise CorruptBlockError(
                f"block {key:#x}: stored value has {buf.numel()} {buf.dtype} elements, expected {self.nbytes} bytes"
            )
        magic, layout, stored_key, length, crc = _HEADER.unpack(buf[:HEADER_BYTES].numpy().tobytes())
        if magic != MAGIC:
            raise CorruptBlockError(f"block {key:#x}: not a kvstore block (magic {magic!r})")
        if layout != self.layout:
            raise CorruptBlockError(f"block {key:#x}: stored for another model or layout (digest {layout.hex()})")
        if stored_key != key & (2**64 - 1):
            raise CorruptBlockError(f"block {key:#x}: the value holds block {stored_key:#x}")
        if length != self.payload_bytes:
            raise CorruptBlockError(f"block {key:#x}: payload of {length} bytes, expected {self.payload_bytes}")
        payload = buf[HEADER_BYTES:]
        if zlib.crc32(payload.numpy()) != crc:
            raise CorruptBlockError(f"block {key:#x}: checksum mismatch (the stored bytes were damaged)")
        if out.is_contiguous():
            self._bytes(out).copy_(payload)
        else:
            out.copy_(payload.view(out.dtype).view(out.shape))
