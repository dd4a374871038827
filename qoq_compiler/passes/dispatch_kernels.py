"""DispatchKernels: choose, for the target, the kernel that runs each QoQ op of a Relax module.

The model emits what to compute: every QoQ op (W4A8/W8A8 linear, activation quantization, KV4
append and attention, RoPE of q, argmax) is a call_tir of a definition tagged with the function
attributes ``qoq.kernel`` (the op) and ``qoq.params`` (its parameters, JSON), which the registry
writes and reads (``op_of``). This pass decides how:
for each such call it asks the kernel registry (``schedules.registry.REGISTRY``, handed in by the
compiler) for the first kernel built for the target kind, whose CPU features (an llvm target's
``mcpu``: VNNI, AVX2, Arm dot products) the target has, that supports the parameters, and
replaces the call by what that kernel emits (one call_tir, or a few bindings: the tensor-core GEMM
reshapes its operands to [tokens, K]; split attention adds a workspace and a merge). The op is
recognised by its callee's attributes, never by a function's name. The definitions left unused are
removed, so the module names no generic op afterwards.

A W4A8 linear that would fall back to the portable GEMM on CUDA (a shape the tensor-core kernel
does not take) raises, unless ``allow_portable``: it would run an order of magnitude slower.
``log`` receives one line per choice (op and parameters -> kernel). Every choice is made, and
checked, before the module changes.
"""

from __future__ import annotations

from typing import Callable

import tvm_ffi
import tvm
from tvm import ir, relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..errors import QoqcError

# raised inside the pass, it crosses TVM's FFI: registered, it comes back out as itself
tvm_ffi.register_error("QoqcError", QoqcError)


def tagged_ops(mod: ir.IRModule, registry) -> dict[ir.GlobalVar, tuple[str, dict]]:
    """The module's op definitions, as the registry reads their tags: global var -> (op, parameters)."""
    found = ((gv, registry.op_of(f)) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
    return {gv: op for gv, op in found if op is not None}


def choose(ops: dict, registry, target, allow_portable: bool = False,
           log: Callable[[str], None] | None = None) -> dict:
    """The kernel of each op definition (global var -> kernel), checked before anything changes."""
    kind, gpu = target.kind.name, "gpu" in target.keys
    features = set() if gpu else {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(target)}
    chosen, said = {}, set()
    for gv, (name, params) in ops.items():
        kernel = registry.select(name, params, kind, features)
        if kernel is None:
            raise QoqcError(f"no kernel runs {name} {_describe(params)} on {kind}")
        if kernel.portable and gpu and not allow_portable:
            raise QoqcError(f"{name} {_describe(params)}: no tensor-core kernel takes this shape on {kind}, so it "
                            "would run on the portable kernel (an order of magnitude slower); "
                            "--allow-portable-kernels accepts that")
        line = f"qoqc: dispatch: {name} {_describe(params)} -> {kernel.name}"
        if log is not None and line not in said:  # entry points may hold equal definitions of their own
            said.add(line)
            log(line)
        chosen[gv] = kernel
    return chosen


@mutator
class _Dispatch(PyExprMutator):
    def __init__(self, mod, ops: dict, chosen: dict, registry, gpu: bool):
        super().__init__(mod)
        self.ops, self.chosen, self.registry, self.gpu, self.built = ops, chosen, registry, gpu, {}
        self.call_tir, self.call_tir_inplace = ir.Op.get("relax.call_tir"), ir.Op.get("relax.call_tir_inplace")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op not in (self.call_tir, self.call_tir_inplace) or call.args[0] not in self.ops:
            return call
        gv = call.args[0]
        inplace = [int(i) for i in call.attrs.inplace_indices] if call.op == self.call_tir_inplace else None
        site = self.registry.call_site(self.builder_, list(call.args[1].fields), call.ty_args[0], gv.name_hint,
                                       self.gpu, inplace, self.built)
        return self.chosen[gv].emit(site, self.ops[gv][1])


def _describe(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k != "rope_scaling")


def dispatch_kernels(target, registry, allow_portable: bool = False,
                     log: Callable[[str], None] | None = None) -> "ir.transform.Pass":
    """The pass for ``target``, choosing from ``registry`` (``schedules.registry.REGISTRY``)."""

    @ir.transform.module_pass(opt_level=0, name="DispatchKernels")
    def dispatch(mod: ir.IRModule, _ctx) -> ir.IRModule:
        ops = tagged_ops(mod, registry)
        if not ops:
            return mod
        chosen = choose(ops, registry, target, allow_portable, log)
        # the definitions leave first, so the kernels that replace them may take their names
        rest = ir.IRModule({gv: f for gv, f in mod.functions_items() if gv not in ops}, attrs=mod.attrs,
                           global_infos=mod.global_infos)
        d = _Dispatch(rest, ops, chosen, registry, "gpu" in target.keys)
        for gv, func in rest.functions_items():
            if isinstance(func, relax.Function):
                d.builder_.update_func(gv, d.visit_expr(func))
        return relax.transform.CanonicalizeBindings()(d.builder_.get())  # no var = var left by replaced calls

    return dispatch
