"""The number formats that qoqc's quantizers write and its kernels read, in one place.

Dependency-free (no NumPy, no TVM): the offline quantizers (``quant.reference``), the kernels
(``schedules/``) and their NumPy references (``schedules/reference/``) all read these names.

    INT8_MAX          127    symmetric INT8 (per-token activations, W8 weights, level-1 weights'
                             reach): q = clamp(round(x / s), -127, 127),  s = fp16(max|x| / 127)
    UINT4_MAX         15     asymmetric 4-bit codes (weights, KV cache): q = clamp(round(...), 0, 15),
                             s = fp16(range / 15)
    PROTECTIVE_RANGE  119    progressive level 1, s1 = fp16(max|W_row| / 119): the margin that keeps
                             level 2's q * s2 - z2 inside int8 (QServe's bound)
    RANGE_FLOOR       1e-4   every range (max|x|, max - min) is floored here before it becomes a
                             scale, so a zero row still gets a positive fp16 scale

Shape helpers, for Python ints and NumPy integer arrays alike:
    ceildiv(a, b)   = ceil(a / b)           (groups of a ragged K, pages of a sequence, ...)
    round_up(a, b)  = ceildiv(a, b) * b     (K or N padded to whole tiles)
"""

INT8_MAX = 127
UINT4_MAX = 15
PROTECTIVE_RANGE = 119
RANGE_FLOOR = 1e-4


def ceildiv(a, b):
    return -(-a // b)


def round_up(a, b):
    return ceildiv(a, b) * b
