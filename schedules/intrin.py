"""The one place qoqc loads TVM's CUDA tensor-core intrinsics.

Importing ``tvm.s_tir.tensor_intrin.cuda`` parses a few hundred ``@T.prim_func``s, and each one
calls ``inspect.stack()``, which reads the source file of every frame on the stack: 30-70 s on a
2-core machine. TVMScript only needs the frames themselves (to resolve closure variables), so
while importing, ``inspect.stack`` is replaced by a walk over ``sys._getframe()`` that skips the
source lookup. The registered intrinsics are identical; the import takes about 2 s.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager


def _frames_without_source(context: int = 1) -> list[inspect.FrameInfo]:
    out, frame = [], sys._getframe(1)
    while frame is not None:
        out.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno,
                                     frame.f_code.co_name, None, None, positions=None))
        frame = frame.f_back
    return out


@contextmanager
def fast_tvmscript():
    """Parse TVMScript with the fast ``inspect.stack`` (for qoqc's own kernels too)."""
    saved = inspect.stack
    inspect.stack = _frames_without_source
    try:
        yield
    finally:
        inspect.stack = saved


def load_cuda_intrinsics():
    """Import (once) and return ``tvm.s_tir.tensor_intrin.cuda``, registering its tensor intrinsics."""
    if "tvm.s_tir.tensor_intrin.cuda" not in sys.modules:
        with fast_tvmscript():
            import tvm.s_tir.tensor_intrin.cuda  # noqa: F401
    return sys.modules["tvm.s_tir.tensor_intrin.cuda"]
