"""Tensor parallelism: how a model divides over N shards (MLC-LLM's ``tensor_parallel_shards``).

Every shard runs the same module (one compiled library, SPMD on TVM's Disco) on its own weights:
    attention    Hq / N query heads and Hkv / N KV heads; qkv_proj split by output rows (each of
                 its q, k and v blocks into N), o_proj by input columns
    MLP          I / N channels; gate_up_proj split by output rows (gate and up blocks each into
                 N), down_proj by input columns
    the rest     embedding, norms and lm_head replicated (every shard computes full logits)
The column-split (row-parallel) linears give partial sums: their outputs are all-reduced
(``ccl.allreduce``, sum) before the residual add + RMSNorm (+ quantize) that consumes them, so
every shard holds the full hidden state between layers. A row-parallel bias is added once: shard
0 holds it, the others hold zeros.

The quantized formats split consistently (parameters as ``quant.convert.weight_params`` writes
them, before the kernels' layouts are applied):
    codes / int8 weights [out, in]              as the float weight
    weight_scale, weight_zero [out]             follow their rows; replicated for column splits
    weight_group_scale / _zero [out, in / g]    follow their rows; column splits take whole
                                                groups (in / N must be a multiple of g)
A row-parallel linear's input is quantized per token on each shard, over that shard's slice of
the row: its scale is the slice's max |x| / 127, at most the full row's, so each shard's codes are
as fine or finer than one device's and the sum differs from the one-device result by that rounding.
"""

from __future__ import annotations

import re

import numpy as np

from ..config import ModelConfig
from ..errors import QoqcError

_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.qkv_proj|self_attn\.o_proj|mlp\.gate_up_proj|mlp\.down_proj)"
                     r"\.(weight|weight_scale|weight_zero|weight_group_scale|weight_group_zero|bias)$")
#: linears whose input columns are split (their outputs are all-reduced)
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def check_tensor_parallel(cfg: ModelConfig, shards: int, group: int | None) -> None:
    """One clear error when ``cfg`` does not divide into ``shards`` (a whole number, at least 1: the
    compiler checks it first) with weight groups of ``group``."""
    if shards == 1:
        return
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("MLP channels (intermediate_size)", cfg.intermediate_size)):
        if n % shards:
            raise QoqcError(f"--tensor-parallel {shards}: the model's {n} {what} do not divide into {shards} shards")
    if group is not None:
        for name, k in (("o_proj", cfg.q_size), ("down_proj", cfg.intermediate_size)):
            if (k // shards) % group:
                raise QoqcError(f"--tensor-parallel {shards}: {name}'s {k} inputs give {k // shards} per shard, not "
                                f"a whole number of {group}-input weight groups (a group would straddle shards)")


def _rule(name: str, cfg: ModelConfig) -> tuple[int, list[int]] | str | None:
    """How parameter ``name`` (full model) splits: (axis, block lengths along it, each cut into
    N), "first" (shard 0 holds it, the others zeros), or None (replicated)."""
    m = _LINEAR.match(name)
    if m is None:
        return None
    linear, kind = m.groups()
    if linear in ROW_PARALLEL:
        if kind == "bias":
            return "first"
        return (1, []) if kind in ("weight", "weight_group_scale", "weight_group_zero") else None
    if linear == "self_attn.qkv_proj":
        return 0, [cfg.q_size, cfg.kv_size, cfg.kv_size]
    return 0, [cfg.intermediate_size] * 2


def full_shape(name: str, shape: tuple[int, ...], cfg: ModelConfig, shards: int) -> tuple[int, ...]:
    """The whole model's shape of parameter ``name`` whose shard has ``shape``."""
    rule = _rule(name, cfg)
    if shards == 1 or not isinstance(rule, tuple):
        return tuple(shape)
    axis = rule[0]
    return tuple(d * shards if i == axis else d for i, d in enumerate(shape))


def shard_parameter(name: str, arr: np.ndarray, cfg: ModelConfig, shards: int) -> list[np.ndarray]:
    """The ``shards`` pieces of the whole model's parameter ``name`` (``cfg``: the whole model's)."""
    if shards == 1:
        return [arr]
    rule = _rule(name, cfg)
    if rule is None:
        return [arr] * shards
    if rule == "first":
        return [arr] + [np.zeros_like(arr)] * (shards - 1)
    axis, blocks = rule
    blocks = blocks or [arr.shape[axis]]
    if sum(blocks) != arr.shape[axis]:
        raise QoqcError(f"cannot shard {name} of shape {arr.shape}: expected {sum(blocks)} along axis {axis}")
    parts = np.split(arr, np.cumsum(blocks)[:-1], axis=axis)
    return [np.ascontiguousarray(np.concatenate([np.split(p, shards, axis=axis)[i] for p in parts], axis=axis))
            for i in range(shards)]
