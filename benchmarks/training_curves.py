"""The quickstart's training curve as shipped against the same run on the reference ops, side by side in one process.

    python benchmarks/training_curves.py [--max-steps 300] [--output-dir DIR]

Runs `examples/quickstart.py` (its default model and corpus, seed 0) twice: as shipped (on a GPU: the Triton
kernels, the fused loss, the grouped experts, the fused norms; on a CPU: the torch tier with the fused loss and the
grouped experts), and on the references (`kernel_backend="torch"`, which also takes the norms' eager formula,
`fused_loss=False`, and the experts one `mm` per expert through the "loop" backend). Prints the training loss at
each of Trainer's logging steps for both runs, the held-out loss after training, and the largest relative
difference. What the two runs should share is the function each op computes, not its rounding: in bf16 on a GPU
the curves drift apart by rounding, so a difference is judged against the spread between seeds (`--seeds 0 1`
adds the shipped run at each further seed).
"""

import argparse
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import quickstart  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import hybrid_lm  # noqa: E402
from hybrid_lm import experts_ops  # noqa: E402


def run(name: str, argv: list[str], references: bool) -> dict:
    """One quickstart run; returns {"name", "losses": {step: loss}, "held_out": loss}."""
    history = []

    class RecordingTrainer(transformers.Trainer):
        """Trainer that hands its log history to this run."""

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            history.extend(self.state.log_history)
            return result

    patches = [mock.patch.object(quickstart, "Trainer", RecordingTrainer)]
    if references:
        config_class = hybrid_lm.HybridLMConfig

        def reference_config(**kwargs):
            return config_class(**kwargs, kernel_backend="torch", fused_loss=False)

        rule = experts_ops.grouped_mm_backend

        def one_mm_per_expert(x, w):
            # a compiled or CUDA-graph-captured step (the quickstart's sample generation on a GPU) cannot read the
            # group sizes on the host, which the loop does: there the shipped rule chooses
            captured = torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())
            return rule(x, w) if captured else "loop"

        patches += [mock.patch.object(quickstart.hybrid_lm, "HybridLMConfig", reference_config),
                    mock.patch.object(experts_ops, "grouped_mm_backend", one_mm_per_expert)]
    print(f"==== {name}", flush=True)
    for patch in patches:
        patch.start()
    try:
        result = quickstart.main(argv)
    finally:
        for patch in reversed(patches):
            patch.stop()
    losses = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    return {"name": name, "losses": losses, "held_out": result["loss_after"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--output-dir", type=Path, default=Path("output/training_curves"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the first seed runs both; others shipped only")
    args = parser.parse_args()

    def argv(tag: str, seed: int) -> list[str]:
        return ["--max-steps", str(args.max_steps), "--output-dir", str(args.output_dir / tag), "--seed", str(seed),
                "--max-new-tokens", "1"]

    first, *others = args.seeds
    runs = [run(f"shipped, seed {first}", argv("shipped", first), references=False),
            run(f"references, seed {first}", argv("references", first), references=True)]
    runs += [run(f"shipped, seed {seed}", argv(f"shipped-{seed}", seed), references=False) for seed in others]

    steps = sorted(runs[0]["losses"])
    print("\n| run | " + " | ".join(str(step) for step in steps) + " | held-out loss |")
    print("| --- |" + " --- |" * (len(steps) + 1))
    for result in runs:
        row = " | ".join(f"{result['losses'].get(step, float('nan')):.4f}" for step in steps)
        print(f"| {result['name']} | {row} | {result['held_out']:.4f} |")
    shipped, reference = runs[0], runs[1]
    worst = max(abs(shipped["losses"][s] - reference["losses"][s]) / reference["losses"][s] for s in steps)
    print(f"\nlargest relative difference, shipped vs references at a logged step: {worst:.2%}; held-out: "
          f"{abs(shipped['held_out'] - reference['held_out']) / reference['held_out']:.2%}")
    for result in runs[2:]:
        spread = max(abs(result["losses"][s] - shipped["losses"][s]) / shipped["losses"][s] for s in steps)
        print(f"seed spread ({result['name']} vs {shipped['name']}): {spread:.2%}; held-out "
              f"{abs(result['held_out'] - shipped['held_out']) / shipped['held_out']:.2%}")


if __name__ == "__main__":
    main()
