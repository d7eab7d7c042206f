"""Time to first token against one prefill forward, on a GPU: issue 11's target (within 5% of the forward at an
8192-token prompt), and where generate's extra time goes.

    python benchmarks/time_to_first_token.py [--prompt 8192] [--config bench|dense] [--runs 12]

The bench config in bf16 at batch 1. Alternating runs of `model(ids, logits_to_keep=1)` and
`generate(max_new_tokens=1)` (greedy; the default cache, which is the static cache the model keeps, and the dynamic
one), after warm-ups that include the first call's graph capture (20-35 s on an H100). Prints medians and minima,
each as a multiple of the forward's median, then the forward's and generate's times split three ways: host time
before the decoder stack is entered (for generate, transformers' preparation), the stack's own host time (about
the stack's wall time where the GPU keeps up with the host), and the time from its return to the end (the rest of
the GPU work, the lm_head, and for generate the logits processing). Also the forward with an all-ones
attention mask, as generate passes one.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_lm import HybridLMConfig, HybridLMForCausalLM  # noqa: E402
from generate import CONFIGS, timed  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--config", choices=CONFIGS, default="bench")
    parser.add_argument("--runs", type=int, default=12)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    model = HybridLMForCausalLM(HybridLMConfig(**CONFIGS[args.config])).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), device="cuda")
    ones = torch.ones_like(ids)

    def forward(attention_mask=None):
        with torch.no_grad():
            model(ids, attention_mask=attention_mask, logits_to_keep=1)

    def generate(cache_implementation):
        return lambda: model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0,
                                      cache_implementation=cache_implementation)

    runs = {"forward": forward, "forward, all-ones mask": lambda: forward(ones),
            "generate, default cache": generate(None), "generate, dynamic cache": generate("dynamic")}
    for run in runs.values():
        for _ in range(3):
            run()
    times = {name: [] for name in runs}
    for _ in range(args.runs):
        for name, run in runs.items():
            times[name].append(timed(run) * 1e3)
    base = statistics.median(times["forward"])
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}; "
          f"{args.config} config, prompt {args.prompt}, batch 1, bf16, {args.runs} alternating runs")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:26s} median {median:7.2f} ms  min {min(values):7.2f} ms  ({median / base:.3f}x the forward)")

    # the splits: the stack records when it is entered and when it returns (host clocks, no sync inside)
    marks = {}
    stack = model.model.forward

    def marked(*call_args, **kwargs):
        marks["enter"] = time.perf_counter()
        out = stack(*call_args, **kwargs)
        marks["leave"] = time.perf_counter()
        return out

    model.model.forward = marked
    for name, run in (("forward", forward), ("generate, default cache", generate(None))):
        split = {"before the stack (host)": [], "the stack (host)": [], "stack return to the end": []}
        for _ in range(args.runs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            end = time.perf_counter()
            split["before the stack (host)"].append((marks["enter"] - start) * 1e3)
            split["the stack (host)"].append((marks["leave"] - marks["enter"]) * 1e3)
            split["stack return to the end"].append((end - marks["leave"]) * 1e3)
        print(f"  {name}, split:")
        for part, values in split.items():
            print(f"    {part:26s} median {statistics.median(values):7.2f} ms")
    del model.model.forward  # the class's forward again


if __name__ == "__main__":
    main()
