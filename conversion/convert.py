"""Convert Jamba, Mamba, Mixtral and Llama checkpoints into hybrid_lm, or hybrid_lm into Jamba, and verify.

    python conversion/convert.py SRC DST [--from jamba|mamba|mamba_ssm|mixtral|llama|hybrid_lm]
                                 [--to hybrid_lm|jamba] [--dtype float32|bfloat16|float16]
                                 [--max-shard-size BYTES] [--no-verify] [--tolerance 1e-4]

SRC is a transformers folder (JambaForCausalLM, MambaForCausalLM, MixtralForCausalLM, LlamaForCausalLM), a
state-spaces mamba_ssm folder (config.json with d_model / n_layer, pytorch_model.bin), or with --to jamba a
hybrid_lm folder. The source format is read from SRC/config.json when --from is not given.

Tensors are streamed shard by shard (peak memory stays near one output shard), the output is sharded
safetensors, tokenizer files are carried over, and a hybrid_lm result carries the model code (loadable with
trust_remote_code=True where the package is not installed). DST appears only once everything is written:
on any error nothing is left behind. What a format cannot express exactly is refused, with the reason.

Verification (on by default) loads SRC with its transformers class (mamba_ssm: transformers' Mamba given
the same weights) and DST with its own class, runs both on the same random batch in float32 and fails if
the logits differ by more than --tolerance. With --dtype the source weights are rounded the same way first,
so the check measures the conversion, not the rounding.
"""

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_io import ConversionError, ConversionWarning, ShardWriter, read_json  # noqa: E402
from sources import SOURCES, SourceFormat, detect_source, open_weights  # noqa: E402
from targets import TARGETS, TargetFormat  # noqa: E402

from hybrid_lm import HybridLMConfig, HybridLMForCausalLM  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["ConversionError", "ConversionWarning", "convert", "main"]


def keeps_float32(key: str) -> bool:
    """Mamba's A_log, D and dt bias stay float32 whatever --dtype says (as hybrid_lm keeps them at run time)."""
    return key.endswith(("A_log", ".D", "dt_proj.bias"))


def expected_shapes(config: HybridLMConfig) -> dict[str, torch.Size]:
    """hybrid_lm tensor name -> shape for `config` (a meta-device model: no memory); no lm_head when tied."""
    with torch.device("meta"):
        model = HybridLMForCausalLM(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def convert(src, dst, source_format: str | None = None, dtype: str | None = None, verify: bool = True,
            max_shard_size: int = 2 * 1024**3, tolerance: float = 1e-4, target_format: str = "hybrid_lm") -> Path:
    """Converts SRC into a new folder DST in `target_format`; returns DST. Raises ConversionError on bad input
    (DST is then not created)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"source folder {src} does not exist")
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json; point SRC at a checkpoint folder")
    if dst.exists():
        raise ConversionError(f"destination {dst} already exists; choose a new folder or remove it first")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if target_format not in TARGETS:
        raise ConversionError(f"unknown target format {target_format!r}; use one of {sorted(TARGETS)}")
    if max_shard_size < 1:
        raise ConversionError(f"--max-shard-size must be a positive number of bytes, got {max_shard_size}")

    source_config = read_json(src / "config.json")
    name = source_format or detect_source(source_config)
    if name not in SOURCES:
        raise ConversionError(f"unknown source format {name!r}; use one of {sorted(SOURCES)}")
    source, target = SOURCES[name], TARGETS[target_format]
    if name not in target.sources:
        hint = "use --to jamba to export it" if name == "hybrid_lm" else "convert it to hybrid_lm first"
        raise ConversionError(f"--to {target.name} reads {list(target.sources)} checkpoints, SRC is {name!r}: {hint}")

    weights = open_weights(src, source.reads_pickle)
    try:
        config = source.build_config(source_config, weights)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConversionError):
            raise ConversionError(f"{src / 'config.json'} cannot be converted: {error}") from error
        raise ConversionError(f"{src / 'config.json'} cannot be expressed as a HybridLMConfig: {error}") from error
    try:
        output_config = target.build_config(config)
    except ConversionError as error:
        raise ConversionError(f"{src} cannot be exported to {target.name}: {error}") from error
    output_config.dtype = dtype or source_config.get("dtype") or source_config.get("torch_dtype")

    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        _write_weights(weights, source, config, work, DTYPES.get(dtype), max_shard_size)
        del weights  # a memory-mapped pickle stays mapped while referenced
        if target.writes_code:
            _write_code(work, config)
        output_config.save_pretrained(work)
        for file in TOKENIZER_FILES:
            if (src / file).exists():
                shutil.copy2(src / file, work / file)
        if verify:
            diff = verify_conversion(src, source_config, source, work, target, DTYPES.get(dtype))
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


def _write_weights(weights, source: SourceFormat, config: HybridLMConfig, work: Path, dtype, max_bytes: int):
    """Streams the source tensors through the key map into shards, checking every name and shape against
    the model `config` describes; a tensor that is missing, unknown, repeated or misshapen is an error."""
    shapes = expected_shapes(config)
    seen = set()
    writer = ShardWriter(work, max_bytes)
    for source_key, source_tensor in weights:
        mapped = source.keys(source_key, source_tensor)
        if mapped is None:
            raise ConversionError(
                f"tensor {source_key!r} is not part of a {source.name} checkpoint; is --from right, or is the "
                "checkpoint a variant this converter does not know?"
            )
        for key, tensor in mapped:
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
                tensor = tensor.to(torch.float32 if keeps_float32(key) else dtype)
            writer.add(key, tensor)
    missing = sorted(set(shapes) - seen)
    if missing:
        raise ConversionError(f"the source lacks {len(missing)} tensors the config needs, first: {missing[0]!r}")
    writer.close()


def _write_code(work: Path, config: HybridLMConfig) -> None:
    """hybrid_lm's modeling files next to the weights, so trust_remote_code=True loads them anywhere."""
    from transformers.dynamic_module_utils import custom_object_save

    with torch.device("meta"):
        model = HybridLMForCausalLM(config)
    custom_object_save(model, work, config=config)


def verify_conversion(src: Path, source_config: dict, source: SourceFormat, dst: Path, target: TargetFormat,
                      dtype: torch.dtype | None) -> float:
    """Max |logit difference| between the source (its oracle) and the converted model, in float32.

    With `dtype`, the oracle's weights are first rounded to it (A_log, D, dt bias excepted), as the
    converter rounded the written ones.
    """
    reference = source.reference(src, source_config).eval()
    converted = target.load(dst).eval()
    if dtype is not None:
        with torch.no_grad():
            for name, param in reference.named_parameters():
                if not keeps_float32(name):
                    param.copy_(param.to(dtype))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, converted.config.vocab_size, (2, 24), generator=generator)
    with torch.no_grad():
        expected = reference(input_ids, use_cache=False).logits
        actual = converted(input_ids, use_cache=False).logits
    return (expected - actual).abs().max().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="source checkpoint folder")
    parser.add_argument("dst", help="new folder to create")
    parser.add_argument("--from", dest="source_format", choices=sorted(SOURCES),
                        help="source format (default: detected from SRC/config.json)")
    parser.add_argument("--to", dest="target_format", choices=sorted(TARGETS), default="hybrid_lm",
                        help="output format (default hybrid_lm; jamba exports a hybrid_lm folder for Jamba servers)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="store weights in this dtype (A_log, D, dt bias stay float32)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the logit comparison (models too big to load twice)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| allowed (default 1e-4)")
    parser.add_argument("--max-shard-size", type=int, default=2 * 1024**3,
                        help="bytes per output shard (default 2 GiB)")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        try:
            convert(args.src, args.dst, args.source_format, args.dtype, not args.no_verify, args.max_shard_size,
                    args.tolerance, args.target_format)
        except ConversionError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        finally:
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
