"""Convert Jamba, Mamba, Mixtral and Llama checkpoints into hybrid_lm, or hybrid_lm into Jamba, and verify.

    python conversion/convert.py SRC DST [--from jamba|mamba|mamba_ssm|mixtral|llama|hybrid_lm]
                                 [--to hybrid_lm|jamba] [--dtype float32|bfloat16|float16]
                                 [--max-shard-size 2GB] [--no-verify] [--tolerance 1e-4]

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
import json
import math
import os
import shutil
import signal
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

from transformers.utils.hub import convert_file_size_to_int  # noqa: E402

from hybrid_lm import HybridLMConfig, HybridLMForCausalLM  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The work folder of a run, next to DST, is this then the run's pid: a later run removes those of dead runs.
STAGING = ".{name}.converting-"

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
    below_file = next((parent for parent in dst.parents if parent.exists() and not parent.is_dir()), None)
    if below_file is not None:
        raise ConversionError(f"destination {dst} is below {below_file}, which is a file; choose a folder path")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if target_format not in TARGETS:
        raise ConversionError(f"unknown target format {target_format!r}; use one of {sorted(TARGETS)}")
    if max_shard_size < 1:
        raise ConversionError(f"--max-shard-size must be a positive number of bytes, got {max_shard_size}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ConversionError(f"--tolerance must be a number >= 0 (a max |logit difference|), got {tolerance!r}")

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

    work = _make_work_folder(dst)
    try:
        _write_weights(weights, source, config, work, DTYPES.get(dtype), max_shard_size)
        del weights  # a memory-mapped pickle stays mapped while referenced
        if target.writes_code:
            _write_code(work, config)
        output_config.save_pretrained(work)
        _copy_tokenizer(src, work)
        if verify:
            diff = verify_conversion(src, source_config, source, work, target, DTYPES.get(dtype))
            print(f"verified: max |logit difference| = {diff:.3e} (tolerance {tolerance:g})")
            if not diff <= tolerance:
                raise ConversionError(
                    f"converted model disagrees with the source: max |logit difference| {diff:.3e} > {tolerance:g}"
                )
        _apply_umask(work)
        work.rename(dst)
    except BaseException as error:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(error, OSError):
            raise ConversionError(f"cannot write {dst} ({error}); nothing was left behind") from error
        raise
    return dst


def _make_work_folder(dst: Path) -> Path:
    """A hidden folder next to DST; first removes the ones earlier runs left when they were killed (SIGKILL,
    power loss), naming each."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        prefix = STAGING.format(name=dst.name)
        for stale in dst.parent.glob(prefix + "*"):
            pid = stale.name[len(prefix):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
                print(f"removed {stale}, left behind by an interrupted earlier conversion", file=sys.stderr)
        work = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=dst.parent))
    except OSError as error:
        raise ConversionError(f"cannot create {dst} ({error.strerror}: {error.filename}); choose a writable "
                              f"destination") from None
    return work


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and safetensors writes 0600: give DST what the user's umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def _copy_tokenizer(src: Path, work: Path) -> None:
    """Copies the tokenizer files; names the source's class where SRC leaves it out, since AutoTokenizer would
    otherwise pick HybridLMTokenizer (from model_type) and split the source vocabulary the hybrid_lm way."""
    for file in TOKENIZER_FILES:
        if (src / file).exists():
            shutil.copy2(src / file, work / file)
    if not (work / "tokenizer.json").exists():
        return
    settings = read_json(work / "tokenizer_config.json") if (work / "tokenizer_config.json").exists() else {}
    if "tokenizer_class" not in settings:
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"  # the tokenizer.json as it is
        (work / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


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


def shard_size(text: str) -> int:
    """`--max-shard-size`: bytes, or a size with a unit (`2GB`, `500MB`, `1GiB`) as transformers reads it."""
    try:
        return int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give bytes or e.g. 2GB, 500MB, 1GiB") from None


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


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
    parser.add_argument("--max-shard-size", type=shard_size, default=2 * 1024**3,
                        help="bytes per output shard: a number, or with a unit as transformers takes it (2GB, "
                        "500MB, 1GiB); default 2 GiB")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        try:
            convert(args.src, args.dst, args.source_format, args.dtype, not args.no_verify, args.max_shard_size,
                    args.tolerance, args.target_format)
        except ConversionError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"interrupted; {args.dst} was not written and nothing was left behind", file=sys.stderr)
            return 130
        finally:
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)
    print(f"wrote {args.dst}")
    return 0


def run_command_line(argv=None) -> int:
    """`main` as `python convert.py` runs it: SIGTERM then cleans up as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _interrupted)  # so the cleanup in convert() runs, as for Ctrl-C
    return main(argv)


if __name__ == "__main__":
    sys.exit(run_command_line())
