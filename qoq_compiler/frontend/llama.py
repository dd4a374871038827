"""The Llama-family decoder (Llama-2/3, Mistral, Qwen2) as a ``relax.frontend.nn`` module.

One float model for every precision: a quantization scheme changes the linear layers (the pass
``passes.quantize_linears`` swaps each ``Linear`` for its quantized op) and the KV cache
(``LlamaKV4ForCausalLM`` below); everything else is shared. The KV4 cache and greedy argmax emit
QoQ ops (``ops``, handed in by the compiler: ``schedules.registry.OPS``), whose kernels the
compiler's dispatch pass chooses per target, and TVM's float KV cache is a creation call that
``passes.dispatch_kv_cache`` builds for the target: this file names no kernel and no target.

Per layer, with ``x`` of shape [T, H] for T tokens of a ragged batch:
    qkv = RMSNorm(x) @ W_qkv^T (+ b_qkv)        [T, (Hq + 2 Hkv) D]    (q, k, v fused)
    a   = PagedAttention(qkv) @ W_o^T (+ b_o)    [T, H]                 (RoPE applied inside the cache)
    x   = x + a
    gu  = RMSNorm(x) @ W_gate_up^T               [T, 2 I]               (gate, up fused)
    x   = x + silu(gu[:, :I]) * gu[:, I:] @ W_down^T
logits = RMSNorm(x) @ W_lm^T  (W_lm = embedding when tied), computed only at the requested rows.
Each residual add is carried to the next norm (``AddRMSNorm``: a layer returns the residual and
its pending update) and silu(gate) * up is one module (``SiluMul``), so a quantized scheme can
replace each by one op that also quantizes its output (``passes.quantize_linears``).
With ``shards`` > 1 the module is one tensor-parallel shard (``frontend.sharding``): its config
holds the shard's heads and MLP channels, and o_proj's and down_proj's partial outputs are summed
over the shards (``ccl.allreduce``) before the residual add that takes them.

Entry points (all take the packed parameter tuple last):
    prefill(input_ids [1, T], logit_positions [P], kv) -> logits [1, P, V] f32
        T tokens of one or more sequences (ragged, as declared to the cache); logits only at the
        P rows asked for: the last row of each sequence for generation, all rows for evaluation.
    decode(input_ids [B, 1], kv) -> logits [B, 1, V] f32    one new token for each of B sequences
    argmax(logits [B, 1, V]) -> tokens [B] int32             greedy tokens, chosen on the device
    create_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                    support_sliding_window) -> kv
"""

from __future__ import annotations

import json

from tvm import ir, relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from ..config import ModelConfig

#: the float model's KV-cache creation op (a packed-function call that ``passes.dispatch_kv_cache`` replaces)
KV_CACHE_CREATE = "qoqc.create_paged_kv_cache"

#: Entry points of the compiled module, in the order the runtime expects them (the KV4 model's
#: cache is allocated by the runtime, so it has no ``create_kv_cache``).
ENTRY_POINTS = ("prefill", "decode", "argmax", "create_kv_cache")
KV4_ENTRY_POINTS = ("prefill", "decode", "argmax")


class Linear(nn.Linear):
    """y = x W^T (+ b): weights in the model dtype, accumulation (and bias) in fp32, output in the model dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, out_dtype="float32")
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y if self.dtype == "float32" else op.astype(y, self.dtype)


class AddRMSNorm(nn.Module):
    """(x', RMSNorm(x') * w) with x' = x + d: the residual add that precedes a norm, done by it
    (d None: no add, x' = x). Parameter ``weight`` [H], as HF's RMSNorm."""

    def __init__(self, hidden_size: int, eps: float, dtype: str):
        self.weight = nn.Parameter((hidden_size,), dtype)
        self.eps = eps

    def forward(self, x: Tensor, d: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if d is not None:
            x = x + d
        return x, op.rms_norm(x, self.weight, axes=-1, epsilon=self.eps)


class SiluMul(nn.Module):
    """silu(gate) * up of the fused gate_up projection [..., 2 I] (gate first) -> [..., I]."""

    def forward(self, gate_up: Tensor) -> Tensor:
        gate, up = op.split(gate_up, 2, axis=-1)
        return op.silu(gate) * up


def reduce_shards(y: Tensor, shards: int) -> Tensor:
    """The sum over shards of a row-parallel linear's partial output (``frontend.sharding``)."""
    return op.ccl_allreduce(y, "sum") if shards > 1 else y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str, shards: int):
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, dtype)
        self.act = SiluMul()
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, dtype)
        self.shards = shards

    def forward(self, x: Tensor) -> Tensor:
        return reduce_shards(self.down_proj(self.act(self.gate_up_proj(x))), self.shards)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str, shards: int):
        self.num_heads, self.head_dim, self.shards = cfg.num_heads, cfg.head_dim, shards
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.qkv_bias, dtype)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias, dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        b, t, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, t, -1, self.head_dim))  # [B, T, Hq + 2 Hkv, D]
        out = kv.attention_with_fused_qkv(layer_id, qkv, self.num_heads, sm_scale=self.head_dim**-0.5)
        return reduce_shards(self.o_proj(op.reshape(out, (b, t, self.num_heads * self.head_dim))), self.shards)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str, shards: int):
        self.input_layernorm = AddRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, shards)
        self.post_attention_layernorm = AddRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, shards)

    def forward(self, x: Tensor, d: Tensor | None, kv: PagedKVCache, layer_id: int) -> tuple[Tensor, Tensor]:
        """Residual x plus the previous layer's pending update d -> (residual, this layer's update)."""
        x, h = self.input_layernorm(x, d)
        x, h = self.post_attention_layernorm(x, self.self_attn(h, kv, layer_id))
        return x, self.mlp(h)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str, shards: int):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList([DecoderLayer(cfg, dtype, shards) for _ in range(cfg.num_layers)])
        self.norm = AddRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: Tensor, kv: PagedKVCache) -> Tensor:
        x, d = self.embed_tokens(input_ids), None  # [B, T, H]
        for i, layer in enumerate(self.layers):
            x, d = layer(x, d, kv, i)
        return self.norm(x, d)[1]


class LlamaForCausalLM(nn.Module):
    """The whole model; parameter names are ``model.*`` and ``lm_head.weight`` (absent when tied).

    Embedding, norms and lm_head stay in ``dtype`` (QoQ quantizes the decoder's linears only).
    ``ops``: how the model emits QoQ ops (``schedules.registry.OPS``, handed in by the compiler).
    ``shards``: the module is one of that many tensor-parallel shards (``frontend.sharding``):
    ``cfg`` is then the shard's (``ModelConfig.shard``) and row-parallel outputs are all-reduced.
    """

    def __init__(self, cfg: ModelConfig, dtype: str, ops, shards: int = 1):
        self.cfg, self.dtype, self.ops = cfg, dtype, ops
        self.model = Backbone(cfg, dtype, shards)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, out_dtype="float32")

    def _logits(self, h: Tensor) -> Tensor:
        """fp32 logits [*, V] = h W_lm^T, accumulated in fp32."""
        if self.cfg.tie_word_embeddings:
            return op.matmul(h, op.permute_dims(self.model.embed_tokens.weight), out_dtype="float32")
        return self.lm_head(h)

    def prefill(self, input_ids: Tensor, logit_positions: Tensor, kv: PagedKVCache):
        h = self.model(input_ids, kv)  # [1, T, H]
        h = op.take(h, logit_positions, axis=1)  # [1, P, H]
        return self._logits(h), kv

    def decode(self, input_ids: Tensor, kv: PagedKVCache):
        return self._logits(self.model(input_ids, kv)), kv  # [B, 1, V]

    def argmax(self, logits: Tensor) -> Tensor:
        return self.ops.emit("argmax", [logits], out=Tensor.placeholder((logits.shape[0],), "int32"),
                             vocab=self.cfg.vocab_size)

    def create_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                        prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                        support_sliding_window: tirx.Var) -> PagedKVCache:
        """TVM's paged KV cache, as a target-free creation call (``KV_CACHE_CREATE``: the cache's
        configuration as JSON, then the sizes the runtime passes); ``passes.dispatch_kv_cache``
        builds it with its attention kernels for the target."""
        cfg = self.cfg
        config = {"num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                  "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
                  "rope_scaling": dict(cfg.rope_scaling), "dtype": self.dtype}
        sizes = relax.ShapeExpr([max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                                 support_sliding_window])
        return PagedKVCache(_expr=relax.op.call_pure_packed(KV_CACHE_CREATE, ir.StringImm(json.dumps(config)),
                                                            sizes, ty_args=relax.AnyType()), _name="paged_kv_cache")

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        model = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            "prefill": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                "kv": kv,
                "$": model,
            },
            "decode": {
                "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
                "kv": kv,
                "$": model,
            },
            "argmax": self._argmax_spec(),
            "create_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        assert tuple(spec) == ENTRY_POINTS
        return nn.spec.ModuleSpec.from_raw(spec, self)

    def _argmax_spec(self) -> dict:
        return {"logits": nn.spec.Tensor(["batch_size", 1, self.cfg.vocab_size], "float32"),
                "$": {"param_mode": "none", "effect_mode": "none"}}


class KV4Cache:
    """qoqc's 4-bit paged KV cache as the model sees it during one step (``schedules.kv4_attention``).

    Holds the cache tensors (updated in place by each layer) and the step's addressing arrays
    filled by the runtime: ``positions``, ``token_seq``, ``slots`` [T] and ``page_table`` [B, MP].
    Offers the one method the attention layer calls on TVM's cache. ``prefill``: the step feeds
    prompts (many tokens per sequence), a parameter of the attention op its kernel choice may use.
    """

    def __init__(self, cfg: ModelConfig, dtype: str, ops, page_size: int, prefill: bool,
                 data: Tensor, param: Tensor, positions: Tensor, token_seq: Tensor, page_table: Tensor,
                 slots: Tensor, rotate: bool = False):
        self.cfg, self.dtype, self.ops, self.page_size = cfg, dtype, ops, page_size
        self.rotate = rotate  # q and k times the head dimension's Hadamard matrix after RoPE
        self.prefill = prefill
        self.data, self.param = data, param
        self.positions, self.token_seq, self.page_table, self.slots = positions, token_seq, page_table, slots

    def attention_with_fused_qkv(self, layer_id: int, qkv: Tensor, num_heads: int, sm_scale: float) -> Tensor:
        cfg, ops = self.cfg, self.ops
        b, t, heads, d = qkv.shape
        x = op.reshape(qkv, (b * t, heads, d))
        rope = {"theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling)}
        if self.rotate:
            q = ops.emit("rope_q_rotated", [x, self.positions],
                         out=Tensor.placeholder((b * t, num_heads, d), self.dtype), num_q_heads=num_heads,
                         num_kv_heads=cfg.num_kv_heads, head_dim=int(d), dtype=self.dtype, **rope)
        else:
            q = ops.emit("rope_q", [x, self.positions], num_q_heads=num_heads, **rope)
        layer = tirx.IntImm("int64", layer_id)  # a scalar argument: one function serves every layer
        self.data, self.param = ops.emit(
            "kv4_append", [self.data, self.param, x, self.positions, self.slots, layer], inplace=[0, 1],
            out=[Tensor.placeholder(self.data.shape, "uint8"), Tensor.placeholder(self.param.shape, "float16")],
            num_layers=cfg.num_layers, num_q_heads=num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=int(d),
            dtype=self.dtype, rotate=self.rotate, **rope)
        out = ops.emit("kv4_attention", [q, self.data, self.param, self.positions, self.token_seq, self.page_table,
                                         layer],
                       out=Tensor.placeholder((b * t, num_heads, d), self.dtype), num_layers=cfg.num_layers,
                       num_q_heads=num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=int(d),
                       page_size=self.page_size, sm_scale=sm_scale, dtype=self.dtype, prefill=self.prefill)
        return op.reshape(out, (b, t, num_heads, d))


class LlamaKV4ForCausalLM(LlamaForCausalLM):
    """The same model over qoqc's 4-bit paged KV cache (``KV4Cache``), whose tensors the runtime
    allocates and passes to every call:

        prefill(input_ids [1, T], logit_positions [P], positions [T], token_seq [T], page_table [B, MP],
                slots [T], kv_data, kv_param) -> logits [1, P, V]
        decode(input_ids [B, 1], positions [B], token_seq [B], page_table [B, MP], slots [B],
               kv_data, kv_param) -> logits [B, 1, V]
    with kv_data uint8 [L, 2, S, Hkv, D/2] and kv_param fp16 [L, 2, S, Hkv, 2] (S = pages x page_size).
    """

    def __init__(self, cfg: ModelConfig, dtype: str, ops, page_size: int, kv_rotation: bool = False,
                 shards: int = 1):
        super().__init__(cfg, dtype, ops, shards)
        self.page_size, self.kv_rotation = page_size, kv_rotation

    def _cache(self, prefill, positions, token_seq, page_table, slots, kv_data, kv_param) -> KV4Cache:
        return KV4Cache(self.cfg, self.dtype, self.ops, self.page_size, prefill, kv_data, kv_param,
                        positions, token_seq, page_table, slots, self.kv_rotation)

    def prefill(self, input_ids: Tensor, logit_positions: Tensor, positions: Tensor, token_seq: Tensor,
                page_table: Tensor, slots: Tensor, kv_data: Tensor, kv_param: Tensor):
        kv = self._cache(True, positions, token_seq, page_table, slots, kv_data, kv_param)
        h = op.take(self.model(input_ids, kv), logit_positions, axis=1)
        return self._logits(h)

    def decode(self, input_ids: Tensor, positions: Tensor, token_seq: Tensor, page_table: Tensor, slots: Tensor,
               kv_data: Tensor, kv_param: Tensor):
        kv = self._cache(False, positions, token_seq, page_table, slots, kv_data, kv_param)
        return self._logits(self.model(input_ids, kv))

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        cfg = self.cfg
        model = {"param_mode": "packed", "effect_mode": "none"}
        cache = {
            "page_table": nn.spec.Tensor(["num_seqs", "max_pages"], "int32"),
            "kv_data": nn.spec.Tensor([cfg.num_layers, 2, "num_slots", cfg.num_kv_heads, cfg.head_dim // 2], "uint8"),
            "kv_param": nn.spec.Tensor([cfg.num_layers, 2, "num_slots", cfg.num_kv_heads, 2], "float16"),
        }

        def tokens(n):
            return {name: nn.spec.Tensor([n], "int32") for name in ("positions", "token_seq")}

        spec = {
            "prefill": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                **tokens("seq_len"),
                "page_table": cache["page_table"],
                "slots": nn.spec.Tensor(["seq_len"], "int32"),
                "kv_data": cache["kv_data"],
                "kv_param": cache["kv_param"],
                "$": model,
            },
            "decode": {
                "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
                **tokens("batch_size"),
                "page_table": cache["page_table"],
                "slots": nn.spec.Tensor(["batch_size"], "int32"),
                "kv_data": cache["kv_data"],
                "kv_param": cache["kv_param"],
                "$": model,
            },
            "argmax": self._argmax_spec(),
        }
        assert tuple(spec) == KV4_ENTRY_POINTS
        return nn.spec.ModuleSpec.from_raw(spec, self)
