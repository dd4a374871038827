"""Calibration: token samples from text, and the activation statistics the QoQ passes need.

``calibration_tokens`` reads a text file or a directory of ``*.txt`` files (default: the packaged
public-domain ``data/calibration.txt``), tokenizes their concatenation and draws N windows of L
tokens at seeded random offsets (defaults 64 x 512).

``iter_layer_stats`` runs the model over the samples one decoder layer at a time (batched; on the
GPU when there is one, one layer there at a time): the hidden states of all samples are kept,
each layer is run over them with hooks, and its outputs become the next layer's inputs. Per layer it yields
    k_absmax    [Hkv, D]  max |K| per KV-head channel, after RoPE       (SmoothAttention)
    down_absmax [I]       max |x| per input channel of down_proj        (SmoothLinear, reordering)
    hessians    {"qkv", "o", "gate_up", "down"}: 2/T X^T X [K, K] float64 of each linear's
                input X [T, K] (q/k/v share one input, as do gate/up)    (GPTQ, clipping search)
    down_sample [T / 16, I] every 16th token's down_proj input       (SmoothLinear search)
RoPE is applied to the hooked k_proj output the way transformers does (rotate_half layout,
cos/sin from the model's own rotary embedding), so llama3-scaled RoPE is honoured too.

The caller may change layer i's weights between two steps (smoothing, reordering: exact
transforms that leave the layer's outputs as computed). The next layer's inputs are the float
outputs of layer i, or with ``sequential`` its outputs recomputed after the caller has replaced
its weights by their quantized values (GPTQ's sequential order: later layers are calibrated on
the inputs they will see; one more forward pass per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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
    ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=np.int64)
    if len(ids) < seq_len:
        raise QoqcError(f"calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, size=samples)
    return torch.from_numpy(np.stack([ids[s:s + seq_len] for s in starts]))


@dataclass
class LayerStats:
    k_absmax: torch.Tensor
    down_absmax: torch.Tensor
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    down_sample: torch.Tensor | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


class _HessianSum:
    """Running X^T X (float64) and row count of one linear's inputs."""

    def __init__(self, k: int):
        self.xtx = torch.zeros(k, k, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx += (x.T @ x).double().cpu()
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.rows, 1))


@torch.no_grad()
def iter_layer_stats(model, tokens: torch.Tensor, batch_size: int = 8, hessians: bool = False,
                     down_sample: bool = False, sequential: bool = False, progress: bool = False
                     ) -> Iterator[tuple[int, LayerStats]]:
    """Yield (layer index, its statistics) for every decoder layer, in order."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hkv = cfg.num_key_value_heads
    home = next(model.parameters()).device
    device = torch.device("cuda") if torch.cuda.is_available() else home
    dtype = next(model.parameters()).dtype
    batches = [tokens[s:s + batch_size].to(home) for s in range(0, len(tokens), batch_size)]
    hidden = [model.model.embed_tokens(x).to(device) for x in batches]
    pos = torch.arange(tokens.shape[1], device=home)[None]
    cos_sin = tuple(x.to(device) for x in model.model.rotary_emb(torch.zeros(1, dtype=dtype, device=home), pos))
    cos, sin = (x[:, :, None, :].float() for x in cos_sin)

    layers = model.model.layers
    for i in tqdm(range(len(layers)), desc="calibrate", unit="layer", disable=not progress):
        layer, attn, mlp = layers[i], layers[i].self_attn, layers[i].mlp
        st = LayerStats(torch.zeros(hkv, d, dtype=torch.float64),
                        torch.zeros(cfg.intermediate_size, dtype=torch.float64))
        sums = {}
        if hessians:
            sums = {"qkv": _HessianSum(attn.q_proj.in_features), "o": _HessianSum(attn.o_proj.in_features),
                    "gate_up": _HessianSum(mlp.up_proj.in_features), "down": _HessianSum(mlp.down_proj.in_features)}

        def k_hook(_mod, _inp, out):
            b, t, _ = out.shape
            k = out.float().reshape(b, t, hkv, d)
            k = k * cos + _rotate_half(k) * sin
            torch.maximum(st.k_absmax, k.abs().amax(dim=(0, 1)).double().cpu(), out=st.k_absmax)

        rows = []

        def down_hook(_mod, inp):
            x = inp[0].float()
            torch.maximum(st.down_absmax, x.abs().reshape(-1, x.shape[-1]).amax(dim=0).double().cpu(),
                          out=st.down_absmax)
            if down_sample:
                rows.append(x[:, ::16].reshape(-1, x.shape[-1]).cpu())

        def input_hook(key):
            return lambda _mod, inp: sums[key].add(inp[0])

        handles = [attn.k_proj.register_forward_hook(k_hook), mlp.down_proj.register_forward_pre_hook(down_hook)]
        for key, mod in (("qkv", attn.q_proj), ("o", attn.o_proj), ("gate_up", mlp.up_proj), ("down", mlp.down_proj)):
            if key in sums:
                handles.append(mod.register_forward_pre_hook(input_hook(key)))
        try:
            layer.to(device)  # one layer at a time on the GPU when there is one
            outputs = [layer(h, attention_mask=None, position_embeddings=cos_sin) for h in hidden]
        finally:
            layer.to(home)
            for h in handles:
                h.remove()
        st.hessians = {key: s.hessian() for key, s in sums.items()}
        st.down_sample = torch.cat(rows) if rows else None
        yield i, st
        if sequential:  # the caller has quantized layer i: the next layer sees its outputs
            try:
                layer.to(device)
                outputs = [layer(h, attention_mask=None, position_embeddings=cos_sin) for h in hidden]
            finally:
                layer.to(home)
        hidden = outputs


def collect_stats(model, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True) -> list[LayerStats]:
    """Statistics of every layer (no Hessians), for a model left unchanged."""
    return [st for _, st in iter_layer_stats(model, tokens, batch_size, progress=progress)]
