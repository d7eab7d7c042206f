"""Multi-query associative recall (MQAR): can a model look up the value of a key it saw earlier in the sequence?

    PYTHONPATH=. python benchmarks/quality/mqar.py [--device cuda] [--tiny] [--out-dir DIR] [grid options]

The task of Zoology (Arora, Eyuboglu et al., 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models", section 3 and Figure 2; `zoology/data/multiquery_ar.py`): a sequence opens with `pairs`
key-value pairs, keys drawn without replacement from the first half of the vocabulary (ids 1 .. V/2-1), values
from the second half; every key is then queried once, at a position drawn from a power law (power_a = 0.01,
short gaps likely) among the remaining slots, the other slots holding token 0 (Figure 2's
`random_non_queries=False`). Loss and accuracy count the answers only: the model must predict the value right
after each queried key.

    key value key value ... key value | 0 0 k3 0 0 0 k1 0 0 k2 0 ...
                                                 ^ predict v3 here

Setting, as in Zoology's Figure 2 (`iclr24_zoology_figure2/configs.py`): vocabulary 8192, sequence length
64 / 128 / 256 with 4 / 8 / 16 pairs, model width 64 / 128 / 256, 2 layers for the pure models, one attention
head, Mamba with d_state 16 and expand 2, AdamW with weight decay 0.1. Hybrids at the same depth as the claim
needs: a:m 1:1 is 2 layers (Mamba then attention), a:m 1:3 is 4 layers (Jamba's period 4, offset 2). The pure
attention model gets RoPE (Zoology uses learned absolute positions); hybrids have none, as in Jamba (the Mamba
layer before the attention carries position).

Where this differs from the paper, and why:
- Feed-forward blocks. Zoology's Figure 2 has none (`state_mixer` is the identity); here every layer keeps
  hybrid_lm's dense SwiGLU MLP. On the tiny instance a 2-layer attention model without MLPs stayed on the
  1/pairs plateau for 1000 steps (lr 1e-2), with them it reached 0.99 by step 300.
- Budget. Zoology trains 64 epochs of 100k examples (25k steps at batch 256) per run and sweeps four learning
  rates, logspace(-4, -2, 4). The full grid here (4 models x 3 widths x 3 lengths x 3 learning rates = 108
  runs) has to fit in 8.5 minutes of one H200 (`--time-budget 510`): the runs execute in 8 processes sharing
  the GPU, each run gets a fair share of the time left when it starts (about 37 s; 20-100 ms a step when eight
  share the GPU), takes at most 2000 steps at batch 128 (fresh examples every step, so
  there is nothing to memorise), evaluates every 100 steps on 1000 held-out examples and stops once held-out
  accuracy reaches 0.99 (Zoology also keeps the best validation accuracy); a run that stops early leaves its
  time to the later ones. Its learning-rate schedule follows the larger of its step and time fractions, so a
  run the clock ends has still decayed its rate; the steps each best run took are in the second table. The
  short schedule favours large learning rates, so the sweep is logspace(-3, -2, 3) = 1e-3, 3.2e-3, 1e-2: the
  upper half of theirs.
- Each cell of the table is the best held-out accuracy over the learning rates, as in Zoology's figures.

The claims to see: attention solves MQAR at every width; a pure Mamba model's accuracy grows with width (its
state is its memory) and falls with the number of pairs; one attention layer in a hybrid recovers attention's
accuracy at every width.

--tiny: vocabulary 64, length 32 with 4 pairs, width 64, attention (lr 1e-3, batch 64) and the 1:1 hybrid
(lr 5e-3, batch 32: the hybrid learns faster from smaller, noisier batches, attention leaves its plateau more
reliably with larger ones), at most 600 steps, stopping at held-out accuracy 0.97: each reaches it in 150-350
steps, about 15-30 s on a 2-core CPU; tests/test_quality.py asserts that both reach 0.9.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = {"attention": ("attention", 2), "mamba": ("mamba", 2), "hybrid 1:1": ("1:1", 2), "hybrid 1:3": ("1:3", 4)}
SIZES = {  # lrs and batch per model
    "full": dict(models=list(MODELS), vocab=8192, lengths=[64, 128, 256], widths=[64, 128, 256],
                 lrs={m: [1e-3, 10**-2.5, 1e-2] for m in MODELS}, batch={m: 128 for m in MODELS}, steps=2000,
                 eval_every=100, test_examples=1000, stop_at=0.99),
    "tiny": dict(models=["attention", "hybrid 1:1"], vocab=64, lengths=[32], widths=[64],
                 lrs={m: [1e-3] if m == "attention" else [5e-3] for m in MODELS},
                 batch={m: 64 if m == "attention" else 32 for m in MODELS}, steps=600, eval_every=25,
                 test_examples=256, stop_at=0.97),
}
TIME_BUDGET = 510  # seconds, full size: one 10-minute call of the GPU machine, setup included


def pairs_for(length: int) -> int:
    """Zoology's Figure 2: 4 pairs at length 64, 8 at 128, 16 at 256 (a quarter of the sequence is the context)."""
    return max(1, length // 16) if length >= 64 else 4


def mqar_batch(batch: int, length: int, pairs: int, vocab: int, generator: torch.Generator,
               power_a: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both (batch, length); labels are -100 except at the answers (the transformers
    convention: labels[t] is the token the model predicts at t - 1). Mirrors Zoology's `multiquery_ar`, with
    torch ops so batches are made on the device."""
    context = 2 * pairs
    space = (length - context) // 2  # query slots: even offsets after the context
    if vocab // 2 - 1 < pairs or space < pairs:
        raise ValueError(f"{pairs} pairs do not fit vocabulary {vocab} and length {length}: need pairs <= "
                         f"{vocab // 2 - 1} and 4 * pairs <= length")
    device = generator.device
    keys = torch.multinomial(torch.ones(batch, vocab // 2 - 1, device=device), pairs, generator=generator) + 1
    values = torch.multinomial(torch.ones(batch, vocab - vocab // 2, device=device), pairs,
                               generator=generator) + vocab // 2
    weights = power_a * torch.arange(1, space + 1, device=device, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.float().expand(batch, space), pairs, generator=generator)  # without replacement
    input_ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    input_ids[:, 0:context:2], input_ids[:, 1:context:2] = keys, values
    input_ids.scatter_(1, context + 2 * gaps, keys)
    labels = torch.full_like(input_ids, -100)
    labels.scatter_(1, context + 2 * gaps + 1, values)
    return input_ids, labels


def answer_logits(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (answers, V), targets (answers,)): the head at t - 1 wherever labels[t] != -100, and labels[t].

    The head runs at those positions only, a sixteenth of the sequence: the full logits of the 1000 held-out
    examples at length 256 would take 8 GB in float32, and in training the head over every position would be most
    of the step's work. The model's own `.loss` is the mean cross-entropy over the same positions."""
    mask = labels[:, 1:] != -100
    hidden = model.base_model(input_ids=input_ids).last_hidden_state[:, :-1][mask]  # (answers, D)
    return model.get_output_embeddings()(hidden), labels[:, 1:][mask]


def answer_loss(model, batch: dict) -> torch.Tensor:
    """The model's training loss (mean cross-entropy on the answers), from the answer positions' logits only."""
    logits, targets = answer_logits(model, batch["input_ids"], batch["labels"])
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def answer_accuracy(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, answers): the argmax at t - 1 against labels[t] wherever labels[t] != -100."""
    logits, targets = answer_logits(model, input_ids, labels)
    return int((logits.argmax(-1) == targets).sum()), int(targets.numel())


def run_point(model: str, width: int, length: int, lr: float, batch: int, steps: int, size: str, device: str,
              seed: int, progress: bool, deadline: float | None) -> dict:
    """Train one model at one grid point and learning rate; returns its record."""
    spec, dev = SIZES[size], common.resolve_device(device)
    plan, layers = MODELS[model]
    pairs = pairs_for(length)
    net = common.build_model(plan, num_layers=layers, hidden_size=width, vocab_size=spec["vocab"], device=dev,
                             seed=seed, num_heads=1, max_length=length)
    train_gen = torch.Generator(dev).manual_seed(seed)
    test_gen = torch.Generator(dev).manual_seed(seed + 1_000_003)
    test = [mqar_batch(min(250, spec["test_examples"] - start), length, pairs, spec["vocab"], test_gen)
            for start in range(0, spec["test_examples"], 250)]

    def next_batch(step):
        input_ids, labels = mqar_batch(batch, length, pairs, spec["vocab"], train_gen)
        return {"input_ids": input_ids, "labels": labels}

    def evaluate():
        correct = total = 0
        for input_ids, labels in test:
            c, t = answer_accuracy(net, input_ids, labels)
            correct, total = correct + c, total + t
        return {"accuracy": correct / total}

    result = common.train(net, next_batch, steps=steps, lr=lr, device=dev, evaluate=evaluate,
                          eval_every=spec["eval_every"], stop_when=lambda m: m["accuracy"] >= spec["stop_at"],
                          deadline=deadline, desc=f"{model} d{width} L{length} lr{lr:.0e}", progress=progress,
                          loss_fn=answer_loss)
    accuracy = max((m["accuracy"] for _, m in result.evals), default=0.0)
    return dict(model=model, width=width, length=length, pairs=pairs, lr=lr, batch=batch, accuracy=accuracy,
                final_accuracy=result.evals[-1][1]["accuracy"], steps=result.steps, out_of_time=result.out_of_time,
                seconds=result.seconds, diverged=result.diverged, parameters=common.parameter_counts(net)[0],
                seed=seed, layer_plan=net.config.layers_block_type)


def best_per_point(records: list[dict]) -> dict[tuple, dict]:
    """(model, width, length) -> the record with the best accuracy over learning rates."""
    best = {}
    for r in records:
        key = (r["model"], r["width"], r["length"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    return best


def plot(records: list[dict], plt):
    """Accuracy (best lr) against width, one panel per length, one line per model."""
    best = best_per_point(records)
    models = list(dict.fromkeys(r["model"] for r in records))
    widths, lengths = sorted({r["width"] for r in records}), sorted({r["length"] for r in records})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), sharey=True, squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for model in models:
            ax.plot(widths, [best[(model, w, length)]["accuracy"] for w in widths], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_title(f"length {length}, {pairs_for(length)} pairs")
        ax.set_xlabel("model width")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (best lr)")
    axes[0][-1].legend(loc="lower right")
    return fig


def main(argv=None) -> dict:
    p = common.parser(__doc__, TIME_BUDGET)
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all four (tiny: attention, hybrid 1:1)")
    p.add_argument("--widths", nargs="+", type=int, help="default: 64 128 256 (tiny: 64)")
    p.add_argument("--lengths", nargs="+", type=int, help="default: 64 128 256 (tiny: 32)")
    p.add_argument("--lrs", nargs="+", type=float, help="for every model (default: 1e-3 3.2e-3 1e-2; tiny: per model)")
    p.add_argument("--steps", type=int, help="most steps per run (default: 2000, tiny: 600)")
    p.add_argument("--workers", type=int, help="processes sharing the device (default: 8 on CUDA, 1 on CPU)")
    args = p.parse_args(argv)
    if args.plot_only:
        return {"figure": common.plot_only(args.plot_only, "mqar", plot)}
    deadline = common.deadline_of(args)
    size = "tiny" if args.tiny else "full"
    spec = SIZES[size]
    steps = args.steps or spec["steps"]
    device = common.resolve_device(args.device)
    models = args.models or spec["models"]
    widths, lengths = args.widths or spec["widths"], args.lengths or spec["lengths"]
    lrs = {m: args.lrs or spec["lrs"][m] for m in models}
    workers = args.workers or (8 if device.type == "cuda" else 1)
    jobs = [dict(model=m, width=w, length=n, lr=lr, batch=spec["batch"][m], steps=steps, size=size,
                 device=str(device), seed=args.seed, progress=workers == 1 and not args.no_progress)
            for n in lengths for w in widths for m in models for lr in lrs[m]]
    recipes = "; ".join(f"{m}: lr {', '.join(f'{lr:.1e}' for lr in lrs[m])}, batch {spec['batch'][m]}" for m in models)
    budget = "no time budget" if deadline is None else f"time budget {deadline - time.time():.0f} s"
    print(f"MQAR ({size}): {len(jobs)} runs ({len(models)} models x {len(widths)} widths x {len(lengths)} lengths x "
          f"learning rates); vocabulary {spec['vocab']}, at most {steps} steps; {recipes}; {workers} worker(s) on "
          f"{device}, seed {args.seed}, {budget}")
    records = common.run_jobs(run_point, jobs, workers=workers, deadline=deadline, desc="MQAR runs",
                              progress=not args.no_progress)
    best = best_per_point(records)

    header = ["model", "layers"] + [f"d={w}, L={n}" for n in lengths for w in widths]
    rows = [[m, MODELS[m][1]] + [best[(m, w, n)]["accuracy"] for n in lengths for w in widths] for m in models]
    table = common.markdown_table(header, rows)
    lr_rows = [[m] + [f"{best[(m, w, n)]['lr']:.1e} ({best[(m, w, n)]['steps']})" for n in lengths for w in widths]
               for m in models]
    lr_table = common.markdown_table(["best lr (steps)"] + header[2:], lr_rows)
    timed_out = sum(r["out_of_time"] for r in records)
    notes = [
        f"{size} size, seed {args.seed}: vocabulary {spec['vocab']}, pairs per length "
        + ", ".join(f"L={n}: {pairs_for(n)}" for n in lengths)
        + f"; {recipes}; at most {steps} steps, stopping at held-out accuracy {spec['stop_at']}; "
          f"{spec['test_examples']} held-out examples; {budget}.",
        "Cells: held-out accuracy on the answers, best over learning rates (second table: which, and the steps it "
        f"took). {timed_out} of {len(records)} runs were ended by their share of the time budget; training time "
        f"summed over runs: {sum(r['seconds'] for r in records):.0f} s.",
    ]
    common.write_results(args.out_dir, "mqar", title=f"MQAR ({size})", command=common.command_line(argv),
                         device=device, notes=notes, table=table + "\n\n" + lr_table, records=records, plot=plot,
                         no_plot=args.no_plot)
    return {"records": records, "best": {f"{k[0]}|{k[1]}|{k[2]}": v["accuracy"] for k, v in best.items()}}


if __name__ == "__main__":
    main()
