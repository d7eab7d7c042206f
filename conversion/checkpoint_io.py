"""Reading source checkpoints tensor by tensor and writing sharded safetensors: the streaming half of convert.py.

Nothing here knows a model family: `SafetensorsWeights` and `PickleWeights` yield (key, tensor) pairs one
shard at a time, `ShardWriter` packs them into output shards of bounded size. Every problem with the
input is a `ConversionError` whose message names the file and the fix.
"""

import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hybrid_lm.source_configs_hybrid_lm import DroppedSettingWarning


class ConversionError(ValueError):
    """A problem with the input; the message says what and how to fix it."""


# A source setting that does not change inference but is dropped by the conversion: the package's class, since the
# config mappings that warn live in the package (hybrid_lm/source_configs_hybrid_lm.py).
ConversionWarning = DroppedSettingWarning


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a ConversionError naming the file."""
    if not path.exists():
        raise ConversionError(f"{path} is missing; point SRC at a complete checkpoint folder")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); restore the file from the original checkpoint")
    if not isinstance(value, dict):
        raise ConversionError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- reading


class SafetensorsWeights:
    """The tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.

    Iterating reads one shard at a time, so only one source shard is open (memory-mapped) at once.
    """

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index} has no 'weight_map'; restore the file from the original checkpoint")
            self.files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [path.name for path in self.files if not path.exists()]
            if missing:
                raise ConversionError(
                    f"{index} lists shards that are missing: {missing}; download or copy them into {folder}"
                )
        elif (folder / "model.safetensors").exists():
            self.files = [folder / "model.safetensors"]
        else:
            raise ConversionError(
                f"no safetensors weights in {folder} (expected model.safetensors or model.safetensors.index.json)"
            )
        for path in self.files:  # a truncated file fails here, by name, not halfway through the conversion
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except SafetensorError as error:
                raise ConversionError(f"{path} is truncated or damaged ({error}); download or copy it again") from None

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of tensor `key` without reading it, or None when no shard has it."""
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                if key in f.keys():
                    return tuple(f.get_slice(key).get_shape())
        return None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)


class PickleWeights:
    """The tensors of a `torch.save` file (`pytorch_model.bin`), memory-mapped and unpickled with
    `weights_only=True` so the file can hold tensors only, never code. Used for the mamba_ssm layout alone."""

    def __init__(self, path: Path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
            raise ConversionError(
                f"cannot read {path} as a torch state dict ({str(error).splitlines()[0]}); it must be a plain "
                "dict of tensors saved with torch.save (zip format)"
            ) from error
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ConversionError(f"{path} does not hold a flat dict of tensors; save the model's state_dict()")
        self.state = state

    def shape(self, key: str) -> tuple[int, ...] | None:
        tensor = self.state.get(key)
        return tuple(tensor.shape) if tensor is not None else None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.state.items()


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` each (a larger tensor gets a shard of its
    own), then renames them `model-0000i-of-0000n.safetensors` and writes the index; one shard is written as
    `model.safetensors`."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        self.buffer[key] = tensor.contiguous()
        self.buffer_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.buffer:
            return
        save_file(self.buffer, str(self.folder / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            (self.folder / "shard-00000.tmp").rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
