"""A checkpoint of random weights for a model config: real shapes without the real weights.

``qoqc bench --config-only CONFIG.json`` compiles a model this way (QServe benchmarks the same way:
config-only folders, no checkpoint), since speed does not depend on weight values. The directory
written holds ``config.json`` (the given config, dtype set to float16) and safetensors files named as
transformers names them (one ``model.safetensors``, or shards of at most ``SHARD_BYTES`` and their
index): every tensor transformers' model for the config declares, drawn
from N(0, 0.02^2) in fp16 (biases too), norm weights 1. Tensor names and shapes come from the
transformers model built on the meta device, so nothing of the model's size is allocated but one
tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import QoqcError
from .checkpoint import _load_hf_config, read_config_json

SHARD_BYTES = 2 * 1024 ** 3
STD = 0.02


def write_random_checkpoint(config_file: str | Path, out_dir: str | Path, seed: int = 0,
                            progress: bool = True) -> Path:
    """Write a random-weight checkpoint of ``config_file`` (an HF config.json) into ``out_dir``."""
    from transformers import AutoModelForCausalLM

    config_file, out = Path(config_file), Path(out_dir)
    if not config_file.is_file():
        raise QoqcError(f"config file does not exist: {config_file}")
    raw = read_config_json(config_file)
    if "model_type" not in raw:
        raise QoqcError(f"{config_file} is not a Hugging Face model config (no model_type)")
    out.mkdir(parents=True, exist_ok=True)
    raw.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps({**raw, "dtype": "float16"}, indent=2))
    hf_config = _load_hf_config(out)
    from ..config import ModelConfig

    ModelConfig.from_hf(hf_config)  # unsupported features are refused here, before any weight is drawn
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights appear once
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():  # consecutive tensors, at most SHARD_BYTES per file
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    rng = np.random.default_rng(seed)
    from safetensors.numpy import save_file

    with tqdm(total=sum(2 * int(np.prod(s)) for s in shapes.values()), unit="B", unit_scale=True,
              desc="random weights", disable=not progress) as bar:
        for file, names in zip(files, shards):
            tensors = {}
            for name in names:
                shape = shapes[name]
                if name.endswith("norm.weight"):
                    tensors[name] = np.ones(shape, np.float16)
                else:
                    tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * STD).astype(np.float16)
                bar.update(tensors[name].nbytes)
            save_file(tensors, str(out / file), metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(2 * int(np.prod(s)) for s in shapes.values())},
                 "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
