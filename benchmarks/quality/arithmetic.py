"""Multi-digit addition learned from scratch: one token per digit (hybrid_lm.train_tokenizer) against a plain BPE.

    PYTHONPATH=. python benchmarks/quality/arithmetic.py [--device cuda] [--tiny] [--out-dir DIR]

Both tokenizers are byte-level BPEs of the same vocabulary size trained on the same text (the training problems,
one `a+b=c` per line). `train_tokenizer` splits every digit into a token of its own; the plain BPE
(`benchmarks/tokenizer.py`'s `train_plain`, the usual recipe) merges digit runs into multi-digit tokens, so the
model sees "4096" as one or two opaque symbols whose place values it must learn token by token. The claim (Nogueira
et al. 2021, "Investigating the Limitations of Transformers with Simple Arithmetic Tasks"; Singh & Strouse 2024,
"Tokenization counts"; the reason Llama and PaLM split digits): digit tokens make addition learnable, and learnable
beyond the lengths seen in training.

Same model (a 4-layer hybrid, a:m 1:1, dense MLPs, width 256), same seed, same steps and the same problems for
both tokenizers. Training: operands with 1..4 digits (the number of digits uniform, then the number uniform), the
sum written in the usual order, loss on the answer tokens only (`c` and the newline), AdamW 1e-3 with warm-up and
cosine decay, up to 4000 steps of 256 problems, a fresh batch each step, the held-out problems never among them.
Full size, the whole run fits `--time-budget` (default 110 s): after the tokenizers, a few steps of each model are
timed and both get the most steps (at most 4000) that fit, keeping a tenth of the time for the evaluations.

Scoring: exact match of the greedy completion of the prompt `a+b=` (plain forwards without a cache, the prompts
being short; each batch holds prompts of one token length so nothing is padded), cut at the first newline,
against str(a + b). Three held-out sets: in distribution (1..4 digits, like training), and both operands with
exactly 5 (one more) and 6 (two more) digits.

--tiny: operands of 1..2 digits (tested at 3 and 4), a 2-layer width-64 model, 600 steps of 32 problems: about
35 s on a 2-core CPU, where the digit tokens already lead in distribution (seed 0: 0.74 against 0.27).
"""

import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from tokenizer import train_plain  # noqa: E402  (benchmarks/tokenizer.py)

from hybrid_lm import train_tokenizer  # noqa: E402

SIZES = {
    "full": dict(digits=4, width=256, layers=4, steps=4000, batch=256, lr=1e-3, vocab=1024, corpus=50_000,
                 test=500),
    "tiny": dict(digits=2, width=64, layers=2, steps=600, batch=32, lr=3e-3, vocab=300, corpus=5_000, test=100),
}
TIME_BUDGET = 110  # seconds, full size
EVAL_RESERVE = 0.1  # of the time left after setup, kept for the greedy evaluations
BOS, PAD = 1, 0  # train_tokenizer's ids; the plain BPE gets the same special tokens in the same order


# ---------------------------------------------------------------------------------------------------- task
def operand(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0 counts as one digit)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def problems(rng: random.Random, count: int, min_digits: int, max_digits: int, exclude=frozenset()) -> list[tuple]:
    """`count` distinct (a, b) pairs, each operand's digit count uniform in min_digits..max_digits; none in exclude."""
    low, high = (10 ** (min_digits - 1) if min_digits > 1 else 0), 10**max_digits
    available = (high - low) ** 2 - sum(low <= a < high and low <= b < high for a, b in exclude)
    if count > available:
        raise ValueError(f"{count} distinct problems asked for, but operands of {min_digits}-{max_digits} digits "
                         f"give {available} (held-out ones excluded)")
    out, seen = [], set(exclude)
    while len(out) < count:
        pair = (operand(rng, rng.randint(min_digits, max_digits)), operand(rng, rng.randint(min_digits, max_digits)))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer(a: int, b: int) -> str:
    return f"{a + b}\n"


def is_correct(a: int, b: int, completion: str) -> bool:
    """Exact match: the completion up to its first newline is the sum, and the newline is there."""
    line, newline, _ = completion.partition("\n")
    return bool(newline) and line == str(a + b)


# ---------------------------------------------------------------------------------------------------- model io
def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, one `encode` call per text: `encode_batch` runs on the tokenizers thread pool, whose
    threads, woken every step, starved torch's on a 2-core CPU (the tiny run took 40x longer)."""
    return [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]


def training_batch(tokenizer, pairs: list[tuple], device) -> dict:
    """[bos] prompt answer, right-padded; labels only on the answer tokens (padding after them changes nothing
    before them in a causal model)."""
    prompts = encode(tokenizer, [prompt(a, b) for a, b in pairs])
    answers = encode(tokenizer, [answer(a, b) for a, b in pairs])
    length = max(1 + len(p) + len(q) for p, q in zip(prompts, answers))
    input_ids = torch.full((len(pairs), length), PAD, dtype=torch.long)
    labels = torch.full((len(pairs), length), -100, dtype=torch.long)
    for row, (p, q) in enumerate(zip(prompts, answers)):
        ids = [BOS] + p + q
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, 1 + len(p): len(ids)] = torch.tensor(q)
    return {"input_ids": input_ids.to(device), "labels": labels.to(device)}


@torch.no_grad()
def greedy_completions(model, tokenizer, pairs: list[tuple], max_new_tokens: int, device, batch: int = 256) -> list[str]:
    """Greedy continuation of each prompt by full forwards (no cache), prompts of one token length per batch."""
    newline_ids = torch.tensor([i for t, i in tokenizer.get_vocab().items() if "Ċ" in t], device=device)  # byte-level "\n"
    prompts = encode(tokenizer, [prompt(a, b) for a, b in pairs])
    by_length = {}
    for index, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(index)
    out = [""] * len(pairs)
    for indices in by_length.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start: start + batch]
            ids = torch.tensor([[BOS] + prompts[i] for i in chunk], device=device)
            prompt_len, done = ids.shape[1], torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                next_ids = model(input_ids=ids).logits[:, -1].argmax(-1)
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                done |= torch.isin(next_ids, newline_ids)
                if bool(done.all()):
                    break
            for row, i in enumerate(chunk):
                out[i] = tokenizer.decode(ids[row, prompt_len:].tolist(), skip_special_tokens=False)
    return out


def accuracy(model, tokenizer, pairs, device) -> float:
    max_new = max(len(answer(a, b)) for a, b in pairs) + 1
    completions = greedy_completions(model, tokenizer, pairs, max_new, device)
    return sum(is_correct(a, b, c) for (a, b), c in zip(pairs, completions)) / len(pairs)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = common.parser(__doc__, TIME_BUDGET)
    p.add_argument("--steps", type=int, help="most training steps per tokenizer (default: 4000, tiny: 600)")
    args = p.parse_args(argv)
    if args.plot_only:
        return {"figure": common.plot_only(args.plot_only, "arithmetic", plot)}
    deadline = common.deadline_of(args)
    size = "tiny" if args.tiny else "full"
    spec = dict(SIZES[size])
    spec["steps"] = args.steps or spec["steps"]
    device = common.resolve_device(args.device)
    digits = spec["digits"]

    # 1. held-out problems first, so the training stream can avoid them
    rng = random.Random(args.seed)
    splits = {f"in distribution (1-{digits} digits)": problems(rng, spec["test"], 1, digits)}
    for extra in (1, 2):
        splits[f"{digits + extra} digits (+{extra})"] = problems(rng, spec["test"], digits + extra, digits + extra)
    held_out = frozenset(pair for pairs in splits.values() for pair in pairs)

    # 2. both tokenizers from the same text
    corpus = problems(random.Random(args.seed + 1), spec["corpus"], 1, digits, exclude=held_out)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sums.txt"
        path.write_text("".join(prompt(a, b) + answer(a, b) for a, b in corpus))
        tokenizers = {
            "digits (train_tokenizer)": train_tokenizer([path], vocab_size=spec["vocab"], show_progress=False)
            .backend_tokenizer,
            "plain BPE": train_plain([path], spec["vocab"], whole_files=True),
        }
    vocab_size = max(t.get_vocab_size() for t in tokenizers.values())
    example = corpus[0]
    for name, tok in tokenizers.items():
        print(f"{name}: {tok.get_vocab_size()} tokens; {prompt(*example) + answer(*example)!r} -> "
              f"{tok.encode(prompt(*example) + answer(*example), add_special_tokens=False).tokens}")

    # 3. one model per tokenizer: same config, seed, steps and problems; with a budget, as many steps as fit
    def build():
        return common.build_model("1:1", num_layers=spec["layers"], hidden_size=spec["width"], vocab_size=vocab_size,
                                  device=device, seed=args.seed, max_length=64)

    def batches(tok, seed):
        stream = random.Random(seed)
        return lambda step: training_batch(tok, problems(stream, spec["batch"], 1, digits, exclude=held_out), device)

    models = [build() for _ in tokenizers]
    steps = spec["steps"]
    if deadline is not None:
        timings = [common.seconds_per_step(model, batches(tok, args.seed + 3), device=device)
                   for model, tok in zip(models, tokenizers.values())]
        steps = common.fit_steps(steps, timings, deadline, reserve=EVAL_RESERVE)
        print(f"{', '.join(f'{t * 1e3:.1f}' for t in timings)} ms/step: {steps} steps per tokenizer fit the budget")
    records = []
    for i, ((name, tok), model) in enumerate(zip(tokenizers.items(), models)):
        # each model's own share of the time left: a run that overruns its estimate must not take the next one's steps
        own_deadline = None if deadline is None else time.time() + (deadline - time.time()) / (len(models) - i)
        result = common.train(model, batches(tok, args.seed + 2), steps=steps, lr=spec["lr"], device=device,
                              deadline=own_deadline, desc=name,
                              progress=not args.no_progress)
        model.eval()
        scores = {split: accuracy(model, tok, pairs, device) for split, pairs in splits.items()}
        tokens_per_problem = sum(len(ids) for ids in encode(tok, [prompt(a, b) + answer(a, b) for a, b in corpus[:1000]]))
        records.append(dict(tokenizer=name, vocab=tok.get_vocab_size(), tokens_per_problem=tokens_per_problem / 1000,
                            accuracy=scores, losses=result.losses, steps=result.steps, out_of_time=result.out_of_time,
                            seconds=result.seconds, diverged=result.diverged,
                            parameters=common.parameter_counts(model)[0], seed=args.seed))
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    header = ["tokenizer", "vocab", "tokens / problem"] + list(splits) + ["final loss", "steps"]
    rows = [[r["tokenizer"], r["vocab"], r["tokens_per_problem"]] + [r["accuracy"][s] for s in splits]
            + [sum(r["losses"][-50:]) / len(r["losses"][-50:]), r["steps"]] for r in records]
    table = common.markdown_table(header, rows)
    budget = "no time budget" if deadline is None else f"steps chosen to fit the time budget ({spec['steps']} at most)"
    notes = [
        f"{size} size, seed {args.seed}: model {common.plan_label(model)}, width {spec['width']}, "
        f"{records[0]['parameters'] / 1e6:.2f}M parameters; {steps} steps of {spec['batch']} problems "
        f"(operands 1-{digits} digits), lr {spec['lr']}, {budget}; tokenizers trained on {spec['corpus']} problems "
        f"with vocab_size {spec['vocab']}; {spec['test']} held-out problems per column.",
        "Cells: exact match of the greedy completion. Training time: "
        + ", ".join(f"{r['tokenizer']} {r['seconds']:.0f} s" for r in records) + ".",
    ]
    common.write_results(args.out_dir, "arithmetic", title=f"Addition, digit tokens vs plain BPE ({size})",
                         command=common.command_line(argv), device=device, notes=notes, table=table, records=records,
                         plot=plot, no_plot=args.no_plot)
    return {"records": records}


def plot(records: list[dict], plt):
    """Exact match per held-out split (left) and the smoothed answer loss (right), one line per tokenizer."""
    splits = list(records[0]["accuracy"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in records:
        left.plot(range(len(splits)), [r["accuracy"][s] for s in splits], marker="o", label=r["tokenizer"])
        right.plot(common.smooth(r["losses"], 25), label=r["tokenizer"])
    left.set_xticks(range(len(splits)), [s.split(" (")[0] if "+" not in s else s for s in splits], fontsize=8)
    left.set_ylabel("exact match")
    left.set_ylim(-0.02, 1.02)
    left.legend()
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("answer loss (smoothed)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig


if __name__ == "__main__":
    main()
