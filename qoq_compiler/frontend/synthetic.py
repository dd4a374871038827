"""A model config without its weights: real shapes, weights drawn when the artifact is loaded.

``qoqc bench --config-only CONFIG.json`` and the benches compile a model this way (QServe
benchmarks the same way: config-only folders, no checkpoint), since speed does not depend on
weight values. ``open_config`` gives a checkpoint that has the normalised config and no tensor;
``compile(..., random_weights=True)`` then writes no parameter files and records every
parameter's shape and dtype instead, and ``runtime.model`` draws them at load
(``runtime.artifact.random_params``): nothing of the model's size is written, read or carried.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..errors import QoqcError
from .checkpoint import Checkpoint, _load_hf_config, read_config_json


def open_config(path: str | Path) -> Checkpoint:
    """A checkpoint of the Hugging Face config ``path`` (a config.json, or a directory holding one)
    with no tensors and no tokenizer; unsupported features are refused here, by name."""
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise QoqcError(f"config file does not exist: {cfg_file}")
    raw = read_config_json(cfg_file)
    if "model_type" not in raw:
        raise QoqcError(f"{cfg_file} is not a Hugging Face model config (no model_type)")
    config = ModelConfig.from_hf(_load_hf_config(cfg_file))

    def read(name: str):
        raise QoqcError(f"{cfg_file} is a config without weights: no tensor {name}")

    return Checkpoint(cfg_file, config, [], read, None)
