"""Tensor-core W4A8 GEMM for CUDA (sm_80, sm_90): ``w4a8_gemm``'s computation on ``mma.sync``.

Same arguments and math as the portable kernel (``schedules.w4a8_gemm``), output fp16 [M, N]:
    per group:   y = psum * sx * s1                 psum = qx . (q * s2 - z2)   (int8 x int8 -> int32)
    per channel: y = psum * sx * s1 - z * sx * xsum psum = qx . q              (int8 x uint4 -> int32)

One CTA computes a bm x bn tile of y; its warps_m x warps_n warps each own a (bm / warps_m) x
(bn / warps_n) sub-tile (bn / warps_n a multiple of 32). K advances bk at a time through a
``stages``-deep cp.async pipeline into shared memory:
  A  int8 [stages, bm, bk]: 16-byte chunks XOR-swizzled by row (``TileMaps.a_col``) so ldmatrix
     reads are free of bank conflicts; rows past M are clamped to M - 1 (computed, never stored).
  B  uint32 [stages, bn/32, bk/32, 32, 4]: MMA-layout tiles (``qoq_compiler.layout``) copied as
     they lie in memory, 512 contiguous bytes per 32 x 32 tile.
Per 32-wide k step a warp loads its A fragments with ldmatrix.x4 (16 rows each) and, per 32
channels, one 16-byte B vector per lane that becomes eight s8 fragment registers in registers
(``b_register``): per channel ``(x >> 4h) & 0x0F0F0F0F`` (u4 codes are valid s8 values); per group
the same followed by ``bytes_mul_sub`` with this lane's s2 and z2 bytes (one 4-byte load each:
channels l, 8 + l, 16 + l, 24 + l lie in one word in MMA channel order), i.e. one 32-bit multiply
of four u8 by the group scale, then a bytewise subtraction of the zero. Then mma.sync.m16n8k32
s8 x s8 -> s32 for every (16-row, 8-channel) block. The epilogue scales the accumulators in
registers and writes fp16. ``tensor_core_gemm`` holds one launch per tile configuration and picks
one at run time from M (``DEFAULT_TILES``: decode, medium, prefill).

Every index the kernel computes comes from ``TileMaps``; ``emulate`` runs the same maps in NumPy
with the PTX ISA's definitions of ldmatrix and the m16n8k32 fragments, so CPU tests check the
kernel's data movement against ``schedules/reference/w4a8_gemm.py`` without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from qoq_compiler.formats import ceildiv, round_up

from .intrin import fast_tvmscript
from .reference.ptx import ldmatrix_x4, mma_m16n8k32_s8
from .w4a8_gemm import bytes_mul_sub, u32_const


@dataclass(frozen=True)
class TileConfig:
    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def smem_bytes(self) -> int:
        return self.stages * (self.bm * self.bk + self.bn * self.bk // 2)


#: (largest M it serves, tile), increasing M; the last serves every larger M. QServe's per-group
#: choices (``../shared/notes/qoq-reference.md`` §2.1): warp tiles 32 x 32, 32 x 32, 64 x 32.
DEFAULT_TILES = (
    (64, TileConfig(bm=32, bn=64, bk=128, warps_m=1, warps_n=2, stages=3)),
    (256, TileConfig(bm=64, bn=64, bk=64, warps_m=2, warps_n=2, stages=4)),
    (None, TileConfig(bm=128, bn=128, bk=64, warps_m=2, warps_n=4, stages=3)),
)


def fit_tile(cfg: TileConfig, n: int, k: int) -> TileConfig:
    """Shrink ``cfg`` until bn divides pad32(n) and bk divides k (both stay multiples of 32)."""
    n32 = round_up(n, 32)
    while n32 % cfg.bn:
        cfg = replace(cfg, bn=cfg.bn // 2, warps_n=max(1, cfg.warps_n // 2))
    while k % cfg.bk:
        cfg = replace(cfg, bk=cfg.bk // 2)
    return cfg


def supports_tensor_cores(n: int, k: int, group: int | None) -> bool:
    """K in whole 32-wide k steps (16-byte aligned activation rows), groups of whole k steps."""
    return k % 32 == 0 and (group is None or group % 32 == 0)


class TileMaps:
    """Every index of one tile configuration's kernel, as expressions that work on Python ints,
    NumPy arrays and TIR alike. ``it``: copy iteration, ``tx``: thread, ``lane`` = tx % 32."""

    def __init__(self, n: int, k: int, group: int | None, cfg: TileConfig):
        self.n, self.k, self.group, self.cfg = n, k, group, cfg
        self.threads = cfg.threads
        self.tm, self.tn = cfg.bm // cfg.warps_m, cfg.bn // cfg.warps_n
        self.mi_n, self.ni_n, self.ki_n = self.tm // 16, self.tn // 32, cfg.bk // 32
        self.cpr = cfg.bk // 16                                    # 16-byte chunks per A row
        self.rows_per_swizzle = max(1, 8 // self.cpr)              # rows sharing one XOR pattern
        self.a_iters = ceildiv(cfg.bm * self.cpr, self.threads)
        self.b_iters = ceildiv(cfg.bn * cfg.bk // 32, self.threads)
        self.k_tiles, self.n_tiles = k // cfg.bk, round_up(n, 32) // cfg.bn

    # global -> shared copies (16 bytes per thread and iteration)
    def a_copy_valid(self, it, tx):
        return it * self.threads + tx < self.cfg.bm * self.cpr

    def a_row(self, it, tx):
        return (it * self.threads + tx) // self.cpr

    def a_chunk(self, it, tx):
        return (it * self.threads + tx) % self.cpr

    def a_col(self, row, chunk):
        """Byte column in shared memory of 16-byte chunk ``chunk`` of A row ``row`` (swizzled)."""
        return (chunk ^ (row // self.rows_per_swizzle % self.cpr)) * 16

    def b_copy_valid(self, it, tx):
        return it * self.threads + tx < self.cfg.bn * self.cfg.bk // 32

    def b_tile_n(self, it, tx):
        return (it * self.threads + tx) // 32 // self.ki_n

    def b_tile_k(self, it, tx):
        return (it * self.threads + tx) // 32 % self.ki_n

    # shared -> registers
    def frag_row(self, wm, mi, lane):
        """A row whose address lane gives ldmatrix.x4 for 16-row block mi."""
        return wm * self.tm + mi * 16 + lane % 16

    def frag_chunk(self, ki, lane):
        return ki * 2 + lane // 16

    def b_tile(self, wn, ni):
        return wn * (self.tn // 32) + ni

    def group_index(self, k_tile, ki):
        return (k_tile * self.cfg.bk + ki * 32) // self.group

    def scale_word(self, bx, wn, ni, lane):
        """Word of the [G, N/8] uint32 view of s2/z2 holding this lane's four channels."""
        return (bx * self.cfg.bn + wn * self.tn + ni * 32) // 4 + lane // 4

    # accumulators and output
    def acc(self, mi, ni, j, c):
        return ((mi * self.ni_n + ni) * 4 + j) * 4 + c

    def out_row(self, by, wm, mi, lane, c):
        return by * self.cfg.bm + wm * self.tm + mi * 16 + lane // 4 + c // 2 * 8

    def out_col(self, bx, wn, ni, j, lane, c):
        return bx * self.cfg.bn + wn * self.tn + ni * 32 + j * 8 + lane % 4 * 2 + c % 2


def b_register(words, h: int, s: int, p: int, scales=None, zeros=None, u32=np.uint32):
    """Fragment register p of n8 block 2h + s from a lane's four MMA-layout words (``words[i]``), as
    s8x4: low (h = 0) or high (h = 1) nibbles of word 2p + s, dequantized to the level-2 int8 weight
    with byte 2h + s of the lane's s2/z2 words when per group."""
    codes = (words[p * 2 + s] >> u32(4 * h)) & u32(0x0F0F0F0F)
    if scales is None:
        return codes
    shift = u32(8 * (h * 2 + s))
    return bytes_mul_sub(codes, (scales >> shift) & u32(0xFF), (zeros >> shift) & u32(0xFF), u32)


def _launch(maps: TileMaps):
    """TVMScript macro: one launch of the kernel with ``maps``' tile."""
    cfg, group = maps.cfg, maps.group
    bm, bk, stages, threads = cfg.bm, cfg.bk, cfg.stages, cfg.threads
    mi_n, ni_n, ki_n, n = maps.mi_n, maps.ni_n, maps.ki_n, maps.n
    per_group = group is not None

    @T.macro
    def launch(m, qx, sx, qw, s1, e0, e1, y):
        bx = T.env_thread("blockIdx.x")
        by = T.env_thread("blockIdx.y")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(bx, maps.n_tiles)
        T.launch_thread(by, T.Cast("int32", (m + bm - 1) // bm))
        T.launch_thread(tx, threads)
        a_sh = T.decl_buffer((stages, bm, bk), "int8", scope="shared")
        b_sh = T.decl_buffer((stages, cfg.bn // 32, ki_n, 32, 4), "uint32", scope="shared")
        acc = T.decl_buffer((mi_n * ni_n * 16,), "uint32", scope="local")
        a = T.decl_buffer((mi_n * 4,), "uint32", scope="local")
        w = T.decl_buffer((4,), "uint32", scope="local")
        b = T.decl_buffer((ni_n * 8,), "uint32", scope="local")
        sz = T.decl_buffer((2,), "uint32", scope="local")
        for i in T.unroll(mi_n * ni_n * 16):
            acc[i] = T.uint32(0)
        # iteration t loads k tile t into stage t % stages and computes tile t - (stages - 1)
        for t in T.serial(maps.k_tiles + stages - 1):
            if t >= stages - 1:
                T.ptx["cp.async.wait_group"](stages - 2)
                T.evaluate(T.cuda.cta_sync())
            if t < maps.k_tiles:
                for it in T.unroll(maps.a_iters):
                    if maps.a_copy_valid(it, tx):
                        T.ptx["cp.async.cg.shared.global"](
                            a_sh.ptr_to([t % stages, maps.a_row(it, tx),
                                         maps.a_col(maps.a_row(it, tx), maps.a_chunk(it, tx))]),
                            qx.ptr_to([T.min(by * bm + maps.a_row(it, tx), T.Cast("int32", m) - 1),
                                       t * bk + maps.a_chunk(it, tx) * 16]), 16)
                for it in T.unroll(maps.b_iters):
                    if maps.b_copy_valid(it, tx):
                        T.ptx["cp.async.cg.shared.global"](
                            b_sh.ptr_to([t % stages, maps.b_tile_n(it, tx), maps.b_tile_k(it, tx), tx % 32, 0]),
                            qw.ptr_to([bx * (cfg.bn // 32) + maps.b_tile_n(it, tx),
                                       t * ki_n + maps.b_tile_k(it, tx), tx % 32, 0]), 16)
            T.ptx["cp.async.commit_group"]()
            if t >= stages - 1:  # stage (t - (stages - 1)) % stages == (t + 1) % stages
                for ki in T.unroll(ki_n):
                    for mi in T.unroll(mi_n):
                        T.ptx["ldmatrix.sync.aligned.m8n8.x4.shared.b16"](
                            a[mi * 4], a[mi * 4 + 1], a[mi * 4 + 2], a[mi * 4 + 3],
                            a_sh.ptr_to([(t + 1) % stages, maps.frag_row(tx // 32 // cfg.warps_n, mi, tx % 32),
                                         maps.a_col(maps.frag_row(tx // 32 // cfg.warps_n, mi, tx % 32),
                                                    maps.frag_chunk(ki, tx % 32))]))
                    for ni in T.unroll(ni_n):
                        for i in T.vectorized(4):
                            w[i] = b_sh[(t + 1) % stages, maps.b_tile(tx // 32 % cfg.warps_n, ni), ki, tx % 32, i]
                        if per_group:
                            sz[0] = e0[maps.group_index(t + 1 - stages, ki),
                                       maps.scale_word(bx, tx // 32 % cfg.warps_n, ni, tx % 32)]
                            sz[1] = e1[maps.group_index(t + 1 - stages, ki),
                                       maps.scale_word(bx, tx // 32 % cfg.warps_n, ni, tx % 32)]
                        for h in T.unroll(2):
                            for s in T.unroll(2):
                                for p in T.unroll(2):
                                    if per_group:
                                        b[ni * 8 + (h * 2 + s) * 2 + p] = b_register(w, h, s, p, sz[0], sz[1],
                                                                                     u32_const)
                                    else:
                                        b[ni * 8 + (h * 2 + s) * 2 + p] = b_register(w, h, s, p, u32=u32_const)
                    for mi in T.unroll(mi_n):
                        for ni in T.unroll(ni_n):
                            for j in T.unroll(4):
                                T.ptx["mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"](
                                    acc[maps.acc(mi, ni, j, 0)], acc[maps.acc(mi, ni, j, 1)],
                                    acc[maps.acc(mi, ni, j, 2)], acc[maps.acc(mi, ni, j, 3)],
                                    a[mi * 4], a[mi * 4 + 1], a[mi * 4 + 2], a[mi * 4 + 3],
                                    b[ni * 8 + j * 2], b[ni * 8 + j * 2 + 1],
                                    acc[maps.acc(mi, ni, j, 0)], acc[maps.acc(mi, ni, j, 1)],
                                    acc[maps.acc(mi, ni, j, 2)], acc[maps.acc(mi, ni, j, 3)])
        T.ptx["cp.async.wait_all"]()
        for mi in T.unroll(mi_n):
            for c in T.unroll(4):
                if maps.out_row(by, tx // 32 // cfg.warps_n, mi, tx % 32, c) < T.Cast("int32", m):
                    for ni in T.unroll(ni_n):
                        for j in T.unroll(4):
                            if maps.out_col(bx, tx // 32 % cfg.warps_n, ni, j, tx % 32, c) < n:
                                y[maps.out_row(by, tx // 32 // cfg.warps_n, mi, tx % 32, c),
                                  maps.out_col(bx, tx // 32 % cfg.warps_n, ni, j, tx % 32, c)] = T.Cast(
                                    "float16", _output(
                                        T.reinterpret("int32", acc[maps.acc(mi, ni, j, c)]), sx, s1, e0, e1,
                                        maps.out_row(by, tx // 32 // cfg.warps_n, mi, tx % 32, c),
                                        maps.out_col(bx, tx // 32 % cfg.warps_n, ni, j, tx % 32, c),
                                        per_group, _f32))

    return launch


def _f32(v):
    return v.astype("float32")


def _output(psum, sx, s1, z, xsum, row, col, per_group: bool, f32):
    """Output (row, col) from its int32 accumulator, in ``reference``'s order of operations:
    psum * sx * s1, minus z * sx * xsum per channel (``z``, ``xsum`` unused per group)."""
    y = f32(psum) * f32(sx[row, 0]) * f32(s1[col])
    return y if per_group else y - f32(z[col]) * f32(sx[row, 0]) * f32(xsum[row, 0])


def tile_maps(n: int, k: int, group: int | None, tiles=DEFAULT_TILES) -> list[tuple[int | None, TileMaps]]:
    """(largest M, maps) of each launch, tiles fitted to the shape."""
    return [(limit, TileMaps(n, k, group, fit_tile(cfg, n, k))) for limit, cfg in tiles]


def tensor_core_gemm(n: int, k: int, group: int | None, tiles=DEFAULT_TILES) -> tirx.PrimFunc:
    """CUDA PrimFunc (qx, sx, qw, s1, *extra, y fp16 [M, N]) with the portable kernel's arguments
    (``extra`` = (z, xsum) per channel, (s2, z2) per group); M symbolic. ``tiles``: three
    (largest M, TileConfig) pairs, the last one's M None."""
    if not supports_tensor_cores(n, k, group):
        raise ValueError(f"the W4A8 tensor-core GEMM needs K % 32 == 0 and a group size that is a multiple "
                         f"of 32 (K={k}, group={group})")
    n32, k32 = ceildiv(n, 32), k // 32
    g = ceildiv(k, group) if group else 1
    (small_m, small_maps), (medium_m, medium_maps), (_, large_maps) = tile_maps(n, k, group, tiles)
    if group is None:  # (z [N] fp16, xsum [M, 1] int32), read as they are
        extra = [(lambda m: (n,), "float16", lambda m: (n,), "float16"),
                 (lambda m: (m, 1), "int32", lambda m: (m, 1), "int32")]
    else:  # (s2, z2) int8 [G, N/32 * 32], read as uint32 words of four channels' bytes
        extra = [(lambda m: (g, n32 * 32), "int8", lambda m: (g, n32 * 8), "uint32")] * 2
    (e0_shape, e0_dtype, e0_view, e0_view_dtype), (e1_shape, e1_dtype, e1_view, e1_view_dtype) = extra
    with fast_tvmscript():
        small, medium, large = _launch(small_maps), _launch(medium_maps), _launch(large_maps)

        @T.prim_func(private=True)
        def gemm(var_qx: T.handle, var_sx: T.handle, var_qw: T.handle, var_s1: T.handle, var_e0: T.handle,
                 var_e1: T.handle, var_y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "qoqc.tir_pipeline": "tirx"})
            m = T.int64()
            qx = T.match_buffer(var_qx, (m, k), "int8")
            sx = T.match_buffer(var_sx, (m, 1), "float16")
            qw = T.match_buffer(var_qw, (n32, k32, 32, 4), "uint32")
            s1 = T.match_buffer(var_s1, (n,), "float16")
            e0 = T.match_buffer(var_e0, e0_shape(m), e0_dtype)
            e1 = T.match_buffer(var_e1, e1_shape(m), e1_dtype)
            y = T.match_buffer(var_y, (m, n), "float16")
            e0v = T.decl_buffer(e0_view(m), e0_view_dtype, data=e0.data)
            e1v = T.decl_buffer(e1_view(m), e1_view_dtype, data=e1.data)
            if m <= small_m:
                small(m, qx, sx, qw, s1, e0v, e1v, y)
            elif m <= medium_m:
                medium(m, qx, sx, qw, s1, e0v, e1v, y)
            else:
                large(m, qx, sx, qw, s1, e0v, e1v, y)
    return gemm


def build(n: int, k: int, group: int | None, arch: str = "sm_90", tiles=DEFAULT_TILES):
    """The kernel alone, compiled for ``arch`` (global symbol ``w4a8_gemm``) and holding CUDA source:
    what ``schedules.nvcc``'s checks read; no GPU or nvcc needed."""
    func = tensor_core_gemm(n, k, group, tiles).with_attr("global_symbol", "w4a8_gemm")
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    return tvm.compile(tvm.IRModule({"w4a8_gemm": func}), target=target, tir_pipeline="tirx")


def emulate(maps: TileMaps, qx, sx, qw, s1, *extra) -> tuple[np.ndarray, np.ndarray]:
    """NumPy run of one launch of the kernel: every thread's copies, ldmatrix.x4, B unpacking, mma
    and epilogue through ``maps``, the instructions emulated by lane registers
    (``schedules.reference.ptx``). Returns (psum int32, y fp16) with y NaN where nothing was
    written. Shared memory starts as random bytes, so a read of an unwritten element shows."""
    cfg, m = maps.cfg, qx.shape[0]
    rng = np.random.default_rng(0)
    per_group = maps.group is not None
    if per_group:
        e0, e1 = (np.ascontiguousarray(a).view(np.uint32) for a in extra)
    tx = np.arange(maps.threads)
    lanes = np.arange(32)
    y = np.full((m, maps.n), np.nan, np.float16)
    psum = np.zeros((m, maps.n), np.int64)
    for bx in range(maps.n_tiles):
        for by in range(ceildiv(m, cfg.bm)):
            acc = np.zeros((maps.threads, maps.mi_n * maps.ni_n * 16), np.int64)
            a_sh = rng.integers(-128, 128, size=(cfg.stages, cfg.bm, cfg.bk)).astype(np.int8)
            b_sh = rng.integers(0, 2 ** 32, size=(cfg.stages, cfg.bn // 32, maps.ki_n, 32, 4)).astype(np.uint32)
            for t in range(maps.k_tiles + cfg.stages - 1):     # the kernel's pipeline loop
                if t < maps.k_tiles:
                    for it in range(maps.a_iters):
                        for th in tx[maps.a_copy_valid(it, tx)]:
                            row, chunk = maps.a_row(it, th), maps.a_chunk(it, th)
                            col, k0 = maps.a_col(row, chunk), t * cfg.bk + chunk * 16
                            src = min(by * cfg.bm + row, m - 1)         # rows past M clamped
                            a_sh[t % cfg.stages, row, col:col + 16] = qx[src, k0:k0 + 16]
                    for it in range(maps.b_iters):
                        for th in tx[maps.b_copy_valid(it, tx)]:
                            tn, tk = maps.b_tile_n(it, th), maps.b_tile_k(it, th)
                            b_sh[t % cfg.stages, tn, tk, th % 32] = qw[bx * (cfg.bn // 32) + tn, t * maps.ki_n + tk,
                                                                        th % 32]
                if t < cfg.stages - 1:
                    continue
                stage, tile = (t + 1) % cfg.stages, t + 1 - cfg.stages
                for warp in range(cfg.warps_m * cfg.warps_n):
                    wm, wn = warp // cfg.warps_n, warp % cfg.warps_n
                    for ki in range(maps.ki_n):
                        a_regs = []                               # per mi: int8 [32 lanes, 4 regs, 4 bytes]
                        for mi in range(maps.mi_n):
                            rows = maps.frag_row(wm, mi, lanes)
                            cols = maps.a_col(rows, maps.frag_chunk(ki, lanes))
                            a_regs.append(ldmatrix_x4(np.stack([a_sh[stage, r, c:c + 16] for r, c in zip(rows, cols)])))
                        for ni in range(maps.ni_n):
                            words = b_sh[stage, maps.b_tile(wn, ni), ki].T            # [4 words, 32 lanes]
                            if per_group:
                                sw = maps.scale_word(bx, wn, ni, lanes)
                                g = maps.group_index(tile, ki)
                                regs = [[b_register(words, j // 2, j % 2, p, e0[g, sw], e1[g, sw]) for p in (0, 1)]
                                        for j in range(4)]
                            else:
                                regs = [[b_register(words, j // 2, j % 2, p) for p in (0, 1)] for j in range(4)]
                            for j in range(4):
                                b = np.stack(regs[j], axis=1).astype(np.uint32).view(np.int8).reshape(32, 2, 4)
                                for mi in range(maps.mi_n):
                                    d = mma_m16n8k32_s8(np.zeros((32, 4), np.int64), a_regs[mi], b)
                                    for c in range(4):
                                        acc[warp * 32 + lanes, maps.acc(mi, ni, j, c)] += d[:, c]
            for th in tx:
                wm, wn, lane = th // 32 // cfg.warps_n, th // 32 % cfg.warps_n, th % 32
                for mi in range(maps.mi_n):
                    for ni in range(maps.ni_n):
                        for j in range(4):
                            for c in range(4):
                                row, col = maps.out_row(by, wm, mi, lane, c), maps.out_col(bx, wn, ni, j, lane, c)
                                if row < m and col < maps.n:
                                    v = np.int32(acc[th, maps.acc(mi, ni, j, c)])  # int32 wraparound, as mma
                                    psum[row, col] = v
                                    y[row, col] = _output(v, sx, s1, *extra, row, col, per_group, np.float32)
    return psum.astype(np.int32), y
