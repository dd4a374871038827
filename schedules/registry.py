"""The QoQ ops the model emits, and the kernels that serve each op on each target.

Two halves, handed in by the compiler (the frontend and ``passes`` import no kernel):
    OPS       what the model emits: each op's target-agnostic definition, as a call_tir of a
              PrimFunc tagged ``qoq.kernel`` (the op) and ``qoq.params`` (its parameters, JSON)
    REGISTRY  how it runs: per op, its kernels in order of preference; ``passes.dispatch_kernels``
              replaces every tagged call by the first kernel built for the target that supports
              the call's parameters

    op             definition (emitted)                 kernels, in order of preference
    act_quant      act_quant, CPU form                  act_quant_cpu (llvm: vectorized, same sums) |
                                                        act_quant CUDA form | act_quant CPU form
    argmax         argmax, CPU form                     argmax CUDA form | argmax CPU form
    w8a8_linear    TE: W8A8 GEMM + bias, cast           w8a8_gemm_<isa> (llvm: VNNI or sdot; not AVX2,
                                                        whose int16 pairs saturate on 8-bit weights)
                                                        | w8a8_matmul (TE; the target's schedule rules)
    w4a8_linear    TE: W4A8 GEMM + bias, cast           w4a8_gemm_tc (CUDA, K and groups in whole
                                                        32-wide steps) | w4a8_gemm_<isa> (llvm: the
                                                        CPU's int8 dot products, ``w4a8_gemm_cpu``)
                                                        | w4a8_matmul (TE; portable)
    rope_q         TE                                   rope_q (TE)
    rope_q_rotated rope_q_rotated, CPU form             CUDA form | CPU form
    kv4_append     kv4_append, CPU form (in place)      CUDA form | CPU form
    kv4_attention  a plain loop nest (``kv4_attention   kv4_prefill (CUDA, prefill steps, fp16, head_dim
                   _definition``)                       32..128) | kv4_attention_cpu (llvm, D/2 a power
                                                        of two) | kv4_attention split for the target
                                                        + kv4_merge

Each kernel names its NumPy reference (``schedules/reference``), which its tests compare it with.
The model declares weights as the quantizers write them; a kernel that reads a weight in a layout
of its own reorders it with a tagged PrimFunc (``Call.weight_layout``; the W4A8 kernels: the MMA
layout), which ``passes.lift_weight_layouts`` moves to compile time. A new kernel is a module in
``schedules/`` and a ``Kernel`` entry here, in front of the kernels it should win over, bringing
its layout with it. Every op except W4A8 has a kernel on every target; a CUDA W4A8 linear that falls
back to the portable GEMM is refused by the dispatch pass unless it is asked to allow it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from tvm import relax, te, tirx
from tvm.relax.frontend.nn import op

from . import (act_quant, argmax, kv4_attention, kv4_attention_cpu, kv4_prefill, w4a8_gemm, w4a8_gemm_cpu,
               w4a8_gemm_tc, w8a8_gemm)
from .reference import act_quant as act_quant_ref
from .reference import argmax as argmax_ref
from .reference import kv4 as kv4_ref
from .reference import w4a8_gemm as w4a8_ref
from .reference import w8a8_gemm as w8a8_ref

KERNEL_ATTR, PARAMS_ATTR = "qoq.kernel", "qoq.params"
#: marks a kernel's weight reordering (``Call.weight_layout``)
WEIGHT_LAYOUT_ATTR = "qoq.weight_layout"


def _bias_cast(y: te.Tensor, bias: te.Tensor | None, dtype: str) -> te.Tensor:
    return te.compute(y.shape, lambda *i: (y[i] + bias[i[-1]] if bias is not None else y[i]).astype(dtype),
                      name="y_out")


def _w4a8_linear(qx, sx, q, s1, *rest, group: int | None, bias: bool, dtype: str):
    """Definition of ``w4a8_linear``: (qx, sx, q, s1, *extra, [bias]) with the weights as the
    quantizers write them -> y [..., N] in ``dtype``."""
    extra, b = (rest[:-1], rest[-1]) if bias else (rest, None)
    return _bias_cast(w4a8_gemm.w4a8_matmul_definition(qx, sx, q, s1, *extra, group=group), b, dtype)


def _w8a8_linear(qx, sx, qw, sw, *rest, bias: bool, dtype: str):
    """Definition of ``w8a8_linear``: (qx, sx, qw, sw, [bias]) -> y [..., N] in ``dtype``."""
    return _bias_cast(w8a8_gemm.w8a8_matmul(qx, sx, qw, sw), rest[0] if bias else None, dtype)


def _rope_q(qkv, positions, num_q_heads: int, theta: float, rope_scaling: dict):
    return kv4_attention.rope_q(qkv, positions, num_q_heads=num_q_heads, theta=theta, rope_scaling=rope_scaling)


@dataclass(frozen=True)
class Definition:
    """An op as the model emits it: ``build(**params)`` gives a PrimFunc, or with ``te`` a TE
    function of the call's tensors; ``name(params)`` the emitted function's name."""

    build: Callable
    te: bool = False
    name: Callable[[dict], str] | None = None


DEFINITIONS = {
    "act_quant": Definition(lambda kind, k, dtype, eps: act_quant.act_quant(kind, k, dtype, False, eps),
                            name=lambda p: p["kind"] if p["kind"] == "quantize" else p["kind"] + "_quantize"),
    "argmax": Definition(lambda vocab: argmax.argmax(vocab, False)),
    "w8a8_linear": Definition(lambda n, k, **p: partial(_w8a8_linear, **p), te=True),
    "w4a8_linear": Definition(lambda n, k, **p: partial(_w4a8_linear, **p), te=True),
    "rope_q": Definition(lambda **p: partial(_rope_q, **p), te=True),
    "rope_q_rotated": Definition(lambda **p: kv4_attention.rope_q_rotated(**p, gpu=False)),
    "kv4_append": Definition(lambda **p: kv4_attention.kv4_append(**p, gpu=False)),
    "kv4_attention": Definition(lambda prefill, **p: kv4_attention.kv4_attention_definition(**p)),
}


class Ops:
    """What the model emits (``OPS``): ``emit(op, args, out, **params)`` adds the op's definition,
    tagged with the op and its parameters, and calls it; ``inplace`` lists the arguments a PrimFunc
    op updates in place. Parameters are JSON values (ints, floats, strings, bools, None, dicts)."""

    def __init__(self, definitions: dict[str, Definition]):
        self.definitions = definitions

    def emit(self, name: str, args: list, out=None, inplace: list[int] | None = None, **params):
        d = self.definitions[name]
        tags = {KERNEL_ATTR: name, PARAMS_ATTR: json.dumps(params, sort_keys=True)}
        hint = d.name(params) if d.name else name
        if d.te:
            return op.tensor_expr_op(d.build(**params), hint, args, attrs=tags)
        func = d.build(**params)
        for key, value in tags.items():
            func = func.with_attr(key, value)
        if inplace is not None:
            return op.tensor_ir_inplace_op(func, hint, args, inplace_indices=inplace, out=out)
        return op.tensor_ir_op(func, hint, args, out=out)


OPS = Ops(DEFINITIONS)


@dataclass
class Call:
    """A tagged call the dispatch pass replaces: its builder, arguments, output type, the function
    name it had, whether the target is a GPU, and its in-place arguments (or None)."""

    bb: relax.BlockBuilder
    args: list
    out: relax.Type
    name: str
    gpu: bool
    inplace: list[int] | None = None
    built: dict = field(default_factory=dict)  # PrimFuncs built so far, shared by the pass's calls

    def func(self, key, build: Callable[[], tirx.PrimFunc]) -> tirx.PrimFunc:
        """The PrimFunc ``build()`` makes, built once per pass for ``key``."""
        if key not in self.built:
            self.built[key] = build()
        return self.built[key]

    def tir(self, func: tirx.PrimFunc, args=None, out=None, name: str | None = None,
            inplace: list[int] | None = None) -> relax.Expr:
        """The call of ``func`` (default: with the call's arguments, output and in-place indices)."""
        gv = self.bb.add_func(func, name or self.name)
        args, out = self.args if args is None else args, self.out if out is None else out
        out = list(out.fields) if isinstance(out, relax.TupleType) else out
        inplace = self.inplace if inplace is None and args is self.args else inplace
        if inplace is not None:
            return relax.call_tir_inplace(gv, args, inplace, out)
        return relax.call_tir(gv, args, out)

    def te(self, func: Callable, args, name: str, attrs: dict | None = None) -> relax.Expr:
        """The call of the PrimFunc of TE function ``func`` on ``args``."""
        return self.bb.call_te(func, *args, primfunc_name_hint=name, primfunc_attrs=attrs)

    def weight_layout(self, func: Callable, arg, name: str) -> relax.Var:
        """A weight reordered into a kernel's layout by TE function ``func``: tagged
        ``WEIGHT_LAYOUT_ATTR``, so ``passes.lift_weight_layouts`` moves it to compile time."""
        return self.emit(self.te(func, [arg], name, {WEIGHT_LAYOUT_ATTR: True}))

    def emit(self, expr: relax.Expr) -> relax.Var:
        """``expr`` bound to a variable (kernels emit every step but the last, which replaces the call)."""
        return expr if isinstance(expr, relax.Var) else self.bb.emit(expr)


@dataclass(frozen=True)
class Kernel:
    """One way to run an op: built for ``targets`` (target kinds) where ``supports(params)``;
    ``emit(call, params)`` replaces the call; ``reference`` is the NumPy function it is tested
    against; ``portable``: the generic fallback of an op that has a faster kernel somewhere."""

    name: str
    op: str
    targets: tuple[str, ...]
    emit: Callable[[Call, dict], relax.Expr]
    reference: Callable
    supports: Callable[[dict], bool] = lambda _params: True
    portable: bool = False
    features: tuple[str, ...] = ()  # LLVM CPU features the target must have (all of them)


class Registry:
    """``REGISTRY``: the kernels of every op, in order of preference."""

    call_site = Call  # what a kernel's ``emit`` receives

    def __init__(self, kernels: list[Kernel]):
        self.kernels = kernels

    @staticmethod
    def op_of(func: tirx.PrimFunc) -> tuple[str, dict] | None:
        """(op, parameters) of an op definition ``OPS`` emitted, or None for any other function."""
        if func.attrs is None or KERNEL_ATTR not in func.attrs:
            return None
        return str(func.attrs[KERNEL_ATTR]), json.loads(str(func.attrs[PARAMS_ATTR]))

    def select(self, name: str, params: dict, target_kind: str, features=frozenset()) -> Kernel | None:
        """The first kernel of op ``name`` built for ``target_kind`` with CPU ``features`` (LLVM
        names) that supports ``params``."""
        return next((k for k in self.kernels if k.op == name and target_kind in k.targets
                     and set(k.features) <= set(features) and k.supports(params)), None)


def _same(build: Callable[..., tirx.PrimFunc]):
    """Kernels with the definition's arguments: build the target's form and call it in place of it."""
    return lambda call, p: call.tir(call.func((build, json.dumps(p, sort_keys=True), call.gpu),
                                              lambda: build(**p, gpu=call.gpu)))


def _lead(x: relax.Expr) -> list:
    return list(x.ty.shape.values[:-1])


def _linear_tail(call: Call, y: relax.Expr, y_dtype: str, p: dict, bias_index: int) -> relax.Expr:
    """The linear's bias and cast as the model's float layers do them: bias in y's dtype, then dtype."""
    if p["bias"]:
        y, bias = call.emit(y), call.args[bias_index]
        if bias.ty.dtype != y_dtype:
            bias = call.emit(relax.op.astype(bias, y_dtype))
        y = relax.op.add(y, bias)
    return y if y_dtype == p["dtype"] else relax.op.astype(call.emit(y), p["dtype"])


def _mma_weights(call: Call, p: dict) -> list:
    """(qw, s1, e0, e1) with the codes, and per group s2 and z2, reordered into the MMA layout
    (``layout.pack_uint4_mma``), which both W4A8 kernels read."""
    q, s1, e0, e1 = call.args[2:6]
    qw = call.weight_layout(w4a8_gemm.mma_pack_codes, q, "mma_pack_codes")
    if p["group"] is not None:
        e0 = call.weight_layout(w4a8_gemm.mma_channel_columns, e0, "mma_channel_columns")
        e1 = call.weight_layout(w4a8_gemm.mma_channel_columns, e1, "mma_channel_columns")
    return [qw, s1, e0, e1]


def _w4a8_portable(call: Call, p: dict) -> relax.Expr:
    """(qx, sx, q, s1, e0, e1, [bias]): weights into the MMA layout, the TE GEMM in fp32, then bias and cast."""
    weights = _mma_weights(call, p)
    y = call.te(partial(w4a8_gemm.w4a8_matmul, group=p["group"]), [*call.args[:2], *weights], "w4a8_matmul")
    return _linear_tail(call, y, "float32", p, 6)


def _rows3(call: Call, x: relax.Expr, width: int) -> relax.Expr:
    """x [..., width] as [B0, B1, width] for the CPU GEMMs: the model's rank-3 activations as they
    are (no reshape: each is a VM call), any other rank reshaped."""
    return x if len(x.ty.shape.values) == 3 else call.emit(relax.op.reshape(x, (1, -1, width)))


def _cpu_gemm_call(call: Call, gemm: tirx.PrimFunc, args: list, n: int, y_dtype: str, name: str) -> relax.Expr:
    """The CPU GEMM on rank-3 rows, its output back in the call's leading shape."""
    lead = _lead(call.args[0])
    rows = list(args[0].ty.shape.values[:2])
    y = call.tir(gemm, args, relax.TensorType((*rows, n), y_dtype), name)
    return y if len(lead) == 2 else relax.op.reshape(call.emit(y), (*lead, n))


def _w4a8_cpu(isa: w4a8_gemm_cpu.Isa, call: Call, p: dict) -> relax.Expr:
    """The dot-product GEMM on the [B0, B1, K] rows (the output dtype, or fp32 before a bias);
    codes, and per group s2 and z2, into the kernel's layout."""
    n, k, group = p["n"], p["k"], p["group"]
    q, s1, e0, e1 = call.args[2:6]
    qv = call.weight_layout(partial(w4a8_gemm_cpu.cpu_pack_codes, lanes=isa.lanes), q, "cpu_pack_codes")
    if group is not None:
        e0, e1 = (call.weight_layout(partial(w4a8_gemm_cpu.cpu_channel_groups, lanes=isa.lanes), e,
                                     "cpu_channel_groups") for e in (e0, e1))
    else:
        e1 = _rows3(call, e1, 1)
    qx, sx = _rows3(call, call.args[0], k), _rows3(call, call.args[1], 1)
    y_dtype = "float32" if p["bias"] else p["dtype"]
    gemm = call.func(("w4a8_gemm_cpu", isa.name, n, k, group, y_dtype),
                     lambda: w4a8_gemm_cpu.cpu_gemm(n, k, group, isa, y_dtype))
    y = _cpu_gemm_call(call, gemm, [qx, sx, qv, s1, e0, e1], n, y_dtype, "w4a8_gemm")
    return _linear_tail(call, y, y_dtype, p, 6)


def _w4a8_tensor_core(call: Call, p: dict) -> relax.Expr:
    """[..., K] -> [tokens, K] -> tensor-core GEMM -> fp16 [tokens, N] -> [..., N]."""
    n, k, group = p["n"], p["k"], p["group"]
    qx, sx = call.args[:2]
    qw, s1, e0, e1 = _mma_weights(call, p)
    lead = _lead(qx)
    qx, sx = call.emit(relax.op.reshape(qx, (-1, k))), call.emit(relax.op.reshape(sx, (-1, 1)))
    if group is None:
        e1 = call.emit(relax.op.reshape(e1, (-1, 1)))
    gemm = call.func(("w4a8_gemm_tc", n, k, group), lambda: w4a8_gemm_tc.tensor_core_gemm(n, k, group))
    tokens = qx.ty.shape.values[0]  # as the reshape inferred it
    y = call.emit(call.tir(gemm, [qx, sx, qw, s1, e0, e1], relax.TensorType((tokens, n), "float16"), "w4a8_gemm"))
    return _linear_tail(call, relax.op.reshape(y, (*lead, n)), "float16", p, 6)


def _w8a8_cpu(isa: w4a8_gemm_cpu.Isa, call: Call, p: dict) -> relax.Expr:
    """The CPU dot-product GEMM on the offset weight bytes, rows as in ``_w4a8_cpu``."""
    n, k = p["n"], p["k"]
    pack = partial(w4a8_gemm_cpu.cpu_pack_bytes, lanes=isa.lanes, offset=w4a8_gemm_cpu.w8_offset(isa))
    qv = call.weight_layout(pack, call.args[2], "cpu_pack_bytes")
    qx, sx = _rows3(call, call.args[0], k), _rows3(call, call.args[1], 1)
    y_dtype = "float32" if p["bias"] else p["dtype"]
    gemm = call.func(("w8a8_gemm_cpu", isa.name, n, k, y_dtype),
                     lambda: w4a8_gemm_cpu.cpu_gemm(n, k, None, isa, y_dtype, bits=8))
    y = _cpu_gemm_call(call, gemm, [qx, sx, qv, call.args[3]], n, y_dtype, "w8a8_gemm")
    return _linear_tail(call, y, y_dtype, p, 4)


def _w8a8(call: Call, p: dict) -> relax.Expr:
    return _linear_tail(call, call.te(w8a8_gemm.w8a8_matmul, call.args[:4], "w8a8_matmul"), "float32", p, 4)


def _rope_q_te(call: Call, p: dict) -> relax.Expr:
    return call.te(partial(_rope_q, **p), call.args, "rope_q")


def _kv4_prefill(call: Call, p: dict) -> relax.Expr:
    args = {k: v for k, v in p.items() if k not in ("prefill", "dtype")}
    func = call.func(("kv4_prefill", json.dumps(args, sort_keys=True)), lambda: kv4_prefill.kv4_prefill(**args))
    return call.tir(func, name="kv4_prefill")


def _kv4_cpu(call: Call, p: dict) -> relax.Expr:
    args = {k: v for k, v in p.items() if k != "prefill"}
    func = call.func(("kv4_attention_cpu", json.dumps(args, sort_keys=True)),
                     lambda: kv4_attention_cpu.kv4_attention_cpu(**args))
    return call.tir(func, name="kv4_attention")


def _kv4_split(call: Call, p: dict) -> relax.Expr:
    """kv4_attention with the target's split plan into a workspace, then kv4_merge in place."""
    hq, hkv, d, dtype = p["num_q_heads"], p["num_kv_heads"], p["head_dim"], p["dtype"]
    plan = kv4_attention.split_plan(hq, hkv, d, call.gpu)
    args = {k: v for k, v in p.items() if k != "prefill"}
    attention = call.func(("kv4_attention", json.dumps(args, sort_keys=True), call.gpu),
                          lambda: kv4_attention.kv4_attention(**args, gpu=call.gpu, plan=plan))
    merge = call.func(("kv4_merge", hq, hkv, d, dtype, call.gpu),
                      lambda: kv4_attention.kv4_merge(hq, hkv, d, dtype, call.gpu, plan))
    ws = relax.TensorType(kv4_attention.workspace_shape(plan), "float32")
    both = call.emit(call.tir(attention, out=relax.TupleType([call.out, ws]), name="kv4_attention"))
    out, workspace = call.emit(relax.TupleGetItem(both, 0)), call.emit(relax.TupleGetItem(both, 1))
    return call.tir(merge, [out, workspace, call.args[3]], call.out, "kv4_merge", inplace=[0])


ALL = ("llvm", "cuda")
REGISTRY = Registry([
    Kernel("act_quant_cpu", "act_quant", ("llvm",),
           lambda call, p: call.tir(call.func(("act_quant_cpu", json.dumps(p, sort_keys=True)),
                                              lambda: act_quant.act_quant_cpu(**p))), act_quant_ref.reference),
    Kernel("act_quant", "act_quant", ALL, _same(act_quant.act_quant), act_quant_ref.reference),
    Kernel("argmax", "argmax", ALL, _same(argmax.argmax), argmax_ref.reference),
    *(Kernel(f"w8a8_gemm_{isa.name}", "w8a8_linear", ("llvm",), partial(_w8a8_cpu, isa), w8a8_ref.reference,
             supports=partial(lambda isa, p: w4a8_gemm_cpu.supports_w8a8(p["n"], p["k"], isa), isa),
             features=isa.features)
      for isa in w4a8_gemm_cpu.ISAS if isa.bytes_exact),
    Kernel("w8a8_matmul", "w8a8_linear", ALL, _w8a8, w8a8_ref.reference),
    Kernel("w4a8_gemm_tc", "w4a8_linear", ("cuda",), _w4a8_tensor_core, w4a8_ref.reference,
           supports=lambda p: w4a8_gemm_tc.supports_tensor_cores(p["n"], p["k"], p["group"])),
    *(Kernel(f"w4a8_gemm_{isa.name}", "w4a8_linear", ("llvm",), partial(_w4a8_cpu, isa), w4a8_ref.reference,
             supports=partial(lambda isa, p: w4a8_gemm_cpu.supports(p["n"], p["k"], p["group"], isa), isa),
             features=isa.features) for isa in w4a8_gemm_cpu.ISAS),
    Kernel("w4a8_matmul", "w4a8_linear", ALL, _w4a8_portable, w4a8_ref.reference, portable=True),
    Kernel("rope_q", "rope_q", ALL, _rope_q_te, kv4_ref.rope),
    Kernel("rope_q_rotated", "rope_q_rotated", ALL, _same(kv4_attention.rope_q_rotated), kv4_ref.rope),
    Kernel("kv4_append", "kv4_append", ALL, _same(kv4_attention.kv4_append), kv4_ref.packed_codes),
    Kernel("kv4_prefill", "kv4_attention", ("cuda",), _kv4_prefill, kv4_ref.attention,
           supports=lambda p: p["prefill"] and kv4_prefill.supports(p["head_dim"], p["dtype"])),
    Kernel("kv4_attention_cpu", "kv4_attention", ("llvm",), _kv4_cpu, kv4_ref.attention,
           supports=lambda p: kv4_attention_cpu.supports(p["head_dim"])),
    Kernel("kv4_attention", "kv4_attention", ALL, _kv4_split, kv4_ref.attention),
])
