"""KV-cache pages and the caches an artifact runs with.

``BlockManager`` is the one owner of the pages: which sequences are open, how many tokens each
holds and in which pages (a free list, a page list per sequence), and whether a step fits
(``can_allocate`` for a new sequence, ``can_append`` for growing ones). Everything else asks it;
nothing else counts pages.

The caches hold the tensors, behind one interface the model drives after the block manager has
granted a step (so they may assume it fits):
    add(seq_id) / remove(seq_id) / truncate(seq_id, n_dropped)    sequence lifetime
    run(fn, seq_ids, lens, args) -> logits                        one forward step of a function
They live where the model's runtime puts them (``rt``: ``model.LocalRuntime``, one device of this
process, or ``tp.DiscoRuntime``, every tensor-parallel worker, each with its shard's KV heads) and
hand the step's host arrays (``args``, then their own) to ``rt.inputs`` in one list.

``TVMPagedCache``: TVM's paged cache object (``create_kv_cache`` of the module), one dtype for K
and V, pages of 16 tokens that TVM assigns itself (the block manager mirrors their count); the step
is declared with ``kv_state_begin_forward`` and closed by ``kv_state_end_forward`` even when the
function fails.

``KV4PagedCache``: qoqc's 4-bit cache (``frontend.llama.KV4Cache``). Two device tensors hold all
layers, ``kv_data`` uint8 [L, 2, S, Hkv, D/2] and ``kv_param`` fp16 [L, 2, S, Hkv, 2], with
S = pages x page_size token slots, addressed through the block manager's page lists; each step's
addressing arrays:
    positions [T]  absolute position of each new token       token_seq [T]  its row of page_table
    slots [T]      page * page_size + offset where it goes   page_table [B, MP]  pages of each sequence
At 4 bits plus a 4-byte (scale, minimum) per (token, head) it takes (D/2 + 4) / (2 D) of an fp16
cache: 28% at D = 64, 27% at D = 128 (``bytes_per_token``).

Capacity: a token count, or a memory budget (``parse_memory``: bytes, "4GiB", or a fraction of the
device's free memory) divided by the bytes per token, in whole pages (``capacity_tokens``).
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..errors import QoqcError
from .. import tvm_env  # noqa: F401  (the version check, before tvm_ffi)

import tvm_ffi  # noqa: E402  (after tvm_env's version check)


_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def bytes_per_token(config, kind: str, dtype: str = "float16") -> int:
    """KV-cache bytes one token takes over all layers: K and V of every kv head."""
    per_head = config.head_dim // 2 + 4 if kind == "kv4-paged" else config.head_dim * np.dtype(dtype).itemsize
    return config.num_layers * 2 * config.num_kv_heads * per_head


def parse_memory(spec) -> int | float:
    """``--kv-memory``: an int of bytes, "4GiB" / "512MB" / "123456", or a fraction in (0, 1] of the
    device's free memory ("0.5")."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = spec
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(spec))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise QoqcError(f"invalid KV memory {spec!r}: give bytes (e.g. 4GiB, 512MB) or a fraction of free "
                            "memory (e.g. 0.5)")
        number = float(m.group(1))
        value = number if (unit == "" and "." in m.group(1)) else int(number * _UNITS[unit])
    if isinstance(value, float) and not 0 < value <= 1:
        raise QoqcError(f"invalid KV memory fraction {value} (a fraction of free memory lies in (0, 1])")
    if isinstance(value, int) and value <= 0:
        raise QoqcError(f"invalid KV memory {value} bytes")
    return value


def free_memory(device) -> int:
    """Free bytes on ``device`` (GPU: the driver's count; CPU: available physical memory)."""
    if device.type == "cuda":
        return int(device.available_global_memory)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def capacity_tokens(budget: int | float, per_token: int, page_size: int, device) -> int:
    """Tokens a KV cache of ``budget`` bytes (or fraction of free memory) holds, in whole pages."""
    nbytes = int(budget * free_memory(device)) if isinstance(budget, float) else budget
    tokens = nbytes // per_token // page_size * page_size
    if tokens == 0:
        raise QoqcError(f"a KV cache of {nbytes} bytes holds no page: one page of {page_size} tokens needs "
                        f"{per_token * page_size} bytes")
    return tokens


class BlockManager:
    """Pages of ``page_size`` tokens, ``pages`` of them, and the sequences that hold them."""

    def __init__(self, pages: int, page_size: int):
        self.total, self.page_size = pages, page_size
        self.free = list(range(pages - 1, -1, -1))  # popped from the end: page 0 first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self._next = 0

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def used(self) -> int:
        return self.total - len(self.free)

    def open(self) -> int:
        """A new empty sequence; its id."""
        sid, self._next = self._next, self._next + 1
        self.tables[sid], self.lengths[sid] = [], 0
        return sid

    def close(self, sid: int) -> None:
        """Free every page of ``sid``."""
        self.free.extend(reversed(self.tables.pop(sid)))
        del self.lengths[sid]

    def can_allocate(self, tokens: int, headroom: int = 0) -> bool:
        """Whether a new sequence of ``tokens`` fits with ``headroom`` pages to spare."""
        return self.pages_for(tokens) + headroom <= len(self.free)

    def can_append(self, grow: dict[int, int], headroom: int = 0) -> bool:
        """Whether the sequences of ``grow`` can take that many more tokens each (``headroom``
        pages to spare)."""
        return self._new_pages(grow) + headroom <= len(self.free)

    def room(self, sid: int, pages: int) -> int:
        """Tokens ``sid`` can grow by with ``pages`` more pages (and what its last page has left)."""
        return (len(self.tables[sid]) + pages) * self.page_size - self.lengths[sid]

    def _new_pages(self, grow: dict[int, int]) -> int:
        return sum(max(self.pages_for(self.lengths[s] + n) - len(self.tables[s]), 0) for s, n in grow.items())

    def append(self, grow: dict[int, int]) -> None:
        """Grow sequences by tokens, taking pages from the free list."""
        need = self._new_pages(grow)
        if need > len(self.free):
            held = sum(self.lengths.values())
            raise QoqcError(f"the KV cache is full: {held} tokens in {len(self.lengths)} sequences hold "
                            f"{self.used} of {self.total} pages of {self.page_size}, and this step needs {need} more")
        for s, n in grow.items():
            self.lengths[s] += n
            table = self.tables[s]
            while len(table) * self.page_size < self.lengths[s]:
                table.append(self.free.pop())

    def truncate(self, sid: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``sid``; free the pages past them."""
        self.lengths[sid] = length
        table, keep = self.tables[sid], self.pages_for(length)
        self.free.extend(reversed(table[keep:]))
        del table[keep:]


class TVMPagedCache:
    def __init__(self, rt, max_batch_size: int, max_total_tokens: int, prefill_chunk_size: int, page_size: int):
        self.rt = rt
        self.kv = rt.function("create_kv_cache")(
            tvm_ffi.Shape([max_batch_size]), tvm_ffi.Shape([max_total_tokens]),
            tvm_ffi.Shape([prefill_chunk_size]), tvm_ffi.Shape([page_size]), tvm_ffi.Shape([0]))
        self._f = {n: rt.global_func(f"vm.builtin.kv_state_{n}")
                   for n in ("add_sequence", "remove_sequence", "popn", "begin_forward", "end_forward")}

    def add(self, seq_id: int) -> None:
        self._f["add_sequence"](self.kv, seq_id)

    def remove(self, seq_id: int) -> None:
        self._f["remove_sequence"](self.kv, seq_id)

    def truncate(self, seq_id: int, dropped: int) -> None:
        self._f["popn"](self.kv, seq_id, dropped)

    def run(self, fn, seq_ids: list[int], lens: list[int], args: list):
        self._f["begin_forward"](self.kv, tvm_ffi.Shape(seq_ids), tvm_ffi.Shape(lens))
        try:
            return self.rt.item(fn(*self.rt.inputs(args), self.kv), 0)  # (logits, kv)
        finally:
            self._f["end_forward"](self.kv)


class KV4PagedCache:
    def __init__(self, config, rt, blocks: BlockManager):
        """``config``: the model as the runtime's devices hold it (a tensor-parallel shard's KV heads)."""
        self.rt, self.blocks, self.page_size = rt, blocks, blocks.page_size
        shape = (config.num_layers, 2, blocks.total * blocks.page_size, config.num_kv_heads)
        self.data = rt.empty((*shape, config.head_dim // 2), "uint8")
        self.param = rt.empty((*shape, 2), "float16")

    def add(self, seq_id: int) -> None:
        """Nothing to do: the block manager owns this cache's pages."""

    def remove(self, seq_id: int) -> None:
        """Nothing to do: the block manager owns this cache's pages."""

    def truncate(self, seq_id: int, dropped: int) -> None:
        """Nothing to do: the block manager owns this cache's pages."""

    def run(self, fn, seq_ids: list[int], lens: list[int], args: list):
        """One step of distinct sequences whose new tokens the block manager has already placed
        (their lengths include them)."""
        p, tables = self.page_size, self.blocks.tables
        rows = {s: i for i, s in enumerate(seq_ids)}
        positions, token_seq = [], []
        for s, n in zip(seq_ids, lens):
            end = self.blocks.lengths[s]
            positions.append(np.arange(end - n, end))
            token_seq.append(np.full(n, rows[s]))
        pos = np.concatenate(positions).astype("int32")
        seq = np.concatenate(token_seq).astype("int32")
        table = np.zeros((len(rows), max(len(tables[s]) for s in rows)), "int32")
        for s, r in rows.items():
            table[r, :len(tables[s])] = tables[s]
        slots = (table[seq, pos // p] * p + pos % p).astype("int32")
        return fn(*self.rt.inputs([*args, pos, seq, table, slots]), self.data, self.param)
