"""``passes.dispatch_kernels`` as TVM tests its passes: a ``Before`` module of QoQ ops (what the model
emits, ``schedules.registry.OPS``) through the pass for a target, compared with an ``Expected``
module written out here with ``tvm.ir.assert_structural_equal``; plus the refusal of a portable
W4A8 GEMM on CUDA, and a compiled model's IR naming no kernel before dispatch and no op after it."""

from __future__ import annotations

import inspect
from functools import partial

import pytest

from qoq_compiler.errors import QoqcError
from qoq_compiler.passes.dispatch_kernels import dispatch_kernels
from qoq_compiler.tvm_env import tvm
from schedules import act_quant, kv4_attention, kv4_attention_cpu, kv4_prefill, w4a8_gemm, w4a8_gemm_cpu, w4a8_gemm_tc
from schedules.registry import OPS, REGISTRY, WEIGHT_LAYOUT_ATTR
from tvm import relax, tirx
from tvm.relax.frontend.nn import Tensor

LLVM = tvm.target.Target("llvm")  # a baseline x86-64: no integer dot products
VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})


def _module(params: list[relax.Var], body) -> tvm.IRModule:
    """A module whose ``main`` takes ``params`` and returns what ``body(bb, *params)`` emits last."""
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _before(params, op: str, out=None, inplace=None, **op_params) -> tvm.IRModule:
    def body(_bb, *args):
        res = OPS.emit(op, [Tensor(_expr=a) for a in args], out=out, inplace=inplace, **op_params)
        return res._expr
    return _module(params, body)


def _linear_params(k: int, n: int, bias: bool, group: int = 128):
    """A W4A8 linear's arguments, weights as the quantizers write them (what the model declares)."""
    t = tirx.Var("t", "int64")
    return [relax.Var("qx", relax.TensorType((1, t, k), "int8")),
            relax.Var("sx", relax.TensorType((1, t, 1), "float16")),
            relax.Var("q", relax.TensorType((n, k), "uint8")),
            relax.Var("s1", relax.TensorType((n,), "float16")),
            relax.Var("s2", relax.TensorType((n, -(-k // group)), "int8")),
            relax.Var("z2", relax.TensorType((n, -(-k // group)), "int8")),
            *([relax.Var("b", relax.TensorType((n,), "float32"))] if bias else [])]


def _mma(bb, q, s2, z2):
    """The weights reordered into the MMA layout, as both W4A8 kernels do (tagged for lifting)."""
    tag = {WEIGHT_LAYOUT_ATTR: True}
    return [bb.emit(bb.call_te(f, a, primfunc_name_hint=name, primfunc_attrs=tag))
            for f, a, name in ((w4a8_gemm.mma_pack_codes, q, "mma_pack_codes"),
                               (w4a8_gemm.mma_channel_columns, s2, "mma_channel_columns"),
                               (w4a8_gemm.mma_channel_columns, z2, "mma_channel_columns"))]


def _dispatch(mod, target, **kw):
    with target:
        return dispatch_kernels(target, REGISTRY, **kw)(mod)


def test_w4a8_linear_on_llvm_is_the_portable_gemm_then_bias_and_cast():
    params = _linear_params(256, 64, bias=True)
    before = _before(params, "w4a8_linear", n=64, k=256, group=128, bias=True, dtype="float16")

    def expected(bb, qx, sx, q, s1, s2, z2, b):
        qw, s2, z2 = _mma(bb, q, s2, z2)
        y = bb.emit_te(partial(w4a8_gemm.w4a8_matmul, group=128), qx, sx, qw, s1, s2, z2,
                       primfunc_name_hint="w4a8_matmul")
        y = bb.emit(relax.op.add(y, b))
        return relax.op.astype(y, "float16")

    tvm.ir.assert_structural_equal(_dispatch(before, LLVM), _module(params, expected))


@pytest.mark.parametrize("target,isa", [(VNNI, "avx512vnni"), (AVX2, "avx2")], ids=["vnni", "avx2"])
def test_w4a8_linear_on_a_dot_product_cpu_is_its_gemm_on_token_rows(target, isa):
    """The CPU's best instruction set picks the kernel; weights into its layout; the [1, T, K] rows
    without a reshape; fp32 before a bias."""
    isa = next(i for i in w4a8_gemm_cpu.ISAS if i.name == isa)
    params = _linear_params(256, 64, bias=True)
    before = _before(params, "w4a8_linear", n=64, k=256, group=128, bias=True, dtype="float16")
    tag = {WEIGHT_LAYOUT_ATTR: True}

    def expected(bb, qx, sx, q, s1, s2, z2, b):
        qv = bb.emit(bb.call_te(partial(w4a8_gemm_cpu.cpu_pack_codes, lanes=isa.lanes), q,
                                primfunc_name_hint="cpu_pack_codes", primfunc_attrs=tag))
        s2, z2 = (bb.emit(bb.call_te(partial(w4a8_gemm_cpu.cpu_channel_groups, lanes=isa.lanes), e,
                                     primfunc_name_hint="cpu_channel_groups", primfunc_attrs=tag)) for e in (s2, z2))
        gemm = bb.add_func(w4a8_gemm_cpu.cpu_gemm(64, 256, 128, isa, "float32"), "w4a8_gemm")
        y = bb.emit(relax.call_tir(gemm, [qx, sx, qv, s1, s2, z2],  # the rank-3 rows as they are
                                   relax.TensorType((*qx.ty.shape.values[:2], 64), "float32")))
        y = bb.emit(relax.op.add(y, b))
        return relax.op.astype(y, "float16")

    tvm.ir.assert_structural_equal(_dispatch(before, target), _module(params, expected))


@pytest.mark.parametrize("target,kernel", [(VNNI, "w8a8_gemm_avx512vnni"), (AVX2, "w8a8_matmul"),
                                           (LLVM, "w8a8_matmul")], ids=["vnni", "avx2", "baseline"])
def test_w8a8_linear_takes_the_dot_product_gemm_where_it_is_exact(target, kernel):
    """AVX2's int16 pair sums would saturate on 8-bit weights: W8A8 keeps the TE GEMM there."""
    t = tirx.Var("t", "int64")
    params = [relax.Var("qx", relax.TensorType((1, t, 64), "int8")),
              relax.Var("sx", relax.TensorType((1, t, 1), "float16")),
              relax.Var("qw", relax.TensorType((32, 64), "int8")), relax.Var("sw", relax.TensorType((32,), "float16"))]
    before = _before(params, "w8a8_linear", n=32, k=64, bias=False, dtype="float16")
    lines = []
    after = _dispatch(before, target, log=lines.append)
    assert lines == [f"qoqc: dispatch: w8a8_linear bias=False dtype=float16 k=64 n=32 -> {kernel}"]
    names = sorted(gv.name_hint for gv, f in after.functions_items() if isinstance(f, tirx.PrimFunc))
    assert names == (["cpu_pack_bytes", "w8a8_gemm"] if kernel != "w8a8_matmul" else ["w8a8_matmul"])


def test_w4a8_linear_on_cuda_is_the_tensor_core_gemm_on_token_rows():
    params = _linear_params(256, 64, bias=True)
    before = _before(params, "w4a8_linear", n=64, k=256, group=128, bias=True, dtype="float16")

    def expected(bb, qx, sx, q, s1, s2, z2, b):
        qw, s2, z2 = _mma(bb, q, s2, z2)
        lead = list(qx.ty.shape.values[:-1])
        qx2 = bb.emit(relax.op.reshape(qx, (-1, 256)))
        sx2 = bb.emit(relax.op.reshape(sx, (-1, 1)))
        gemm = bb.add_func(w4a8_gemm_tc.tensor_core_gemm(64, 256, 128), "w4a8_gemm")
        y = bb.emit(relax.call_tir(gemm, [qx2, sx2, qw, s1, s2, z2],
                                   relax.TensorType((qx2.ty.shape.values[0], 64), "float16")))
        y = bb.emit(relax.op.reshape(y, (*lead, 64)))
        b16 = bb.emit(relax.op.astype(b, "float16"))
        return relax.op.add(y, b16)

    tvm.ir.assert_structural_equal(_dispatch(before, CUDA), _module(params, expected))


def test_portable_w4a8_on_cuda_is_refused_unless_allowed():
    params = _linear_params(96, 64, bias=False, group=48)  # K = 96 is 32-aligned, but groups of 48 are not
    before = _before(params, "w4a8_linear", n=64, k=96, group=48, bias=False, dtype="float16")
    with pytest.raises(QoqcError, match="--allow-portable-kernels"):
        _dispatch(before, CUDA)
    lines = []
    after = _dispatch(before, CUDA, allow_portable=True, log=lines.append)
    assert lines == ["qoqc: dispatch: w4a8_linear bias=False dtype=float16 group=48 k=96 n=64 -> w4a8_matmul"]
    assert sorted(gv.name_hint for gv, f in after.functions_items() if isinstance(f, tirx.PrimFunc)) == [
        "mma_channel_columns", "mma_pack_codes", "w4a8_matmul"]


@pytest.mark.parametrize("target", [LLVM, CUDA], ids=["llvm", "cuda"])
def test_act_quant_takes_the_targets_form(target):
    t = tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType((1, t, 64), "float16"))
    w = relax.Var("w", relax.TensorType((64,), "float16"))
    out = [Tensor.placeholder((1, t, 64), "int8"), Tensor.placeholder((1, t, 1), "float16"),
           Tensor.placeholder((1, t, 1), "int32")]

    def before_body(_bb, x, w):
        res = OPS.emit("act_quant", [Tensor(_expr=x), Tensor(_expr=w)], out=out, kind="rmsnorm", k=64,
                       dtype="float16", eps=1e-5)
        return relax.Tuple([r._expr for r in res])

    before = _module([x, w], before_body)

    def expected(bb, x, w):
        func = (act_quant.act_quant("rmsnorm", 64, "float16", True, 1e-5) if target.kind.name == "cuda"
                else act_quant.act_quant_cpu("rmsnorm", 64, "float16", 1e-5))
        gv = bb.add_func(func, "rmsnorm_quantize")
        res = bb.emit(relax.call_tir(gv, [x, w], [o._expr.ty for o in out]))
        return relax.Tuple([bb.emit(relax.TupleGetItem(res, i)) for i in range(3)])

    tvm.ir.assert_structural_equal(_dispatch(before, target), _module([x, w], expected))


def _attention_params(hq: int, hkv: int, d: int):
    n, s, b, mp = (tirx.Var(v, "int64") for v in ("n", "s", "b", "mp"))
    return [relax.Var("q", relax.TensorType((n, hq, d), "float16")),
            relax.Var("data", relax.TensorType((2, 2, s, hkv, d // 2), "uint8")),
            relax.Var("param", relax.TensorType((2, 2, s, hkv, 2), "float16")),
            relax.Var("pos", relax.TensorType((n,), "int32")), relax.Var("seq", relax.TensorType((n,), "int32")),
            relax.Var("table", relax.TensorType((b, mp), "int32"))]


@pytest.mark.parametrize("target,prefill", [(LLVM, True), (CUDA, False), (CUDA, True)],
                         ids=["llvm-prefill", "cuda-decode", "cuda-prefill"])
def test_kv4_attention_is_the_cpu_kernel_or_split_attention_and_merge_or_the_tensor_core_prefill(target, prefill):
    hq, hkv, d, sm = 6, 2, 64, 0.125
    params = _attention_params(hq, hkv, d)
    op_params = dict(num_layers=2, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=16, sm_scale=sm,
                     dtype="float16")
    layer = tirx.IntImm("int64", 1)
    out = Tensor.placeholder(params[0].ty.shape.values, "float16")

    def before_body(_bb, *args):
        return OPS.emit("kv4_attention", [*[Tensor(_expr=a) for a in args], layer], out=out, prefill=prefill,
                        **op_params)._expr

    before = _module(params, before_body)
    gpu = target.kind.name == "cuda"

    def expected(bb, q, data, param, pos, seq, table):
        args = [q, data, param, pos, seq, table, relax.prim_value(layer)]
        if gpu and prefill:
            gv = bb.add_func(kv4_prefill.kv4_prefill(2, hq, hkv, d, 16, sm), "kv4_prefill")
            return relax.call_tir(gv, args, out._expr.ty)
        if not gpu:
            gv = bb.add_func(kv4_attention_cpu.kv4_attention_cpu(**op_params), "kv4_attention")
            return relax.call_tir(gv, args, out._expr.ty)
        plan = kv4_attention.split_plan(hq, hkv, d, gpu)
        attention = bb.add_func(kv4_attention.kv4_attention(**op_params, gpu=gpu, plan=plan), "kv4_attention")
        merge = bb.add_func(kv4_attention.kv4_merge(hq, hkv, d, "float16", gpu, plan), "kv4_merge")
        both = bb.emit(relax.call_tir(attention, args, [out._expr.ty, relax.TensorType(
            kv4_attention.workspace_shape(plan), "float32")]))
        o, ws = bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))
        return relax.call_tir_inplace(merge, [o, ws, pos], [0], out._expr.ty)

    tvm.ir.assert_structural_equal(_dispatch(before, target), _module(params, expected))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["rtn-w4a8kv4", "fp16"])
def test_compiled_model_names_its_target_only_after_dispatch(quant, tiny_dirs, tmp_path):
    """The exported model's IR is the same for llvm and CUDA until the dispatch step; afterwards no
    op definition or generic cache creation is left, and each target has its own kernels. No
    function of the llvm build is left a scalar single-core loop nest."""
    from qoq_compiler import compile
    from qoq_compiler.frontend.llama import KV_CACHE_CREATE
    from schedules import nvcc

    targets = ["llvm"] + (["cuda"] if nvcc.nvcc_path() is not None else [])
    ir = {}
    for target in targets:
        out = compile(tiny_dirs["llama"], target=target, quant=quant, output=tmp_path / target, dump_ir=True,
                      progress=False)
        ir[target] = {p.stem: p.read_text() for p in (out / "ir").glob("0*.py")}
        generic = "qoq.kernel" if quant != "fp16" else KV_CACHE_CREATE
        assert generic in ir[target]["02-quantize"] and generic not in ir[target]["03-dispatch"]
        # the W4A8 weights' reordering left the functions: the artifact holds them in the MMA layout
        assert "cls.mma_pack_codes" not in ir[target]["03-dispatch"]
    if quant != "fp16":  # the fp16 build's attention is TVM's paged KV cache, with its own CPU kernels
        assert not unscheduled_cpu_functions(ir["llvm"]["06-vm"])
    if "cuda" in ir:
        assert ir["llvm"]["02-quantize"] == ir["cuda"]["02-quantize"]
        assert "threadIdx" in ir["cuda"]["03-dispatch"] and "threadIdx" not in ir["llvm"]["03-dispatch"]


def unscheduled_cpu_functions(vm_ir: str) -> list[str]:
    """The PrimFuncs of an llvm build (its ``06-vm.py``) that are scalar single-core loop nests: no
    parallel loop, no vector loop, and not a hand-scheduled kernel. The VM's shape functions and
    symbolic expressions (host integer arithmetic on a few shape values) are not kernels."""
    import re

    found = []
    scheduled = re.compile(r"T\.parallel|T\.vectorized|tirx\.is_scheduled")
    for func in re.split(r"\n    @T\.prim_func", vm_ir)[1:]:
        name = re.search(r"def (\w+)\(", func).group(1)
        if not name.startswith(("shape_func", "compute_symbolic_expr")) and not scheduled.search(func):
            found.append(name)
    return found


def test_unscheduled_cpu_functions_are_found():
    head = "\n    @T.prim_func(private=True)\n    def "
    vm_ir = (head + "add(a):\n        for i in range(4):\n            a[i] = 1"
             + head + "vec(a):\n        for i in T.vectorized(4):\n            a[i] = 1"
             + head + "shape_func(a):\n        a[0] = 1")
    assert unscheduled_cpu_functions(vm_ir) == ["add"]


def test_frontend_names_no_kernel_and_no_target():
    """The model says what to compute: no kernel of the registry (other than an op's own name) and
    no GPU appears in the frontend or the linear rewrite, and the models take no target."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "qoq_compiler"
    kernels = {k.name for k in REGISTRY.kernels} - {k.op for k in REGISTRY.kernels}
    for path in [*(root / "frontend").glob("*.py"), root / "passes" / "quantize_linears.py"]:
        src = path.read_text()
        assert not [k for k in kernels if k in src], path
        assert "cuda" not in src.lower() and "gpu" not in src.lower(), path
    from qoq_compiler.frontend.llama import LlamaForCausalLM, LlamaKV4ForCausalLM

    for model in (LlamaForCausalLM, LlamaKV4ForCausalLM):
        assert "target" not in inspect.signature(model.__init__).parameters


def test_float_kv_cache_is_built_for_the_target():
    """``dispatch_kv_cache``: the model's target-free creation call becomes TVM's paged KV cache for
    the target, the function's parameters and the rest of the module unchanged."""
    from qoq_compiler.config import ModelConfig
    from qoq_compiler.frontend.llama import KV_CACHE_CREATE, LlamaForCausalLM
    from qoq_compiler.passes.dispatch_kv_cache import dispatch_kv_cache
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                      tie_word_embeddings=True, context_window=128)
    model = LlamaForCausalLM(cfg, "float16", OPS)
    before, _ = model.export_tvm(spec=model.get_default_spec())
    assert KV_CACHE_CREATE in before["create_kv_cache"].script()
    for target in (LLVM, CUDA):
        with target:
            after = dispatch_kv_cache(target)(before)
        func = before["create_kv_cache"]
        sizes = [p.ty.values[0] for p in func.params]
        bb = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in before.functions_items()
                                              if gv.name_hint != "create_kv_cache"}))
        with bb.function("create_kv_cache", list(func.params), attrs=dict(func.attrs)):
            with bb.dataflow():
                cache = TIRPagedKVCache(
                    attn_kind="mha", max_batch_size=sizes[0], max_total_seq_len=sizes[1],
                    prefill_chunk_size=sizes[2], page_size=sizes[3], support_sliding_window=sizes[4],
                    layer_partition=relax.ShapeExpr([0, 2]), num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, qk_head_dim=8, v_head_dim=8, mla_original_qk_head_dim=0,
                    mla_original_v_head_dim=0, rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=1e4,
                    rope_scaling={}, rope_ext_factors=relax.prim_value(0), rotary_dim=8, enable_disaggregation=False,
                    dtype="float16", target=target)
                out = bb.emit_output(cache._expr)
            bb.emit_func_output(out)
        tvm.ir.assert_structural_equal(after, bb.get(), map_free_vars=True)


def test_every_kernel_has_a_reference_and_every_op_a_kernel_on_each_target():
    """The registry's invariants: each kernel names its NumPy reference (``schedules/reference``),
    and each op the model can emit has a kernel on llvm and on cuda."""
    for k in REGISTRY.kernels:
        assert k.reference.__module__.startswith("schedules.reference."), k.name
    for op in OPS.definitions:
        for kind in ("llvm", "cuda"):
            assert any(k.op == op and kind in k.targets for k in REGISTRY.kernels), (op, kind)


def test_weight_layouts_are_lifted_out_of_the_functions():
    """``lift_weight_layouts``: a tagged reordering of a packed parameter leaves the function, the
    parameter takes the reordered type, and the module records which layout it needs."""
    from qoq_compiler.passes.lift_weight_layouts import lift_weight_layouts, take_lifted_layouts
    from tvm import te

    def transpose(w):
        return te.compute((w.shape[1], w.shape[0]), lambda i, j: w[j, i], name="t")

    def add(x, w):
        return te.compute(x.shape, lambda i, j: x[i, j] + w[i, j], name="y")

    def module(reordered: bool):
        x = relax.Var("x", relax.TensorType((4, 8), "float32"))
        w_ty, v_ty = relax.TensorType((8, 4) if not reordered else (4, 8), "float32"), relax.TensorType((3,), "int8")
        packed = relax.Var("packed_params", relax.TupleType([v_ty, w_ty]))
        bb = relax.BlockBuilder()
        with bb.function("main", [x, packed], attrs={"num_input": 1}):
            with bb.dataflow():
                w = bb.emit(relax.TupleGetItem(packed, 1))
                if not reordered:
                    w = bb.emit(bb.call_te(transpose, w, primfunc_name_hint="transpose",
                                           primfunc_attrs={WEIGHT_LAYOUT_ATTR: True}))
                out = bb.emit_output(bb.call_te(add, x, w, primfunc_name_hint="add"))
            bb.emit_func_output(out)
        return bb.get()

    before = module(reordered=False)
    after, layouts = take_lifted_layouts(lift_weight_layouts(WEIGHT_LAYOUT_ATTR)(before))
    expected = module(reordered=True)
    kept = tvm.IRModule({gv: f for gv, f in after.functions_items() if gv.name_hint != "transpose"})  # unused now
    tvm.ir.assert_structural_equal(kept, expected)
    assert list(layouts) == [1] and layouts[1][2:] == ((4, 8), "float32")
    tvm.ir.assert_structural_equal(layouts[1][1], before["transpose"])
