"""Digit-split tokenizer vs a plain byte-level BPE: training time, encode throughput, tokens per number.

Corpus: the `*.py` files of this Python's standard library (`sysconfig.get_paths()["stdlib"]`), shuffled with a
fixed seed and cut at `--max-mb`; every 10th file is held out for the encode and number measurements. Files that
are not UTF-8 (the stdlib keeps a few on purpose, as encoding tests) are skipped.

    ours:        hybrid_lm.train_tokenizer(files)          Digits(individual) + ByteLevel; reads whole files
    plain:       tokenizers.Tokenizer.train(files, trainer) ByteLevel only, the usual recipe; reads line by line
    plain/files: Tokenizer.train_from_iterator(file texts)  ByteLevel only, fed whole files like ours

Line-by-line reading never shows the trainer a newline followed by indentation, so `plain` cannot learn those
merges; `plain/files` differs from ours in the digit split alone. All three get the same vocabulary size and
the same six special tokens. Run from the repository root:

    PYTHONPATH=. python benchmarks/tokenizer.py [--max-mb 4] [--vocab-size 8192]
"""

import argparse
import random
import re
import sysconfig
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hybrid_lm import train_tokenizer
from hybrid_lm.tokenization_hybrid_lm import DEFAULT_SPECIAL_TOKENS

NUMBER = re.compile(r"\d+")


def stdlib_corpus(max_bytes: int, seed: int) -> tuple[list[Path], list[str], Path, int]:
    """(training files, held-out texts, stdlib root, files skipped as non-UTF-8)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    random.Random(seed).shuffle(paths)
    train, held_out, total, skipped = [], [], 0, 0
    for path in paths:
        if total >= max_bytes:
            break
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        total += len(data)
        if (len(train) + len(held_out)) % 10 == 9:
            held_out.append(text)
        else:
            train.append(path)
    return train, held_out, root, skipped


def train_plain(paths: list[Path], vocab_size: int, whole_files: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(DEFAULT_SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if whole_files:
        tokenizer.train_from_iterator((p.read_text(encoding="utf-8") for p in paths), trainer, length=len(paths))
    else:
        tokenizer.train([str(p) for p in paths], trainer)
    return tokenizer


def best_of(repeats: int, function) -> float:
    """Fastest wall time of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=4.0, help="corpus size in MB (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="default: %(default)s")
    parser.add_argument("--repeats", type=int, default=3, help="encode times: best of N (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train_paths, held_out, root, skipped = stdlib_corpus(int(args.max_mb * 1e6), args.seed)
    train_mb = sum(p.stat().st_size for p in train_paths) / 1e6
    held_out_bytes = sum(len(text.encode()) for text in held_out)
    numbers = [match.group() for text in held_out for match in NUMBER.finditer(text)]
    print(f"corpus: {root}/**/*.py, seed {args.seed}: {len(train_paths)} files ({train_mb:.2f} MB) to train on, "
          f"{len(held_out)} held out ({held_out_bytes / 1e6:.2f} MB, {len(numbers)} numbers), "
          f"{skipped} non-UTF-8 files skipped")
    print(f"vocab size {args.vocab_size}, min_frequency 2, encode: best of {args.repeats}")

    start = time.perf_counter()
    ours = train_tokenizer(train_paths, vocab_size=args.vocab_size, min_frequency=2, show_progress=False)
    times = [time.perf_counter() - start]
    tokenizers = [ours.backend_tokenizer]
    for whole_files in (False, True):
        start = time.perf_counter()
        tokenizers.append(train_plain(train_paths, args.vocab_size, whole_files))
        times.append(time.perf_counter() - start)

    def encode_mb_per_s(tokenizer):
        seconds = best_of(args.repeats, lambda: tokenizer.encode_batch(held_out, add_special_tokens=False))
        return held_out_bytes / 1e6 / seconds

    def tokens_per_kb(tokenizer):
        tokens = sum(len(e.ids) for e in tokenizer.encode_batch(held_out, add_special_tokens=False))
        return 1e3 * tokens / held_out_bytes

    def tokens_per_number(tokenizer):
        return sum(len(e.ids) for e in tokenizer.encode_batch(numbers, add_special_tokens=False)) / len(numbers)

    rows = [
        ("training time (s)", times),
        ("encode MB/s (encode_batch)", [encode_mb_per_s(t) for t in tokenizers]),
        ("tokens per KB of held-out text", [tokens_per_kb(t) for t in tokenizers]),
        ("tokens per number (\\d+, alone)", [tokens_per_number(t) for t in tokenizers]),
    ]
    print(f"{'':32}{'ours':>10}{'plain':>10}{'plain/files':>13}{'ours/plain':>12}{'ours/plain/files':>18}")
    for name, (mine, plain, plain_files) in rows:
        print(f"{name:32}{mine:10.3f}{plain:10.3f}{plain_files:13.3f}{mine / plain:12.3f}{mine / plain_files:18.3f}")
    call_time = best_of(args.repeats, lambda: ours(held_out, add_special_tokens=False))
    print(f"ours through HybridLMTokenizer.__call__ on the list: {held_out_bytes / 1e6 / call_time:.3f} MB/s")
    print(f"average digits per number: {sum(map(len, numbers)) / len(numbers):.3f}")


if __name__ == "__main__":
    main()
