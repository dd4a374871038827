"""Map Hugging Face tensors onto the parameters of ``llama.LlamaForCausalLM``.

    model.layers.{i}.self_attn.qkv_proj.{weight,bias} = concat(q_proj, k_proj, v_proj)   along rows
    model.layers.{i}.mlp.gate_up_proj.weight          = concat(gate_proj, up_proj)      along rows
and every other parameter has the HF name unchanged. Rows of nn.Linear weights are output
features ([out, in], as in torch), so concatenation along axis 0 fuses the projections.

A parameter the module declares with an integer dtype is a quantized weight: its fused float
tensor goes to ``quantize(name, w)``, which returns that parameter and its companions (e.g.
``*.weight_scale``), yielded when the module's order reaches them, each checked against the
declared shape and dtype (packed 4-bit weights are [out, in / 8] uint32).
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import QoqcError
from .checkpoint import Checkpoint

#: qoqc fused projection -> the Hugging Face projections whose rows it concatenates
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_LAYER = re.compile(r"^(model\.layers\.\d+\.)(.+)\.(weight|bias)$")


def hf_sources(name: str) -> tuple[str, ...]:
    """HF tensor names that make up qoqc parameter ``name``."""
    m = _LAYER.match(name)
    if m and m.group(2) in FUSED:
        prefix, module, kind = m.groups()
        return tuple(f"{prefix}{part}.{kind}" for part in FUSED[module])
    return (name,)


def convert(ckpt: Checkpoint, params: list[tuple[str, tuple[int, ...], str]],
            quantize: Callable[[str, torch.Tensor], dict[str, np.ndarray]] | None = None
            ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for each (name, shape, dtype) the exported module declares, in that order."""
    available = set(ckpt.names)
    declared = {name: (tuple(shape), dtype) for name, shape, dtype in params}
    derived: dict[str, np.ndarray] = {}

    def checked(name: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
        shape, dtype = declared[name]
        if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
            raise QoqcError(f"quantizer produced {name} as {arr.dtype}{list(arr.shape)}, "
                            f"the module declares {dtype}{list(shape)}")
        return name, arr

    for name, shape, dtype in params:
        if name in derived:
            yield checked(name, derived.pop(name))
            continue
        quantized = not dtype.startswith("float")
        if quantized and quantize is None:
            raise QoqcError(f"parameter {name} is {dtype} but no quantizer was given")
        sources = hf_sources(name)
        missing = [s for s in sources if s not in available]
        if missing:
            raise QoqcError(f"checkpoint {ckpt.path} lacks tensor {missing[0]} (needed for {name})")
        parts = [ckpt.read(s).to(torch.float32 if quantized else getattr(torch, dtype)) for s in sources]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        # a quantized weight's declared shape is its kernel layout's: check its output channels (its scales')
        implied = (declared[f"{name.removesuffix('.weight')}.weight_scale"][0] + tuple(t.shape[1:])) if quantized \
            else tuple(shape)
        if tuple(t.shape) != implied:
            raise QoqcError(f"tensor {'+'.join(sources)} has shape {tuple(t.shape)}, the config implies {implied}")
        if not torch.isfinite(t).all():
            raise QoqcError(f"tensor {'+'.join(sources)} holds NaN or Inf after conversion to {dtype}")
        if quantized:
            derived.update(quantize(name, t))
            yield checked(name, derived.pop(name))
        else:
            yield name, t.contiguous().numpy()
    if derived:
        raise QoqcError(f"quantizer produced parameters the module does not declare: {', '.join(derived)}")
