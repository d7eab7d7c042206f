"""The `hybrid-lm` command line.

    hybrid-lm --version
    hybrid-lm train-tokenizer --input FILES... --vocab-size N --output DIR
                              [--min-frequency N] [--model-max-length N] [--encoding-errors {strict,replace}]
                              [--overwrite]
    hybrid-lm memory CONFIG --context N [--batch B] [--weights bf16|int8|nf4|fp4] [--double-quant]
                            [--quantize-mamba] [--prefill-chunk N] [--json]

User errors (bad arguments, missing or unreadable inputs, an output directory in the way) print one line
on stderr and exit with code 2; nothing is written unless the whole tokenizer is: it is saved to a hidden
directory next to `--output` and renamed into place.

`memory` reads CONFIG (a hybrid_lm folder or config.json, or a Jamba, Mixtral, Llama or Mamba config.json) and
prints parameter counts and the bytes of weights, KV cache, Mamba states and prefill activations, without
loading any weights (see memory_hybrid_lm.py for the formulas).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from transformers.utils import logging

from . import __version__
from .configuration_hybrid_lm import HybridLMConfig
from .memory_hybrid_lm import JSON_KEYS, WEIGHT_FORMATS, estimate_memory, format_estimate, load_source_config
from .tokenization_hybrid_lm import DEFAULT_SPECIAL_TOKENS, NUM_BYTES, check_input_files, train_tokenizer

logger = logging.get_logger(__name__)

PROG = "hybrid-lm"
MIN_VOCAB_SIZE = NUM_BYTES + len(DEFAULT_SPECIAL_TOKENS) + 1


class CommandError(Exception):
    """A user error: reported as one line on stderr with exit code 2, without a traceback."""


def _int_at_least(minimum: int, why: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: {why}; use at least {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Tools for hybrid_lm models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train-tokenizer",
        help="train the digit-split byte-level BPE tokenizer on text files",
        description="Train a HybridLMTokenizer (byte-level BPE, one token per digit) and save it with "
        "save_pretrained, ready for AutoTokenizer.from_pretrained.",
    )
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to train on")
    train.add_argument(
        "--vocab-size",
        type=_int_at_least(MIN_VOCAB_SIZE, f"the vocabulary holds {NUM_BYTES} byte tokens, "
                                           f"{len(DEFAULT_SPECIAL_TOKENS)} special tokens and at least one merge"),
        required=True,
        metavar="N",
        help="final vocabulary size, special and byte tokens included (use your config's vocab_size)",
    )
    train.add_argument("--output", required=True, metavar="DIR", help="directory to save the tokenizer in")
    train.add_argument(
        "--min-frequency",
        type=_int_at_least(0, "it counts occurrences"),
        default=2,
        metavar="N",
        help="merge only pairs seen at least N times (default: %(default)s)",
    )
    train.add_argument(
        "--model-max-length",
        type=_int_at_least(1, "it is a number of tokens"),
        default=HybridLMConfig.max_position_embeddings,
        metavar="N",
        help="the tokenizer's model_max_length: your config's max_position_embeddings (default: %(default)s)",
    )
    train.add_argument(
        "--encoding-errors",
        choices=("strict", "replace"),
        default="strict",
        help="bytes that are not UTF-8: 'strict' stops with the file, line and byte; 'replace' trains on "
        "U+FFFD in their place (default: %(default)s)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR (and everything in it) if it holds a different tokenizer or other files",
    )
    train.set_defaults(run=_train_tokenizer_command)

    memory = commands.add_parser(
        "memory",
        help="estimate the memory of loading a model and prefilling a context, from its config alone",
        description="Total and active parameters, weight bytes (quantized as bitsandbytes does, Mamba mixers, "
        "routers, norms, embeddings and lm_head kept in bf16), KV cache, Mamba conv/SSM states and peak prefill "
        "activations for one prefill forward; no weights are loaded.",
    )
    memory.add_argument("config", metavar="CONFIG",
                        help="a hybrid_lm folder or config.json, or a Jamba, Mixtral, Llama or Mamba config.json")
    memory.add_argument("--context", type=_int_at_least(1, "it is a number of tokens"), required=True, metavar="N",
                        help="tokens per sequence to prefill")
    memory.add_argument("--batch", type=_int_at_least(1, "it is a number of sequences"), default=1, metavar="B",
                        help="sequences prefilled together (default: %(default)s)")
    memory.add_argument("--weights", choices=WEIGHT_FORMATS, default="bf16",
                        help="weight format: bf16, or bitsandbytes int8 / nf4 / fp4 (default: %(default)s)")
    memory.add_argument("--double-quant", action="store_true",
                        help="4-bit with bnb_4bit_use_double_quant (the block scales quantized too)")
    memory.add_argument("--quantize-mamba", action="store_true",
                        help="quantize the Mamba mixers' projections too (by default they stay in bf16)")
    memory.add_argument("--prefill-chunk", type=_int_at_least(1, "it is a number of tokens"), default=None,
                        metavar="N", help="prefill in chunks of N tokens (generate's prefill_chunk_size)")
    memory.add_argument("--json", action="store_true", help="print one JSON object: " + ", ".join(JSON_KEYS))
    memory.set_defaults(run=_memory_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `hybrid-lm` with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse has printed the usage or the error
        return exit_request.code
    try:
        args.run(args)
    except CommandError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _train_tokenizer_command(args: argparse.Namespace) -> None:
    output = Path(args.output).resolve()
    holds_tokenizer = _check_output(output, args.overwrite)
    try:
        check_input_files(args.input)
        tokenizer = train_tokenizer(
            args.input,
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            show_progress=sys.stderr.isatty(),  # tokenizers also prints blank lines to stdout with the bars
            model_max_length=args.model_max_length,
            encoding_errors=args.encoding_errors,
        )
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from error

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    except OSError as error:
        raise CommandError(
            f"cannot create a directory next to {output} ({error}); choose a writable --output"
        ) from error
    try:
        tokenizer.save_pretrained(staging)
        staging.chmod(0o777 & ~_umask())  # mkdtemp made it 0700; the files were created under the umask already
        if holds_tokenizer:
            differing = _differing_files(staging, output)
            if not differing:
                print(f"{output} already holds this tokenizer; left it unchanged")
                return
            if not args.overwrite:
                raise CommandError(
                    f"output directory {output} already holds a different tokenizer ({', '.join(differing)} "
                    f"differ); pass --overwrite to replace it, or choose another --output"
                )
        _move_into_place(staging, output)
    except OSError as error:
        raise CommandError(f"cannot write the tokenizer to {output} ({error}); nothing was changed there") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once it has been renamed into place
    short = len(tokenizer) < args.vocab_size
    short = f" (not the {args.vocab_size} asked for: the corpus ran out of pairs)" if short else ""
    print(f"saved a {len(tokenizer)}-token tokenizer to {output}{short}")


def _memory_command(args: argparse.Namespace) -> None:
    try:
        config = load_source_config(args.config)
    except (OSError, ValueError) as error:
        raise CommandError(str(error).splitlines()[0]) from error
    estimate = estimate_memory(config, args.context, args.batch, args.weights, args.prefill_chunk, args.double_quant,
                               args.quantize_mamba)
    if args.json:
        print(json.dumps({key: getattr(estimate, key) for key in JSON_KEYS}))
    else:
        print(format_estimate(estimate, config))


def _check_output(output: Path, overwrite: bool) -> bool:
    """Raise `CommandError` if `output` cannot take a tokenizer; return whether it already holds one."""
    if output.exists() and not output.is_dir():
        raise CommandError(f"--output {output} exists and is not a directory; choose a directory path")
    if not output.is_dir():
        return False
    if (output / "tokenizer.json").is_file():
        return True
    if any(output.iterdir()) and not overwrite:
        raise CommandError(
            f"output directory {output} is not empty and holds no tokenizer; choose a new or empty directory, "
            f"or pass --overwrite to replace it and everything in it"
        )
    return False


def _differing_files(new: Path, old: Path) -> list[str]:
    """Names of the files in `new` that `old` lacks or holds with other content."""
    return [
        path.name
        for path in sorted(new.iterdir())
        if not (old / path.name).is_file() or (old / path.name).read_bytes() != path.read_bytes()
    ]


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename `staging` to `output`, replacing an existing `output` only once the new one is complete."""
    if not output.exists():
        os.rename(staging, output)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    os.rename(output, retired / output.name)
    try:
        os.rename(staging, output)
    except OSError:
        os.rename(retired / output.name, output)
        os.rmdir(retired)
        raise
    shutil.rmtree(retired)
    logger.warning(f"replaced the previous contents of {output} (--overwrite)")


if __name__ == "__main__":
    sys.exit(main())
