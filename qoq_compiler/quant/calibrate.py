"""Calibration: token samples from text, and the activation statistics the QoQ passes need.

``calibration_tokens`` reads a text file or a directory of ``*.txt`` files (default: the packaged
public-domain ``data/calibration.txt``), tokenizes their concatenation and draws N windows of L
tokens at seeded random offsets (defaults 128 x 512).

``collect_stats`` runs the model over the samples (batched, on the GPU when there is one) with
forward hooks, and returns per decoder layer:
    k_absmax    [Hkv, D]  max |K| per KV-head channel, after RoPE   (SmoothAttention)
    down_absmax [I]       max |x| per input channel of down_proj    (SmoothLinear)
RoPE is applied to the hooked k_proj output the way transformers does (rotate_half layout,
cos/sin from the model's own rotary embedding), so llama3-scaled RoPE is honoured too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import QoqcError

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"


def read_text(path: str | Path | None = None) -> str:
    path = Path(path) if path is not None else DEFAULT_TEXT
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise QoqcError(f"calibration directory {path} has no *.txt files")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if not path.is_file():
        raise QoqcError(f"calibration text does not exist: {path}")
    return path.read_text(encoding="utf-8")


def calibration_tokens(tokenizer, text: str, samples: int = 128, seq_len: int = 512, seed: int = 42
                       ) -> torch.Tensor:
    """[samples, seq_len] int64 windows of the tokenized text, at seeded random offsets."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)
    if len(ids) < seq_len:
        raise QoqcError(f"calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, size=samples)
    return torch.from_numpy(np.stack([ids[s:s + seq_len] for s in starts]))


@dataclass
class LayerStats:
    k_absmax: torch.Tensor
    down_absmax: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


@torch.no_grad()
def collect_stats(model, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True) -> list[LayerStats]:
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hkv = cfg.num_key_value_heads
    device = next(model.parameters()).device
    stats = [LayerStats(torch.zeros(hkv, d, dtype=torch.float64), torch.zeros(cfg.intermediate_size,
                                                                                 dtype=torch.float64))
             for _ in model.model.layers]
    rope = {}

    def k_hook(i):
        def hook(_mod, _inp, out):
            b, t, _ = out.shape
            k = out.float().reshape(b, t, hkv, d)
            cos, sin = (x[:, :, None, :].float() for x in rope["cos_sin"])
            k = k * cos + _rotate_half(k) * sin
            stats[i].k_absmax.copy_(torch.maximum(stats[i].k_absmax, k.abs().amax(dim=(0, 1)).double().cpu()))
        return hook

    def down_hook(i):
        def hook(_mod, inp):
            x = inp[0].float()
            stats[i].down_absmax.copy_(torch.maximum(stats[i].down_absmax,
                                                     x.abs().reshape(-1, x.shape[-1]).amax(dim=0).double().cpu()))
        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(k_hook(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
    try:
        for s in tqdm(range(0, len(tokens), batch_size), desc="calibrate", unit="batch", disable=not progress):
            x = tokens[s:s + batch_size].to(device)
            pos = torch.arange(x.shape[1], device=device)[None].expand(x.shape[0], -1)
            dummy = torch.zeros(1, dtype=next(model.parameters()).dtype, device=device)
            rope["cos_sin"] = model.model.rotary_emb(dummy, pos)
            model(x)
    finally:
        for h in handles:
            h.remove()
    return stats
