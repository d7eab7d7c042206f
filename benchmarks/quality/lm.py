"""Language modelling on the quickstart corpus: attention, Mamba and a hybrid, dense and MoE, at equal size.

    PYTHONPATH=. python benchmarks/quality/lm.py [--device cuda] [--tiny] [--out-dir DIR]

Corpus and tokenizer as in `examples/quickstart.py` (its `read_corpus` and `Blocks`, imported): this Python's
standard-library sources, every 20th file held out, a digit-split byte-level BPE (`hybrid_lm.train_tokenizer`)
trained on the rest. Six models, all 8 layers of width 512 (full size):

    attention    8 attention layers (RoPE, 8 heads, 4 key/value heads)
    mamba        8 Mamba layers (d_state 16, expand 2)
    hybrid 1:3   Jamba's plan: attention at layers 2 and 6, Mamba elsewhere (no RoPE, as in Jamba)

each dense (a SwiGLU MLP in every layer) and MoE (8 experts, top-2, on every second layer, as in Jamba). Equal
parameter count: within the dense and within the MoE family, every model's MLP width is solved for so that its
total parameter count equals the hybrid's (MLP width 4 x 512 for the hybrid); Mamba layers cost more than
attention layers, so the attention model gets wider MLPs and the Mamba model narrower ones. Equal tokens: the
same seed, batches and number of steps for all six, AdamW 1e-3, warm-up then cosine decay, bf16 autocast on CUDA.
Full size, the whole run (corpus, tokenizer, six models) fits `--time-budget` (default 150 s): after the setup
(about 20 s) a few steps of each model are timed and all six get the most steps of 32 x 512 tokens (at most 1200)
that fit, keeping 5% of the time for the evaluations; on one H200 that should be 200-400 steps (3-6.5M tokens per
model, up to 1.2 passes over the 5.3M training tokens of the 20 MB corpus). The table gives the steps taken.

Reported: held-out perplexity (mean loss over up to 200 held-out blocks), training tokens/s (forward, backward and
optimizer step; evaluation excluded) and the loss curves in one figure. The claim (Jamba, Lieber et al. 2024,
section 6; Waleffe et al. 2024, "An Empirical Study of Mamba-based Language Models"): at equal size and tokens the
hybrid matches or beats both pure models, and MoE lowers the loss at the same active compute.

--tiny: 0.3 MB of corpus, vocabulary 600, 4 layers of width 64, 40 steps of 8 x 64 tokens: about 35 s on a 2-core
CPU (a smoke run: 20k tokens per model say nothing about the claim).
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.ROOT / "examples"))
from quickstart import Blocks, read_corpus  # noqa: E402

from hybrid_lm import train_tokenizer  # noqa: E402

TIME_BUDGET = 150  # seconds, full size
EVAL_RESERVE = 0.05  # of the time left after setup, kept for the held-out evaluations
MODELS = ["attention", "mamba", "1:3"]
LABELS = {"attention": "attention", "mamba": "mamba", "1:3": "hybrid 1:3"}
SIZES = {
    "full": dict(corpus_mb=20.0, vocab=8192, layers=8, width=512, heads=8, kv_heads=4, steps=1200, batch=32,
                 seq_len=512, lr=1e-3, eval_blocks=200),
    "tiny": dict(corpus_mb=0.3, vocab=600, layers=4, width=64, heads=4, kv_heads=2, steps=40, batch=8, seq_len=64,
                 lr=3e-3, eval_blocks=16),
}


def matched_intermediate(build, target: int) -> int:
    """The MLP width, a multiple of 8, at which build(intermediate).total parameters is nearest to target
    (parameters are affine in it). Multiples of 8 keep expert rows 16-byte aligned, which `torch._grouped_mm`
    needs in the backward pass too (an MoE with MLP width 2147 failed there), and suit the tensor cores."""
    low, high = 64, 128
    p_low, p_high = (common.parameter_counts(build(i))[0] for i in (low, high))
    slope = (p_high - p_low) / (high - low)
    return max(8, 8 * round((low + (target - p_low) / slope) / 8))


def main(argv=None) -> dict:
    p = common.parser(__doc__, TIME_BUDGET)
    p.add_argument("--steps", type=int, help="most training steps per model (default: 1200, tiny: 40)")
    p.add_argument("--corpus", type=Path, help="a text file or folder instead of the standard library")
    args = p.parse_args(argv)
    if args.plot_only:
        return {"figure": common.plot_only(args.plot_only, "lm", plot)}
    deadline = common.deadline_of(args)
    size = "tiny" if args.tiny else "full"
    spec = dict(SIZES[size])
    spec["steps"] = args.steps or spec["steps"]
    device = common.resolve_device(args.device)

    # 1. corpus and tokenizer, as in the quickstart
    documents = read_corpus(args.corpus, int(spec["corpus_mb"] * 1e6))
    train_docs = [d for i, d in enumerate(documents) if i % 20]
    held_out = [d for i, d in enumerate(documents) if i % 20 == 0]
    tokenizer = train_tokenizer(iter(train_docs), vocab_size=spec["vocab"], model_max_length=spec["seq_len"],
                                show_progress=False)
    train_set, eval_set = Blocks(train_docs, tokenizer, spec["seq_len"]), Blocks(held_out, tokenizer, spec["seq_len"])
    eval_blocks = eval_set.blocks[: spec["eval_blocks"]]
    print(f"corpus: {len(documents)} documents ({sum(map(len, documents)) / 1e6:.1f} MB), {train_set.blocks.numel():,} "
          f"training tokens, {eval_blocks.numel():,} held-out tokens; tokenizer {len(tokenizer)} tokens")

    # 2. the six models, parameter counts matched to the hybrid within dense / MoE
    def build(plan, experts, intermediate, dev=torch.device("cpu")):
        return common.build_model(plan, num_layers=spec["layers"], hidden_size=spec["width"], vocab_size=len(tokenizer),
                                  device=dev, seed=args.seed, intermediate_size=intermediate, num_experts=experts,
                                  num_heads=spec["heads"], num_kv_heads=spec["kv_heads"], max_length=spec["seq_len"])

    runs = []
    for experts in (1, 8):
        target = common.parameter_counts(build("1:3", experts, 4 * spec["width"]))[0]
        for plan in MODELS:
            intermediate = 4 * spec["width"] if plan == "1:3" else matched_intermediate(
                lambda i, plan=plan, experts=experts: build(plan, experts, i), target)
            runs.append((plan, experts, intermediate))

    # 3. the same steps and batches for all six: with a budget, as many steps as fit (a few steps of each timed)
    models = [build(plan, experts, intermediate, device) for plan, experts, intermediate in runs]
    steps = spec["steps"]
    if deadline is not None:
        def random_blocks(step):
            blocks = train_set.blocks[torch.randint(len(train_set), (spec["batch"],))].to(device)
            return {"input_ids": blocks, "labels": blocks}

        timings = [common.seconds_per_step(model, random_blocks, device=device) for model in models]
        steps = common.fit_steps(steps, timings, deadline, reserve=EVAL_RESERVE)
        print(f"{', '.join(f'{t * 1e3:.0f}' for t in timings)} ms/step: {steps} steps per model fit the budget")
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randint(len(train_set), (steps, spec["batch"]), generator=generator)
    records = []
    for i, ((plan, experts, intermediate), model) in enumerate(zip(runs, models)):
        name = f"{LABELS[plan]} {'MoE' if experts > 1 else 'dense'}"
        total, active = common.parameter_counts(model)

        def next_batch(step):
            blocks = train_set.blocks[order[step]].to(device)
            return {"input_ids": blocks, "labels": blocks}

        def evaluate(model=model):  # bound now: the loop rebinds `model`
            losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.float().item()
                      for b in eval_blocks.split(spec["batch"])]
            return {"loss": sum(losses) / len(losses)}

        result = common.train(model, next_batch, steps=steps, lr=spec["lr"], device=device, evaluate=evaluate,
                              deadline=deadline, desc=name,
                              progress=not args.no_progress)
        loss = result.evals[-1][1]["loss"]
        records.append(dict(model=name, plan=model.config.layers_block_type, experts=experts,
                            intermediate_size=intermediate, parameters=total, active=active, held_out_loss=loss,
                            perplexity=math.exp(loss), tokens_per_s=result.tokens_per_s, tokens=result.tokens,
                            losses=result.losses, steps=result.steps, out_of_time=result.out_of_time,
                            seconds=result.seconds, diverged=result.diverged, seed=args.seed))
        print(f"{name}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active), held-out perplexity "
              f"{math.exp(loss):.2f}, {result.tokens_per_s:,.0f} tokens/s")
        models[i] = None  # its memory back before the next one trains

    header = ["model", "MLP width", "parameters (M)", "active (M)", "steps", "held-out perplexity", "train tokens/s"]
    rows = [[r["model"], r["intermediate_size"], r["parameters"] / 1e6, r["active"] / 1e6, r["steps"], r["perplexity"],
             r["tokens_per_s"]] for r in records]
    table = common.markdown_table(header, rows)
    notes = [
        f"{size} size, seed {args.seed}: {spec['layers']} layers, width {spec['width']}, vocabulary {len(tokenizer)}; "
        f"{steps} steps{'' if deadline is None else ' (as many as fit the time budget)'} of {spec['batch']} x {spec['seq_len']} tokens ({records[0]['tokens']:,} tokens "
        f"per model, the same batches for all), lr {spec['lr']}; corpus {spec['corpus_mb']} MB of "
        f"{'the standard library' if args.corpus is None else args.corpus}; held-out perplexity over "
        f"{eval_blocks.numel():,} tokens.",
        "MoE: 8 experts, top-2, on every second layer. Parameters count embeddings (tied) and all experts; "
        "active counts 2 of the 8 experts.",
    ]
    common.write_results(args.out_dir, "lm", title=f"Language modelling on the quickstart corpus ({size})",
                         command=common.command_line(argv), device=device, notes=notes, table=table, records=records,
                         plot=plot, no_plot=args.no_plot)
    return {"records": records}


def plot(records: list[dict], plt):
    """Training loss against tokens seen, one line per model (MoE dashed)."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in records:
        tokens_per_step = r["tokens"] / r["steps"]
        x = [(i + 1) * tokens_per_step / 1e6 for i in range(len(r["losses"]))]
        ax.plot(x, common.smooth(r["losses"], max(1, len(r["losses"]) // 50)), label=r["model"],
                linestyle="--" if r["experts"] > 1 else "-")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    main()
