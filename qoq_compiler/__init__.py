"""qoqc: a TVM compiler that serves Hugging Face causal LMs with QoQ W4A8KV4 quantization.

    qoq_compiler.compile(model, target="llvm", quant="qoq-w4a8kv4-g128", output=...) -> artifact path
    qoq_compiler.load(artifact, device="cpu") -> Engine (a TPEngine for a --tensor-parallel artifact)

``load`` imports only the runtime (no compiler, torch or model code).
"""

__version__ = "0.1.0"

from .config import DEFAULT_SCHEME  # noqa: E402
from .errors import QoqcError  # noqa: E402


def compile(*args, **kwargs):  # noqa: A001  (the API name the design card asks for)
    """See ``qoq_compiler.compiler.compile``."""
    from .compiler import compile as _compile

    return _compile(*args, **kwargs)


def load(path, device: str = "cpu", **kwargs):
    """See ``qoq_compiler.runtime.engine.load``."""
    from .runtime.engine import load as _load

    return _load(path, device=device, **kwargs)


__all__ = ["DEFAULT_SCHEME", "QoqcError", "compile", "load", "__version__"]
