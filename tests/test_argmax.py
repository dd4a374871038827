"""Greedy argmax on the device (``schedules.argmax``) on llvm equals NumPy's, ties and infinities included."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler.tvm_env import tvm
from schedules import argmax


@pytest.mark.parametrize("vocab", [5, 300, 49152])
def test_argmax_equals_numpy_with_ties_and_infinities(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((6, 1, vocab)).astype("float32")
    logits[1, 0, :] = 0.5                                     # all tied: the first index
    logits[2, 0, vocab // 2:] = 7.0                           # tie between threads' maxima
    logits[3, 0, :] = -np.inf
    logits[3, 0, vocab - 1] = -1.0                            # the only finite value is the last
    logits[4, 0, :] = -np.inf                                 # nothing finite: index 0
    func = argmax.argmax(vocab, gpu=False)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    out = tvm.runtime.tensor(np.full(6, -1, "int32"))
    lib["main"](tvm.runtime.tensor(logits), out)
    assert (out.numpy() == argmax.reference(logits)).all()
