"""Automatic prefix caching: a prompt's leading blocks of KV, computed once and reused.

Why: a teacher server sees the same long head (a system prompt, a rubric, few-shot examples) before
every short document. Prefilling it again for each request is most of the work; copying its keys
and values from a pool is almost free.

How (vLLM's automatic prefix caching, with copies instead of paged attention):
  * a prompt is cut into blocks of `block_size` tokens; block j's key is a hash chained over every
    token up to its end (h_j = H(h_{j-1}, tokens of block j)), so a hit on block j means the whole
    prefix up to it is the same, and the KV (which depends on nothing else, given one model) is too;
  * the KV of cached blocks lives on the device in a pool shaped like a cache of `num_blocks` rows
    of `block_size` slots; `load` copies a hit's blocks into the leading positions of a request's
    cache row before the rest of its prompt is prefilled; `store` copies a prefilled prompt's
    full blocks that are not cached yet into free (or least recently used) pool rows;
  * at most (prompt length - 1) // block_size blocks are reused, so at least one token is always
    computed: its logits give the first new token;
  * eviction is least-recently-used by block; a hit touches its blocks last-to-first, so a chain's
    head outlives its tail and a chain is never cut in the middle first.

Exact by construction: reused KV is what the same model computed at the same positions; the
rest of the prompt attends to it through the same cached attention as a whole prefill does
(tests hold tokens equal and log-probs within 1e-5).

Letters: M blocks per copy (padded to a power of two), NB pool blocks, Z block size, K kv heads,
S cache slots, H head dim. Pool and cache share the model's layout: a stacked [layers,...] array
or a tuple of per-layer arrays (`phi_jax.model.init_cache`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.errors import InputError
from phi_jax.model import init_cache

DEFAULT_BLOCK_SIZE = 16


def block_hashes(tokens: Sequence[int], block_size: int, count: int | None = None) -> list[bytes]:
    """The chained hashes of the first `count` (default: every) full blocks of `tokens`."""
    count = len(tokens) // block_size if count is None else count
    ids = np.asarray(tokens[:count * block_size], np.int32)
    out, previous = [], b""
    for j in range(count):
        previous = hashlib.blake2b(previous + ids[j * block_size:(j + 1) * block_size].tobytes(),
                                   digest_size=16).digest()
        out.append(previous)
    return out


def _pad_ids(ids: Sequence[int], fill: int, limit: int) -> np.ndarray:
    """ids padded to a power of two (bounded compiled variants), at most `limit` long."""
    width = min(limit, 1 << max(0, (len(ids) - 1).bit_length()))
    out = np.full(max(width, len(ids)), fill, np.int32)
    out[:len(ids)] = ids
    return out


def _load_layer(x, pool, slot, ids):
    """x [B,K,S,H] with row `slot`'s first M*Z positions set from pool [NB,K,Z,H] blocks `ids` [M]."""
    if x.ndim == 5:  # stacked layers: the same per layer
        return jax.vmap(_load_layer, in_axes=(0, 0, None, None))(x, pool, slot, ids)
    _, k, z, h = pool.shape
    blocks = jnp.take(pool, ids, axis=0)  # [M,K,Z,H]
    seq = blocks.transpose(1, 0, 2, 3).reshape(1, k, ids.shape[0] * z, h)  # [1,K,M*Z,H]
    return jax.lax.dynamic_update_slice(x, seq.astype(x.dtype), (slot, 0, 0, 0))


def _store_layer(pool, x, slot, src, dst):
    """pool [NB,K,Z,H] with blocks src [M] of row `slot` of x [B,K,S,H] written at dst [M]
    (dst out of range = padding, dropped)."""
    if x.ndim == 5:
        return jax.vmap(_store_layer, in_axes=(0, 0, None, None, None))(pool, x, slot, src, dst)
    _, k, z, h = pool.shape
    nb = x.shape[2] // z
    row = jax.lax.dynamic_index_in_dim(x, slot, axis=0, keepdims=False)[:, :nb * z]  # [K,nb*Z,H]
    blocks = jnp.take(row.reshape(k, nb, z, h), src, axis=1, mode="clip")  # [K,M,Z,H]
    return pool.at[dst].set(blocks.transpose(1, 0, 2, 3).astype(pool.dtype), mode="drop")


def _map_layers(fn, a, b, *rest):
    if isinstance(a, tuple):
        return tuple(fn(x, y, *rest) for x, y in zip(a, b))
    return fn(a, b, *rest)


@functools.partial(jax.jit, donate_argnums=(0,))
def _load(cache, pool, slot, ids):
    out = dict(cache)
    for name in ("k", "v"):
        out[name] = _map_layers(_load_layer, cache[name], pool[name], slot, ids)
    return out


@functools.partial(jax.jit, donate_argnums=(0,))
def _store(pool, cache, slot, src, dst):
    return {name: _map_layers(_store_layer, pool[name], cache[name], slot, src, dst)
            for name in ("k", "v")}


@dataclasses.dataclass
class PrefixCacheStats:
    """Counters since start: prompt tokens looked up, tokens found (reused), blocks stored and
    evicted."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    """A block-hashed, LRU-evicted pool of prompt-prefix KV for one model's cache layout.

    Args:
      config: the model's `ModelConfig` (the pool is shaped by it).
      capacity_tokens: pool size in tokens (rounded down to whole blocks); must hold a block.
      block_size: Z, tokens per block: smaller blocks reuse more of a partly shared prefix, larger
        ones hash and copy less often.
      dtype: the KV cache's dtype.
    Not thread-safe: the serving engine calls it from its one thread.
    """

    def __init__(self, config, capacity_tokens: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype=None):
        if block_size < 1 or capacity_tokens < block_size:
            raise InputError(f"a prefix cache of {capacity_tokens} tokens cannot hold one block of "
                             f"{block_size}; give at least {block_size} tokens (--prefix-cache-tokens), or 0 to "
                             "turn it off")
        self.block_size = block_size
        self.num_blocks = capacity_tokens // block_size
        pool = init_cache(config, self.num_blocks, block_size, dtype=dtype)
        self.pool = {"k": pool["k"], "v": pool["v"]}
        self._index: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # LRU first
        self._free = list(range(self.num_blocks))
        self.stats = PrefixCacheStats()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def cached_blocks(self) -> int:
        return len(self._index)

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """Pool blocks holding the longest cached prefix of `tokens` (at most (len-1)//Z blocks),
        touched as most recently used; counts the query."""
        usable = (len(tokens) - 1) // self.block_size
        found = []
        for key in block_hashes(tokens, self.block_size, usable):
            block = self._index.get(key)
            if block is None:
                break
            found.append((key, block))
        for key, _ in reversed(found):  # head last = most recent: the tail is evicted first
            self._index.move_to_end(key)
        self.stats.queried_tokens += len(tokens)
        self.stats.hit_tokens += len(found) * self.block_size
        return [block for _, block in found]

    def load(self, cache: dict, slot: int, blocks: Sequence[int]) -> dict:
        """`cache` (donated) with row `slot`'s first len(blocks) * Z positions copied from the pool."""
        if not blocks:
            return cache
        limit = jax.tree.leaves(cache["k"])[0].shape[-2] // self.block_size
        ids = _pad_ids(blocks, blocks[-1], limit)  # padding copies past the prefix: overwritten
        return _load(cache, self.pool, np.int32(slot), ids)

    def store(self, cache: dict, slot: int, tokens: Sequence[int]) -> int:
        """Copy the full blocks of `tokens` (prefilled in row `slot` of `cache`) that are not cached
        yet into the pool, evicting the least recently used blocks for room. Returns blocks stored."""
        # At most a pool's worth, so a long prompt never evicts its own blocks while storing them.
        keys = block_hashes(tokens, self.block_size, min(len(tokens) // self.block_size,
                                                         self.num_blocks))
        src, dst = [], []
        for j, key in enumerate(keys):
            if key in self._index:
                self._index.move_to_end(key)
                continue
            if not self._free:
                _, evicted = self._index.popitem(last=False)
                self._free.append(evicted)
                self.stats.evicted_blocks += 1
            block = self._free.pop()
            self._index[key] = block
            src.append(j)
            dst.append(block)
        for key in reversed(keys):  # as in lookup: the chain's head is the most recent
            self._index.move_to_end(key)
        if src:
            limit = jax.tree.leaves(cache["k"])[0].shape[-2] // self.block_size
            self.pool = _store(self.pool, cache, np.int32(slot), _pad_ids(src, 0, limit),
                               _pad_ids(dst, self.num_blocks, limit))
            self.stats.stored_blocks += len(src)
        return len(src)
