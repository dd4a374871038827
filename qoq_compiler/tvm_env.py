"""Import TVM once, after checking the pinned versions.

apache-tvm 0.27.0.post1 is ABI-compatible with apache-tvm-ffi 0.1.14.x only: with 0.1.15 every
``Schedule.tensorize`` segfaults. A clear error at import beats a crash deep inside a schedule.
"""

import tvm_ffi

from .errors import QoqcError

TVM_VERSION = "0.27.0.post1"
FFI_PREFIX = "0.1.14"

if not tvm_ffi.__version__.startswith(FFI_PREFIX):
    raise QoqcError(
        f"apache-tvm-ffi {tvm_ffi.__version__} is installed, but apache-tvm {TVM_VERSION} needs "
        f"{FFI_PREFIX}.x (pip install 'apache-tvm-ffi==0.1.14.post1')"
    )

import tvm  # noqa: E402  (imported after the ABI check on purpose)

if tvm.__version__ != TVM_VERSION:
    raise QoqcError(f"apache-tvm {tvm.__version__} is installed; qoqc is built against {TVM_VERSION}")

__all__ = ["tvm", "TVM_VERSION", "disco"]


def disco():
    """``tvm.runtime.disco``, importable.

    In the 0.27.0.post1 wheel ``import tvm`` leaves ``tvm.runtime.disco`` half-initialised: its
    ``_ffi_api`` module is imported before the runtime's ``runtime.disco.*`` functions are
    registered, so it holds none of them. Importing ``_ffi_api`` again once ``tvm`` is loaded
    fills it. Process workers apply the same fix (``runtime.disco_worker``).
    """
    import sys

    sys.modules.pop("tvm.runtime.disco._ffi_api", None)
    import tvm.runtime.disco._ffi_api  # noqa: F401
    from tvm.runtime import disco as di

    return di
