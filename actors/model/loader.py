"""Load a Llama-family checkpoint (safetensors directory or GGUF file) into ``LlamaModel`` (data plane).

Sources:

* a directory with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``
  plus its shards: only the tensors the requested pieces need are read (``safe_open``);
* a ``.gguf`` file, read through transformers' GGUF reader (config + HF-named, dequantized tensors).

Tensor parallelism (``tp_rank``, ``tp_size``, ``tp_group``; see ``actors.model.tensor_parallel``):
each rank builds only its shard; from safetensors it reads only its slice of each split tensor
(``get_slice``), from GGUF it slices the dequantised tensor on CPU before copying to the device.

Invariants: every failure raises a ``ModelLoadError`` subclass whose message names the problem and
the path; tensors are shape-checked (whole, as in the checkpoint) before they are copied; the
default dtype is the checkpoint's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from actors.model.config import ModelConfig, ModelLoadError, UnsupportedArchitectureError
from actors.model.llama import LlamaModel
from actors.model.tensor_parallel import TensorParallel, hf_shard_index

__all__ = [
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "ModelNotFoundError",
    "MissingConfigError",
    "MissingWeightsError",
    "CorruptCheckpointError",
    "MissingTensorError",
    "TensorShapeError",
    "GGUFUnavailableError",
    "load_config",
    "load_hf_config",
    "load_model",
]


class ModelNotFoundError(ModelLoadError):
    """The model path does not exist."""


class MissingConfigError(ModelLoadError):
    """The model directory has no config.json (or it is not valid JSON)."""


class MissingWeightsError(ModelLoadError):
    """No weight file, or an index referencing a shard that is not there."""


class CorruptCheckpointError(ModelLoadError):
    """A weight file (or index) could not be parsed or read."""


class MissingTensorError(ModelLoadError):
    """A tensor the held pieces need is not in the checkpoint."""


class TensorShapeError(ModelLoadError):
    """A checkpoint tensor has a different shape than the config implies."""


class GGUFUnavailableError(ModelLoadError):
    """A .gguf file was given but the ``gguf`` package is not installed."""


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist")


def _require_gguf(path: Path) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise GGUFUnavailableError(
            f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)"
        ) from exc


def load_hf_config(path: str | Path) -> Any:
    """The transformers config of a checkpoint directory or GGUF file."""
    from transformers import AutoConfig

    path = Path(path)
    _check_exists(path)
    if _is_gguf(path):
        _require_gguf(path)
        try:
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:  # reader errors: bad magic, unsupported arch, truncated metadata
            raise CorruptCheckpointError(f"{path}: cannot read GGUF metadata: {exc}") from exc
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise MissingConfigError(f"{path}: no config.json (expected a model directory or a .gguf file)")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MissingConfigError(f"{config_file}: not valid JSON: {exc}") from exc
    archs = raw.get("architectures") or []
    from actors.model.config import SUPPORTED_ARCHITECTURES

    if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: unsupported architecture {archs[0]!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        if "model_type" in str(exc) or "Unrecognized" in str(exc):
            raise UnsupportedArchitectureError(f"{path}: {exc}") from exc
        raise MissingConfigError(f"{config_file}: transformers cannot parse it: {exc}") from exc


def load_config(path: str | Path, hf_config: Any = None) -> ModelConfig:
    """``ModelConfig`` of a checkpoint directory or GGUF file (``hf_config``: already read)."""
    hf_config = load_hf_config(path) if hf_config is None else hf_config
    try:
        return ModelConfig.from_hf(hf_config)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{path}: {exc}") from None


def _checkpoint_dtype(hf_config: Any) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype if dtype in _DTYPES.values() else torch.float32
    return _DTYPES.get(str(dtype).replace("torch.", ""), torch.float32)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    layer_range: tuple[int, int] | None = None,
    has_embed: bool = True,
    has_head: bool = True,
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: Any = None,
) -> LlamaModel:
    """Build a ``LlamaModel`` holding the requested pieces and fill it from the checkpoint.

    ``tp_size > 1``: rank ``tp_rank``'s tensor-parallel shard, communicating over ``tp_group`` (a
    process-group object from ``actors.transport.make_process_group``); ``ValueError`` when the
    heads, KV heads or MLP width do not divide by ``tp_size``.
    """
    path = Path(path)
    hf_config = load_hf_config(path)
    config = load_config(path, hf_config)
    tp = TensorParallel.for_config(config, tp_rank, tp_size, tp_group)
    if _is_gguf(path):
        return _load_gguf(path, hf_config, config, dtype, device, layer_range, has_embed, has_head, tp)
    model = LlamaModel(
        config,
        layer_range=layer_range,
        has_embed=has_embed,
        has_head=has_head,
        dtype=dtype or _checkpoint_dtype(hf_config),
        device=device,
        tp=tp,
    )
    needed = model.hf_tensor_shapes()
    index = {name: hf_shard_index(name, config, tp.rank, tp.size) for name in needed}
    for name, tensor in _read_safetensors(path, needed, index):
        model.load_hf_tensor(name, tensor)
    return model.eval()


def _check_shape(path: Path, name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if got != expected:
        raise TensorShapeError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(expected)}")


def _weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> file name within ``path``."""
    index_file = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{index_file}: not a valid safetensors index: {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise MissingWeightsError(f"{index_file}: references missing shard(s) {', '.join(missing)}")
        return dict(weight_map)
    if single.is_file():
        return {name: single.name for name in _safetensors_keys(single)}
    others = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" (found {', '.join(others)} but no index)" if others else ""
    raise MissingWeightsError(
        f"{path}: no weight files: expected model.safetensors or model.safetensors.index.json{hint}"
    )


def _safe_open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:
        raise CorruptCheckpointError(f"{file}: corrupt or unreadable safetensors file: {exc}") from exc


def _safetensors_keys(file: Path) -> list[str]:
    with _safe_open(file) as f:
        return list(f.keys())


def _read_safetensors(
    path: Path, needed: dict[str, tuple[int, ...]], index: dict[str, tuple[slice, ...] | None]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor or its ``index[name]`` slice), each shape-checked whole; slices read only their part."""
    weight_map = _weight_map(path)
    absent = [name for name in needed if name not in weight_map]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise MissingTensorError(f"{path}: checkpoint has no tensor {absent[0]!r}{more}")
    by_file: dict[str, list[str]] = {}
    for name in needed:
        by_file.setdefault(weight_map[name], []).append(name)
    for file_name, names in by_file.items():
        file = path / file_name
        with _safe_open(file) as f:
            for name in names:
                try:
                    if index.get(name) is None:
                        tensor = f.get_tensor(name)
                        shape = tuple(tensor.shape)
                    else:  # read only this rank's part, once the whole shape is known to be right
                        part = f.get_slice(name)
                        shape = tuple(part.get_shape())
                        tensor = part[index[name]] if shape == needed[name] else None
                except Exception as exc:
                    raise CorruptCheckpointError(f"{file}: cannot read tensor {name!r}: {exc}") from exc
                _check_shape(path, name, shape, needed[name])
                yield name, tensor


def _load_gguf(
    path: Path,
    hf_config: Any,
    config: ModelConfig,
    dtype: torch.dtype | None,
    device: torch.device | str,
    layer_range: tuple[int, int] | None,
    has_embed: bool,
    has_head: bool,
    tp: TensorParallel,
) -> LlamaModel:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if dtype is None:
        try:
            from transformers.integrations.gguf import GgufHeader

            dtype = GgufHeader.from_file(str(path)).dtype or torch.float32
        except Exception:
            dtype = torch.float32
    # The reader maps GGUF names to HF names through a model skeleton; build it without memory.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    try:
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    except Exception as exc:
        raise CorruptCheckpointError(f"{path}: cannot read GGUF tensors: {exc}") from exc
    config = _with_gguf_rope_freqs(path, config)
    model = LlamaModel(
        config, layer_range=layer_range, has_embed=has_embed, has_head=has_head, dtype=dtype, device=device, tp=tp
    )
    needed = model.hf_tensor_shapes()
    for name, expected in needed.items():
        if name not in tensors:
            raise MissingTensorError(f"{path}: GGUF file has no tensor for {name!r}")
        _check_shape(path, name, tuple(tensors[name].shape), expected)
        index = hf_shard_index(name, config, tp.rank, tp.size)  # whole on CPU, sliced before the copy
        model.load_hf_tensor(name, tensors[name] if index is None else tensors[name][index])
    return model.eval()


def _with_gguf_rope_freqs(path: Path, config: ModelConfig) -> ModelConfig:
    """Apply llama.cpp's ``rope_freqs.weight`` (Llama 3.1 scaling, stored as per-frequency divisors).

    transformers' GGUF config reader drops it, which would silently give unscaled rope.
    """
    import dataclasses

    from gguf import GGUFReader, dequantize

    try:
        tensor = next((t for t in GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight"), None)
    except Exception as exc:
        raise CorruptCheckpointError(f"{path}: cannot read GGUF tensor table: {exc}") from exc
    if tensor is None:
        return config
    factors = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float().reshape(-1)
    if factors.numel() != len(config.inv_freq):
        raise TensorShapeError(
            f"{path}: tensor 'rope_freqs.weight' has {factors.numel()} values, expected {len(config.inv_freq)}"
        )
    inv_freq = torch.tensor(config.inv_freq, dtype=torch.float32) / factors
    return dataclasses.replace(config, rope_type="gguf_rope_freqs", inv_freq=tuple(inv_freq.tolist()))
