"""Convert a transformers checkpoint folder into a hybrid_lm folder, and verify the result.

    python conversion/convert.py SRC DST [--from jamba] [--dtype bfloat16] [--no-verify]

The source format is read from SRC/config.json when --from is not given. Tensors are streamed shard by
shard (peak memory stays near one output shard), the output is sharded safetensors plus the hybrid_lm
code (loadable with trust_remote_code=True where the package is not installed), tokenizer files are
carried over, and DST appears only once everything is written: on any error nothing is left behind.

Verification (on by default) loads SRC with its transformers class and DST with hybrid_lm, runs both on
the same random batch in float32 and fails if the logits differ by more than --tolerance.
"""

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_lm import HybridLMConfig, HybridLMForCausalLM  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
FLOAT32_TENSORS = ("A_log", ".D", "dt_proj.bias")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """A problem with the input; the message says what and how to fix it."""


# ----------------------------------------------------------------------------- formats


@dataclass
class SourceFormat:
    """How one checkpoint family maps onto HybridLMConfig and hybrid_lm tensor names."""

    name: str
    model_types: tuple[str, ...]
    build_config: Callable[[dict], HybridLMConfig]
    map_tensor: Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]
    reference_class: str  # transformers class used for verification
    ignored_fields: frozenset = field(default_factory=frozenset)


def _shared_fields(source: dict, ignored: frozenset) -> dict:
    """Fields of the source config that HybridLMConfig has too (same name, same meaning)."""
    known = set(HybridLMConfig.__dataclass_fields__) - {"layers_block_type", "layers_num_experts"}
    skip = {"model_type", "architectures", "transformers_version", "auto_map", "dtype", "torch_dtype"}
    return {k: v for k, v in source.items() if k in known and k not in skip and k not in ignored}


# Jamba: field names and tensor names are hybrid_lm's own; only the merged expert layout needs splitting.
JAMBA_IGNORED = frozenset({"use_mamba_kernels", "use_mambapy", "use_associative_scan"})


def jamba_config(source: dict) -> HybridLMConfig:
    fields = _shared_fields(source, JAMBA_IGNORED)
    return HybridLMConfig(**fields, mamba_inner_layernorms=True, use_rope=False, norm_topk_prob=False)


_MERGED_EXPERTS = re.compile(r"^(.*\.feed_forward\.experts)\.(gate_up_proj|down_proj)$")


def jamba_tensors(key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    match = _MERGED_EXPERTS.match(key)
    if match is None:
        yield key, tensor
        return
    prefix, kind = match.groups()
    for expert, weight in enumerate(tensor):  # (E, ...) -> one tensor per expert
        if kind == "down_proj":
            yield f"{prefix}.{expert}.down_proj.weight", weight
        else:
            gate, up = weight.chunk(2, dim=0)
            yield f"{prefix}.{expert}.gate_proj.weight", gate
            yield f"{prefix}.{expert}.up_proj.weight", up


FORMATS = {
    "jamba": SourceFormat("jamba", ("jamba",), jamba_config, jamba_tensors, "JambaForCausalLM", JAMBA_IGNORED),
}


def detect_format(source_config: dict) -> str:
    model_type = source_config.get("model_type")
    for name, fmt in FORMATS.items():
        if model_type in fmt.model_types:
            return name
    raise ConversionError(
        f"unsupported model_type {model_type!r} in config.json; supported: "
        f"{sorted(t for f in FORMATS.values() for t in f.model_types)} (or pass --from)"
    )


# ----------------------------------------------------------------------------- streaming io


def source_shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (src / f).exists()]
        if missing:
            raise ConversionError(f"{index} lists shards that are missing: {missing}")
        return [src / f for f in files]
    single = src / "model.safetensors"
    if single.exists():
        return [single]
    raise ConversionError(
        f"no safetensors weights in {src} (expected model.safetensors or model.safetensors.index.json)"
    )


def iter_source_tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in source_shards(src):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` each, plus the index."""

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


def expected_shapes(config: HybridLMConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = HybridLMForCausalLM(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


# ----------------------------------------------------------------------------- conversion


def convert(src, dst, source_format: str | None = None, dtype: str | None = None, verify: bool = True,
            max_shard_size: int = 2 * 1024**3, tolerance: float = 1e-4) -> Path:
    """Converts SRC into a new hybrid_lm folder DST; returns DST. Raises ConversionError on bad input."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"source folder {src} does not exist")
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json; point SRC at a transformers checkpoint folder")
    if dst.exists():
        raise ConversionError(f"destination {dst} already exists; choose a new folder or remove it first")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")

    source_config = json.loads((src / "config.json").read_text())
    name = source_format or detect_format(source_config)
    if name not in FORMATS:
        raise ConversionError(f"unknown source format {name!r}; use one of {sorted(FORMATS)}")
    fmt = FORMATS[name]
    try:
        config = fmt.build_config(source_config)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{src / 'config.json'} cannot be expressed as a HybridLMConfig: {error}") from error
    config.architectures = ["HybridLMForCausalLM"]

    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        _write_weights(src, work, fmt, config, DTYPES.get(dtype), max_shard_size)
        _write_code_and_config(work, config)
        for name_ in TOKENIZER_FILES:
            if (src / name_).exists():
                shutil.copy2(src / name_, work / name_)
        if verify:
            diff = verify_conversion(src, work, fmt)
            print(f"verified: max |logit difference| = {diff:.3e} (tolerance {tolerance:g})")
            if not diff <= tolerance:
                raise ConversionError(
                    f"converted model disagrees with the source: max |logit difference| {diff:.3e} > {tolerance:g}"
                )
        work.rename(dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


def _write_weights(src: Path, work: Path, fmt: SourceFormat, config: HybridLMConfig, dtype, max_bytes: int):
    shapes = expected_shapes(config)
    seen = set()
    writer = ShardWriter(work, max_bytes)
    for source_key, source_tensor in iter_source_tensors(src):
        for key, tensor in fmt.map_tensor(source_key, source_tensor):
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if key not in shapes:
                raise ConversionError(
                    f"tensor {source_key!r} (-> {key!r}) has no place in the model described by config.json; "
                    "the weights and the config disagree (number of layers, layer types or experts?)"
                )
            if tensor.shape != shapes[key]:
                raise ConversionError(
                    f"tensor {source_key!r} has shape {tuple(tensor.shape)} but config.json implies "
                    f"{tuple(shapes[key])} for {key!r}; the weights and the config disagree"
                )
            if key in seen:
                raise ConversionError(f"tensor {key!r} appears twice in the source")
            seen.add(key)
            if dtype is not None and tensor.is_floating_point():
                keep_fp32 = any(marker in key for marker in FLOAT32_TENSORS)
                tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
            writer.add(key, tensor)
    missing = sorted(set(shapes) - seen)
    if missing:
        raise ConversionError(f"the source lacks {len(missing)} tensors the config needs, first: {missing[0]!r}")
    writer.close()


def _write_code_and_config(work: Path, config: HybridLMConfig) -> None:
    from transformers.dynamic_module_utils import custom_object_save

    with torch.device("meta"):
        model = HybridLMForCausalLM(config)
    custom_object_save(model, work, config=config)
    config.save_pretrained(work)


def verify_conversion(src: Path, dst: Path, fmt: SourceFormat) -> float:
    """Max |logit difference| between the source (its transformers class) and the converted model."""
    import transformers

    reference_class = getattr(transformers, fmt.reference_class)
    reference = reference_class.from_pretrained(src, dtype=torch.float32).eval()
    converted = HybridLMForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, converted.config.vocab_size, (2, 24), generator=generator)
    with torch.no_grad():
        expected = reference(input_ids, use_cache=False).logits
        actual = converted(input_ids, use_cache=False).logits
    return (expected - actual).abs().max().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="source checkpoint folder (config.json + safetensors)")
    parser.add_argument("dst", help="new folder to create")
    parser.add_argument("--from", dest="source_format", choices=sorted(FORMATS), help="source format (default: detect)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store weights in this dtype (A_log, D, dt bias stay float32)")
    parser.add_argument("--no-verify", action="store_true", help="skip the logit comparison (models too big to load twice)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| allowed (default 1e-4)")
    parser.add_argument("--max-shard-size", type=int, default=2 * 1024**3, help="bytes per output shard")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.source_format, args.dtype, not args.no_verify, args.max_shard_size,
                args.tolerance)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
