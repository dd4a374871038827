"""LiftWeightLayouts: a kernel's weight layout applied once, at compile time, not at every call.

The model declares its weights as the quantizers write them; a kernel that reads a weight in a
layout of its own (both W4A8 GEMMs read the MMA layout, ``layout.py``) reorders it, as dispatched:
    w = packed_params[i];   w2 = call_tir(layout, (w,));   ... kernel(..., w2, ...)
with ``layout`` a PrimFunc tagged ``layout_attr``. This pass takes each such reordering out of
every function: field i of the packed parameter tuple takes the reordered type, the kernel reads
it directly, and the module records which layout each parameter needs (module attribute
``LIFTED`` = {i: layout function name}; the layout PrimFuncs stay in the module until the lowering
drops them as unused). The compiler runs each recorded layout on weight i as it writes the
weights, so the artifact holds every weight in its kernel's layout and no reordering runs when the
model does. A parameter that two functions reorder differently is an error.
"""

from __future__ import annotations

import tvm_ffi
from tvm import ir, relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..errors import QoqcError

LIFTED = "qoq.lifted_layouts"


def _packed(func: relax.Function) -> relax.Var | None:
    """A function's packed parameter tuple (the parameter after its ``num_input`` inputs), or None."""
    if func.attrs is None or "num_input" not in func.attrs:
        return None
    n = int(func.attrs["num_input"])
    return func.params[n] if len(func.params) == n + 1 and isinstance(func.params[n].ty, relax.TupleType) else None


def _reorderings(func: relax.Function, packed: relax.Var, layouts: dict) -> dict[int, tuple]:
    """{parameter index: (layout global var, reordered type)} of the layout calls in ``func``."""
    items, found = {}, {}
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(packed):
                items[b.var] = v.index
            elif isinstance(v, relax.Call) and v.op == ir.Op.get("relax.call_tir") and v.args[0] in layouts:
                weight = v.args[1].fields[0]
                if weight not in items:
                    raise QoqcError(f"weight layout {v.args[0].name_hint} applied to something else than a parameter")
                found[items[weight]] = (v.args[0], b.var.ty)
    return found


@mutator
class _Lift(PyExprMutator):
    def __init__(self, mod, layouts):
        super().__init__(mod)
        self.layouts, self.call_tir = layouts, ir.Op.get("relax.call_tir")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if call.op == self.call_tir and call.args[0] in self.layouts:
            return self.visit_expr(call.args[1].fields[0])  # the parameter, already in the layout
        return self.visit_expr_post_order(call)


def lift_weight_layouts(layout_attr: str) -> "ir.transform.Pass":
    """The pass; ``layout_attr``: the attribute that marks a layout PrimFunc (the registry's)."""

    @ir.transform.module_pass(opt_level=0, name="LiftWeightLayouts")
    def lift(mod: ir.IRModule, _ctx) -> ir.IRModule:
        layouts = {gv for gv, f in mod.functions_items()
                   if isinstance(f, tirx.PrimFunc) and f.attrs is not None and layout_attr in f.attrs}
        if not layouts:
            return mod
        funcs = {gv: f for gv, f in mod.functions_items() if isinstance(f, relax.Function) and _packed(f) is not None}
        found: dict[int, tuple] = {}
        for f in funcs.values():
            for i, (gv, ty) in _reorderings(f, _packed(f), layouts).items():
                if i in found and not (tvm_ffi.structural_equal(mod[found[i][0]], mod[gv])
                                       and tvm_ffi.structural_equal(found[i][1], ty)):
                    raise QoqcError(f"parameter {i} is read in two different kernel layouts")
                found.setdefault(i, (gv, ty))
        lift = _Lift(mod, layouts)
        for gv, f in funcs.items():
            packed = _packed(f)
            fields = [found[i][1] if i in found else t for i, t in enumerate(packed.ty.fields)]
            new_packed = relax.Var(packed.name, relax.TupleType(fields))
            lift.set_var_remap(packed, new_packed)
            body = lift.visit_expr(f.body)
            lift.builder_.update_func(gv, relax.Function([*f.params[:-1], new_packed], body, f.ret_ty, f.is_pure,
                                                         f.attrs))
        out = relax.transform.CanonicalizeBindings()(lift.builder_.get())
        return out.with_attr(LIFTED, {str(i): gv.name_hint for i, (gv, _) in sorted(found.items())})

    return lift


def take_lifted_layouts(mod: ir.IRModule) -> tuple[ir.IRModule, dict[int, tuple[str, tirx.PrimFunc, tuple[int, ...],
                                                                                str]]]:
    """(module without the record, what the pass recorded: {parameter index: (layout function's
    name, layout PrimFunc, reordered shape, dtype)}; parameters of one shape share one layout)."""
    if mod.attrs is None or LIFTED not in mod.attrs:
        return mod, {}
    packed = next(_packed(f) for _, f in mod.functions_items()
                  if isinstance(f, relax.Function) and _packed(f) is not None)
    out = {}
    for i, name in mod.attrs[LIFTED].items():
        ty = packed.ty.fields[int(i)]
        out[int(i)] = (str(name), mod[str(name)], tuple(int(d) for d in ty.shape.values), str(ty.dtype))
    return mod.without_attr(LIFTED), out
