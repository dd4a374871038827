"""Greedy argmax on the device (``schedules.argmax``) on llvm equals NumPy's, ties and infinities included."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler.tvm_env import tvm
from schedules import argmax
from schedules.reference import argmax as ref


@pytest.mark.parametrize("vocab", [5, 300, 49152])
def test_argmax_equals_numpy_with_ties_and_infinities(vocab):
    rng = np.random.default_rng(vocab)
    logits = ref.random_logits(6, vocab, rng)  # rows 1-4: ties, -inf, nothing finite
    func = argmax.argmax(vocab, gpu=False)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    out = tvm.runtime.tensor(np.full(6, -1, "int32"))
    lib["main"](tvm.runtime.tensor(logits), out)
    assert (out.numpy() == ref.reference(logits)).all()
