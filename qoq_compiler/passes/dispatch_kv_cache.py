"""DispatchKVCache: the float model's KV cache built for the target.

The float and W8A8 schemes keep their K/V in TVM's paged KV cache, whose attention, RoPE and copy
kernels are generated for a target when the cache object is constructed (``TIRPagedKVCache``). So
the model does not construct it: its ``create_kv_cache`` emits one target-free call,
``frontend.llama.KV_CACHE_CREATE``(configuration as JSON, ShapeExpr of the runtime's sizes
[max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window]), and
this pass rebuilds every function holding such a call around ``TIRPagedKVCache`` for the target
(the call is recognised by the op it invokes, as Relax ops are; MLC-LLM's
``DispatchKVCacheCreation`` works the same way). Everything else in the module is left as it is.
"""

from __future__ import annotations

import json

from tvm import ir, relax
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

from ..frontend.llama import KV_CACHE_CREATE


def _creation(func) -> relax.Call | None:
    """The creation call of a function whose body holds one, else None."""
    if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
        return None
    packed = ir.Op.get("relax.call_pure_packed")
    for block in func.body.blocks:
        for binding in block.bindings:
            v = binding.value
            if isinstance(v, relax.Call) and v.op == packed and isinstance(v.args[0], relax.ExternFunc) \
                    and str(v.args[0].global_symbol) == KV_CACHE_CREATE:
                return v
    return None


def dispatch_kv_cache(target) -> "ir.transform.Pass":
    @ir.transform.module_pass(opt_level=0, name="DispatchKVCache")
    def dispatch(mod: ir.IRModule, _ctx) -> ir.IRModule:
        found = {gv: call for gv, f in mod.functions_items() if (call := _creation(f)) is not None}
        if not found:
            return mod
        rest = ir.IRModule({gv: f for gv, f in mod.functions_items() if gv not in found}, attrs=mod.attrs,
                           global_infos=mod.global_infos)
        bb = relax.BlockBuilder(rest)
        for gv, call in found.items():
            func, cfg = mod[gv], json.loads(str(call.args[1].value))
            sizes = list(call.args[2].values)
            with bb.function(gv.name_hint, list(func.params), attrs=dict(func.attrs) if func.attrs else None):
                with bb.dataflow():
                    cache = TIRPagedKVCache(
                        attn_kind="mha", max_batch_size=sizes[0], max_total_seq_len=sizes[1],
                        prefill_chunk_size=sizes[2], page_size=sizes[3], support_sliding_window=sizes[4],
                        layer_partition=relax.ShapeExpr([0, cfg["num_hidden_layers"]]),
                        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                        num_key_value_heads=cfg["num_key_value_heads"], qk_head_dim=cfg["head_dim"],
                        v_head_dim=cfg["head_dim"], mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                        rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=cfg["rope_theta"],
                        rope_scaling=cfg["rope_scaling"], rope_ext_factors=relax.prim_value(0),
                        rotary_dim=cfg["head_dim"], enable_disaggregation=False, dtype=cfg["dtype"], target=target)
                    out = bb.emit_output(cache._expr)
                bb.emit_func_output(out)
        return bb.get()

    return dispatch
