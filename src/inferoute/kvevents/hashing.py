"""vLLM's prefix-cache block hashes (``vllm/v1/core/kv_cache_utils.py``, ``vllm/utils/hashing.py``). Pure.

* ``sha256_cbor(obj) = sha256(cbor2.dumps(obj, canonical=True))`` — reproducible across processes and Python
  versions (vLLM's default ``sha256`` hashes a pickle, which is not).
* ``NONE_HASH = sha256_cbor(PYTHONHASHSEED)``: the parent of a sequence's first block (vLLM draws it from
  ``os.urandom`` when the variable is unset; a publisher whose events others consume needs it fixed).
* ``block_hash(parent, tokens, extra_keys) = sha256_cbor((parent or NONE_HASH, tuple(tokens), extra_keys))``,
  chained on the **full 32-byte** parent digest. Only full blocks are hashed.
* ``extra_keys`` is ``(lora_name,)`` for a LoRA request (plus multimodal ids and the cache salt, which the
  simulator does not model), else None.
* On the wire (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, the default) a digest becomes its last 8 bytes as a
  big-endian unsigned integer: :func:`wire_hash`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import cbor2


def sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def none_hash(seed: str) -> bytes:
    """The root parent digest for ``PYTHONHASHSEED=seed``."""
    return sha256_cbor(seed)


def wire_hash(digest: bytes) -> int:
    """The 64-bit integer vLLM publishes for a block digest."""
    return int.from_bytes(digest[-8:], "big")


def block_digests(
    tokens: Sequence[int],
    block_size: int,
    root: bytes,
    extra_keys: tuple[Any, ...] | None = None,
    parent: bytes | None = None,
    start_block: int = 0,
) -> list[bytes]:
    """Digests of the full blocks of ``tokens`` from block ``start_block`` on, chained from ``parent`` (the
    digest of block ``start_block - 1``; ``root`` when None)."""
    out: list[bytes] = []
    prev = parent if parent is not None else root
    full = len(tokens) - len(tokens) % block_size
    dumps = cbor2.dumps
    sha = hashlib.sha256
    for start in range(start_block * block_size, full, block_size):
        key = (prev, tuple(tokens[start : start + block_size]), extra_keys)
        prev = sha(dumps(key, canonical=True)).digest()
        out.append(prev)
    return out
