"""The GPU test lane: kernels and artifacts built on a CPU machine (``bench/gpu_check.py prepare``),
run on the device against their NumPy references on fresh random data.

Runs when ``QOQC_GPU_PREBUILT`` names a prepared directory and ``QOQC_GPU_DEVICE`` (default
cuda) is present; ``bench/gpu_check.py run`` sets both, and its ``--dry-run`` points them at a
tiny directory's llvm stand-ins on the CPU. Anywhere else every test here is skipped. Only TVM's
runtime is needed: the references (``schedules/reference``) import no compiler.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def prebuilt():
    from bench.prebuilt import Prebuilt

    root = os.environ.get("QOQC_GPU_PREBUILT")
    if not root:
        pytest.skip("QOQC_GPU_PREBUILT is not set (bench/gpu_check.py run sets it)")
    pre = Prebuilt.open(root)
    if not pre.dev.exist:
        pytest.skip(f"no {pre.device} device on this machine")
    return pre


@pytest.fixture(scope="session")
def kernels(prebuilt):
    return prebuilt.kernels()
