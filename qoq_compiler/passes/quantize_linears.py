"""QuantizeLinears: rewrite every decoder linear of the float model into its quantized op, and
the elementwise work before each into an op that also quantizes the linear's input.

An ``nn.Mutator`` over the ``relax.frontend.nn`` model, run before export (as MLC-LLM's quantizers
do): each ``frontend.llama.Linear`` (qkv, o, gate_up, down of every layer) becomes
    scheme.weights "int8":  W8A8Linear   int8 x, sx -> op w8a8_linear   (int8 x int8 -> int32)
    scheme.weights "int4":  W4A8Linear   int8 x, sx -> op w4a8_linear   (int8 x uint4 -> int32)
with the parameters that ``quant.convert`` fills offline; embedding, lm_head and the final norm
stay float. A linear's per-token INT8 input (``QuantizedActivation``) comes from the op that
produces the activation (``act_quant``):
    input_layernorm, post_attention_layernorm   AddRMSNormQuant   residual add + RMSNorm + quantize
    mlp.act                                     SiluMulQuant      silu(gate) * up + quantize
    o_proj's input (the attention output)       the linear quantizes it itself
The exported Relax IR thus holds these ops where the float model had norms, activations and
matmuls: each a call_tir of the op's target-agnostic definition from ``ops`` (handed in by the
compiler: ``schedules.registry.OPS``), tagged with the op and its parameters, which
``passes.dispatch_kernels`` later replaces by the target's kernel.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from ..config import QuantScheme
from ..formats import ceildiv
from ..frontend.llama import AddRMSNorm, DecoderLayer, Linear


class QuantizedActivation:
    """A linear's input quantized per token: ``qx`` int8 [B, T, K], ``sx`` fp16 [B, T, 1] and
    ``xsum`` int32 [B, T, 1] = sum_k qx (read by the per-channel W4A8 epilogue only)."""

    def __init__(self, outputs):
        self.qx, self.sx, self.xsum = outputs

    @property
    def shape(self):
        return self.qx.shape


def quantize(ops, x: Tensor) -> QuantizedActivation:
    """Per-token INT8 quantization of a float activation [B, T, K]."""
    return _act_quant(ops, "quantize", [x], x.shape[-1], x.dtype)


def _act_quant(ops, kind: str, inputs: list[Tensor], k: int, dtype: str, eps: float = 1e-6, residual: bool = False):
    b, t = inputs[0].shape[:2]
    out = [Tensor.placeholder((b, t, k), "int8"), Tensor.placeholder((b, t, 1), "float16"),
           Tensor.placeholder((b, t, 1), "int32")]
    if residual:
        out.insert(0, Tensor.placeholder((b, t, k), dtype))
    res = ops.emit("act_quant", inputs, out=out, kind=kind, k=int(k), dtype=dtype, eps=eps)
    return (res[0], QuantizedActivation(res[1:])) if residual else QuantizedActivation(res)


class AddRMSNormQuant(nn.Module):
    """``AddRMSNorm`` whose normalised output is the next linear's INT8 input: one op writes
    the residual x' = x + d and qx, sx, xsum of RMSNorm(x') * w (``act_quant`` add_rmsnorm, or
    rmsnorm when there is no d)."""

    def __init__(self, hidden_size: int, eps: float, dtype: str, ops):
        self.weight = nn.Parameter((hidden_size,), dtype)
        self.eps, self.dtype, self.ops = eps, dtype, ops

    def forward(self, x: Tensor, d: Tensor | None = None) -> tuple[Tensor, QuantizedActivation]:
        k = self.weight.shape[0]
        if d is None:
            return x, _act_quant(self.ops, "rmsnorm", [x, self.weight], k, self.dtype, self.eps)
        return _act_quant(self.ops, "add_rmsnorm", [x, d, self.weight], k, self.dtype, self.eps, residual=True)


class SiluMulQuant(nn.Module):
    """``SiluMul`` whose output is down_proj's INT8 input (``act_quant`` silu_mul)."""

    def __init__(self, dtype: str, ops):
        self.dtype, self.ops = dtype, ops

    def forward(self, gate_up: Tensor) -> QuantizedActivation:
        return _act_quant(self.ops, "silu_mul", [gate_up], gate_up.shape[-1] // 2, self.dtype)


class W8A8Linear(nn.Module):
    """y = (sum_k qx qw) * sx * sw (+ b): per-token int8 activations, per-channel int8 weights.

    Parameters: ``weight`` int8 [out, in], ``weight_scale`` fp16 [out], ``bias`` fp32 [out]. Two
    ops: per-token quantization of x (unless its producer did it), then ``w8a8_linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, ops):
        self.weight = nn.Parameter((out_features, in_features), "int8")
        self.weight_scale = nn.Parameter((out_features,), "float16")
        self.bias = nn.Parameter((out_features,), "float32") if bias else None
        self.dtype, self.ops = dtype, ops

    def forward(self, x: Tensor | QuantizedActivation) -> Tensor:
        a = x if isinstance(x, QuantizedActivation) else quantize(self.ops, x)
        bias = [self.bias] if self.bias is not None else []
        n, k = self.weight.shape
        return self.ops.emit("w8a8_linear", [a.qx, a.sx, self.weight, self.weight_scale, *bias],
                             n=int(n), k=int(k), bias=self.bias is not None, dtype=self.dtype)


class W4A8Linear(nn.Module):
    """y = W4A8 GEMM(per-token int8 x, UINT4 W) (+ b), QoQ's linear layer (op ``w4a8_linear``).

    Parameters as the quantizers write them (``quant.convert.weight_params``): ``weight`` uint8
    codes [out, in], ``weight_scale`` fp16 [out] (s1); per group g: ``weight_group_scale`` /
    ``weight_group_zero`` int8 [out, ceil(in/g)] (s2, z2); per channel: ``weight_zero`` fp16 [out]
    (z), the activations' row sums coming with them (``xsum``); ``bias`` fp32 [out]. The kernel
    the dispatch pass chooses reorders them into its own layout, and the compiler does that once,
    as it writes the weights (``passes.lift_weight_layouts``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, group: int | None, ops):
        self.weight = nn.Parameter((out_features, in_features), "uint8")
        self.weight_scale = nn.Parameter((out_features,), "float16")
        if group is None:
            self.weight_zero = nn.Parameter((out_features,), "float16")
        else:
            self.weight_group_scale = nn.Parameter((out_features, ceildiv(in_features, group)), "int8")
            self.weight_group_zero = nn.Parameter((out_features, ceildiv(in_features, group)), "int8")
        self.bias = nn.Parameter((out_features,), "float32") if bias else None
        self.dtype, self.group, self.ops = dtype, group, ops

    def forward(self, x: Tensor | QuantizedActivation) -> Tensor:
        a = x if isinstance(x, QuantizedActivation) else quantize(self.ops, x)
        extra = [self.weight_zero, a.xsum] if self.group is None else [self.weight_group_scale, self.weight_group_zero]
        bias = [self.bias] if self.bias is not None else []
        n, k = self.weight_scale.shape[0], a.qx.shape[-1]
        return self.ops.emit("w4a8_linear", [a.qx, a.sx, self.weight, self.weight_scale, *extra, *bias], n=int(n),
                             k=int(k), group=self.group, bias=self.bias is not None, dtype=self.dtype)


class QuantizeLinears(nn.Mutator):
    def __init__(self, scheme: QuantScheme, ops):
        self.scheme, self.ops = scheme, ops

    def visit_module(self, name: str, node: nn.Module):
        if isinstance(node, DecoderLayer) and self.scheme.weights in ("int8", "int4"):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                old: AddRMSNorm = getattr(node, norm)
                setattr(node, norm, AddRMSNormQuant(old.weight.shape[0], old.eps, old.weight.dtype, self.ops))
            node.mlp.act = SiluMulQuant(node.mlp.down_proj.dtype, self.ops)
            return self.visit(name, node)
        if isinstance(node, Linear):
            s, args = self.scheme, (node.in_features, node.out_features, node.bias is not None, node.dtype)
            if s.weights == "int8":
                return W8A8Linear(*args, self.ops)
            if s.weights == "int4":
                return W4A8Linear(*args, s.group, self.ops)
            return node
        return self.visit(name, node)
