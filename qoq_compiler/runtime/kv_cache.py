"""The KV caches an artifact runs with, behind one interface the engine drives.

    add(seq_id) / remove(seq_id) / truncate(seq_id, n_dropped)    sequence lifetime
    run(fn, seq_ids, lens, args) -> logits                        one forward step of a function
The engine checks every step against the context window and the page budget first
(``Engine._reserve``), so the caches can assume a step fits.

``TVMPagedCache``: TVM's paged cache object (``create_kv_cache`` of the module), one dtype for K
and V; the step is declared with ``kv_state_begin_forward`` and the object passed to the function.

``KV4PagedCache``: qoqc's 4-bit cache (``frontend.llama.KV4Cache``). Two device tensors hold all
layers, ``kv_data`` uint8 [L, 2, S, Hkv, D/2] and ``kv_param`` fp16 [L, 2, S, Hkv, 2], with
S = pages x page_size token slots; this class hands out pages (a free list, a page list per
sequence) and builds each step's addressing arrays:
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
from ..tvm_env import tvm

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


class TVMPagedCache:
    def __init__(self, vm, device, max_batch_size: int, max_total_tokens: int, prefill_chunk_size: int,
                 page_size: int):
        self.kv = vm["create_kv_cache"](
            tvm_ffi.Shape([max_batch_size]), tvm_ffi.Shape([max_total_tokens]),
            tvm_ffi.Shape([prefill_chunk_size]), tvm_ffi.Shape([page_size]), tvm_ffi.Shape([0]))
        self._f = {n: tvm.get_global_func(f"vm.builtin.kv_state_{n}")
                   for n in ("add_sequence", "remove_sequence", "popn", "begin_forward", "end_forward")}

    def add(self, seq_id: int) -> None:
        self._f["add_sequence"](self.kv, seq_id)

    def remove(self, seq_id: int) -> None:
        self._f["remove_sequence"](self.kv, seq_id)

    def truncate(self, seq_id: int, dropped: int) -> None:
        self._f["popn"](self.kv, seq_id, dropped)

    def run(self, fn, seq_ids: list[int], lens: list[int], args: list):
        self._f["begin_forward"](self.kv, tvm_ffi.Shape(seq_ids), tvm_ffi.Shape(lens))
        logits, _ = fn(*args, self.kv)
        self._f["end_forward"](self.kv)
        return logits


class KV4PagedCache:
    def __init__(self, config, device, max_total_tokens: int, page_size: int):
        self.device, self.page_size = device, page_size
        pages = -(-max_total_tokens // page_size)
        shape = (config.num_layers, 2, pages * page_size, config.num_kv_heads)
        self.data = tvm.runtime.empty((*shape, config.head_dim // 2), "uint8", device)
        self.param = tvm.runtime.empty((*shape, 2), "float16", device)
        self.free = list(range(pages - 1, -1, -1))
        self.pages: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def add(self, seq_id: int) -> None:
        self.pages[seq_id], self.lengths[seq_id] = [], 0

    def remove(self, seq_id: int) -> None:
        self.free.extend(reversed(self.pages.pop(seq_id)))
        del self.lengths[seq_id]

    def truncate(self, seq_id: int, dropped: int) -> None:
        self.lengths[seq_id] -= dropped
        keep = -(-self.lengths[seq_id] // self.page_size)
        pages = self.pages[seq_id]
        self.free.extend(reversed(pages[keep:]))
        del pages[keep:]

    def run(self, fn, seq_ids: list[int], lens: list[int], args: list):
        p = self.page_size
        rows = {s: i for i, s in enumerate(dict.fromkeys(seq_ids))}
        positions, token_seq = [], []
        for s, n in zip(seq_ids, lens):
            start = self.lengths[s]
            pages = self.pages[s]
            while len(pages) * p < start + n:
                pages.append(self.free.pop())  # the engine checked the page budget
            positions.append(np.arange(start, start + n))
            token_seq.append(np.full(n, rows[s]))
            self.lengths[s] = start + n
        pos = np.concatenate(positions).astype("int32")
        seq = np.concatenate(token_seq).astype("int32")
        table = np.zeros((len(rows), max(len(self.pages[s]) for s in rows)), "int32")
        for s, r in rows.items():
            table[r, :len(self.pages[s])] = self.pages[s]
        slots = (table[seq, pos // p] * p + pos % p).astype("int32")
        arrays = [tvm.runtime.tensor(a, self.device) for a in (pos, seq, table, slots)]
        return fn(*args, *arrays, self.data, self.param)
