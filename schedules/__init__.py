"""qoqc's TensorIR kernels and schedule rules, one module per kernel family.

    pipeline       the compiler's schedule phase and TIR pipeline; the kernels a target's model emits
    act_quant      fused residual add + RMSNorm / silu·mul + per-token INT8 quantization (block
                   form for CPUs and CUDA; ``act_quant_cpu``: vectorized, the same sums)
    argmax         greedy token choice on the device
    w4a8_gemm      portable W4A8 GEMM (TE);  w4a8_gemm_tc: tensor-core W4A8 GEMM for CUDA
    w4a8_gemm_cpu  W4A8 and W8A8 GEMMs on the CPU's int8 dot products (VNNI, AVX2, Arm sdot)
    w8a8_gemm      W8A8 GEMM (TE)
    kv4_attention  RoPE + KV4 append, split-context paged KV4 attention and its merge
    kv4_attention_cpu  KV4 attention for CPUs: a task per (token, query head), vectorized along D
    kv4_prefill    tensor-core KV4 prefill attention for CUDA
    cpu_matmul     the CPU reduction schedule rule;  cpu_injective: the CPU injective rule
    toolkit        what the hand-written kernels share: ``Launch`` (one source for CPUs and CUDA)
    nvcc           device code ahead of time (fatbin) and ptxas' resource report
    reference/     the NumPy reference of every kernel family, importable with TVM's runtime only;
                   ``reference/ptx``: the PTX warp instructions (ldmatrix, mma) emulated by lane registers
Format constants (127, 15, 119, the range floor) and shape helpers: ``qoq_compiler.formats``.

Importing the package imports nothing: the kernel modules need TVM's compiler, the references
and ``nvcc`` do not (the GPU test lane runs references beside kernels built elsewhere).
"""
