"""Frozen configuration of a model and of its quantization scheme.

``ModelConfig`` is the architecture as qoqc compiles it, normalised once from a Hugging Face
config: aliases (``rope_theta`` vs ``rope_parameters``), defaults (``head_dim``), and every
feature qoqc does not implement is rejected here by name, so nothing downstream is silently wrong.
It is a leaf module: it imports nothing from the rest of qoqc but the error type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import QoqcError

#: Hugging Face architecture name -> (model_type, attention projections with bias, o_proj bias)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

#: RoPE scaling types the generated kernels implement exactly (as transformers does).
SUPPORTED_ROPE_TYPES = ("default", "llama3")

@dataclass(frozen=True)
class QoQPasses:
    """The calibration passes of a QoQ scheme (defaults: deepcompressor's ``qoq-g128.yaml``).

    ``smooth_attn_alpha`` None turns SmoothAttention off; ``smooth_down`` (alpha, beta) or None
    turns SmoothLinear on down_proj off; ``reorder`` sorts down_proj's input channels (g128 only);
    ``clip`` grid-searches per-channel clipping ratios (per-channel weights only); ``grid_search``
    chooses each g128 group's integer scale rounding and clipping by its error weighted by the
    Hessian's diagonal ("diag") or its diagonal block ("hessian"), or not at all (None);
    ``smooth_down_search`` searches SmoothLinear's (alpha, beta) per layer instead of using
    ``smooth_down``;
    ``sequential`` calibrates each layer on the outputs of the layers before it as quantized;
    ``choose_kv_rotation`` decides per model between a Hadamard-rotated K cache without
    SmoothAttention and an unrotated one with SmoothAttention (``quant.kv_choice``).
    """

    rotation: bool = True
    smooth_attn_alpha: float | None = 0.5
    smooth_down: tuple[float, float] | None = (0.3, 0.7)
    reorder: bool = True
    clip: bool = False
    gptq: bool = True
    grid_search: str | None = "diag"  # progressive groups pick their level-2 grid by weighted error
    smooth_down_search: bool = False
    sequential: bool = False
    choose_kv_rotation: bool = False
    calib_text: str | None = None  # file or directory of *.txt; None: the packaged default
    calib_samples: int = 64  # as good as 128 on SmolLM2 (docs/accuracy.md), in half the time
    calib_seq_len: int = 512


@dataclass(frozen=True)
class QuantScheme:
    """How a scheme stores linear-layer weights and the KV cache; activations, norms and
    embeddings use ``dtype``.

    ``weights``: "float" (in dtype), "int8" (per-channel, per-token int8 activations) or "int4"
    (UINT4, per-token int8 activations): progressive with int8 group scales when ``group`` is set,
    per output channel when it is None. ``kv``: "float" (dtype) or "int4" (KV4). ``kv_rotation``
    (KV4): q and k are multiplied by the orthonormal Hadamard matrix of the head dimension after
    RoPE, inside the attention kernels, so K's outlier channels are spread before its 4-bit
    quantization while q . k stays the same (QuaRot's online rotation; needs a power-of-2 head_dim).
    ``passes``: the QoQ calibration passes, or None for round-to-nearest.
    """

    name: str
    dtype: str
    weights: str = "float"
    group: int | None = None
    kv: str = "float"
    kv_rotation: bool = False
    passes: QoQPasses | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: --quant schemes by name.
QUANT_SCHEMES = {
    "fp16": QuantScheme("fp16", "float16"),
    "fp32": QuantScheme("fp32", "float32"),
    "w8a8": QuantScheme("w8a8", "float16", weights="int8"),
    "rtn-w4a8kv4": QuantScheme("rtn-w4a8kv4", "float16", weights="int4", group=128, kv="int4"),
    # the calibrated schemes choose per model between rotating q/k after RoPE (then no SmoothAttention:
    # it costs accuracy) and SmoothAttention alone (docs/accuracy.md: SmolLM2 and Qwen2.5 want opposite ones)
    "qoq-w4a8kv4-g128": QuantScheme("qoq-w4a8kv4-g128", "float16", weights="int4", group=128, kv="int4",
                                    kv_rotation=True, passes=QoQPasses(choose_kv_rotation=True)),
    # deepcompressor's qoq-gchn.yaml: no reordering, clipping search, gentler down_proj smoothing
    "qoq-w4a8kv4-chn": QuantScheme("qoq-w4a8kv4-chn", "float16", weights="int4", kv="int4", kv_rotation=True,
                                   passes=QoQPasses(smooth_down=(0.1, 0.9), reorder=False, clip=True,
                                                    choose_kv_rotation=True)),
}


#: the scheme ``qoqc compile`` and ``compile()`` use unless told otherwise: the mission's W4A8KV4
DEFAULT_SCHEME = "qoq-w4a8kv4-g128"


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Llama-family transformer, as compiled.

    Shapes: hidden ``H = hidden_size``, ``Hq = num_heads``, ``Hkv = num_kv_heads``, ``D = head_dim``
    (not necessarily ``H / Hq``), FFN width ``I = intermediate_size``, vocabulary ``V``.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    context_window: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise QoqcError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise QoqcError(f"config field {name}={getattr(self, name)} must be positive")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def shard(self, shards: int) -> "ModelConfig":
        """The model as one of ``shards`` tensor-parallel shards sees it (``frontend.sharding``): its
        query and KV heads and MLP channels; hidden size, vocabulary and head dimension unchanged."""
        if shards == 1:
            return self
        return dataclasses.replace(self, num_heads=self.num_heads // shards, num_kv_heads=self.num_kv_heads // shards,
                                   intermediate_size=self.intermediate_size // shards)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """Normalise a ``transformers.PretrainedConfig`` (any version 4.4x or 5.x)."""
        archs = list(getattr(hf, "architectures", None) or [])
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(getattr(hf, "model_type", None)) if not archs else None
        if arch is None:
            named = ", ".join(archs) or f"model_type {getattr(hf, 'model_type', '?')!r}"
            raise QoqcError(
                f"unsupported architecture {named}: qoqc compiles {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise QoqcError(f"unsupported hidden_act {act!r} (only 'silu' is implemented)")
        if getattr(hf, "mlp_bias", False):
            raise QoqcError("unsupported mlp_bias=True (MLP projections with bias)")
        if getattr(hf, "partial_rotary_factor", 1.0) not in (None, 1.0):
            raise QoqcError(f"unsupported partial_rotary_factor={hf.partial_rotary_factor}")

        context = int(getattr(hf, "max_position_embeddings", 0) or 0)
        if context <= 0:
            raise QoqcError("config has no max_position_embeddings")
        context = _apply_sliding_window(arch, hf, context)

        theta, scaling = _rope(hf)
        heads = int(hf.num_attention_heads)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        bias = bool(getattr(hf, "attention_bias", False))
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=int(hf.vocab_size),
            hidden_size=int(hf.hidden_size),
            intermediate_size=int(hf.intermediate_size),
            num_layers=int(hf.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            context_window=context,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bias,
            o_bias=bias and arch != "Qwen2ForCausalLM",
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )


def _rope(hf) -> tuple[float, dict[str, Any]]:
    """(theta, scaling) from either transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise QoqcError(
            f"unsupported rope scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return float(theta), {}
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise QoqcError(f"llama3 rope scaling lacks {', '.join(missing)}")
    return float(theta), {"rope_type": "llama3", **{k: params[k] for k in keys}}


def _apply_sliding_window(arch: str, hf, context: int) -> int:
    """Sliding-window attention is not implemented; a window no shorter than the context is exact.

    Mistral declares ``sliding_window``; where it is shorter than ``max_position_embeddings`` the
    context window is capped at it (within the window, full and sliding attention are identical).
    Qwen2's ``use_sliding_window=True`` makes some layers slide and is rejected.
    """
    if arch == "Qwen2ForCausalLM":
        if getattr(hf, "use_sliding_window", False):
            raise QoqcError("unsupported sliding window attention (Qwen2 use_sliding_window=True)")
        return context
    window = getattr(hf, "sliding_window", None)
    if window and window < context:
        return int(window)
    return context
