"""One bf16 training step (forward + backward + AdamW) of a Jamba-style hybrid on a GPU, per kernel backend.

    python benchmarks/gpu_train_step.py [--backends triton torch] [--batch 4] [--length 2048] [--repeats 5]

Same config, weights and batch for every backend; prints seconds per step, tokens/s, peak memory and
the ratio of each backend to the first one. The default config is a ~0.5B-parameter Jamba-style model
(hidden 1024, 8 layers, a:m 1:7, 8 experts top-2 every second layer).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_lm import HybridLMConfig, HybridLMForCausalLM  # noqa: E402
from hybrid_lm.hub_hybrid_lm import parameter_counts  # noqa: E402

CONFIG = dict(
    vocab_size=65536, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, attn_layer_period=8,
    attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, num_experts=8, num_experts_per_tok=2,
    num_attention_heads=16, num_key_value_heads=4, mamba_d_state=16,
)


def step_seconds(model, optimizer, input_ids) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["triton", "torch"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    torch.manual_seed(0)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.length), device="cuda")
    tokens = args.batch * args.length
    state = None
    results = []
    for backend in args.backends:
        model = HybridLMForCausalLM(HybridLMConfig(**CONFIG, kernel_backend=backend)).to("cuda", torch.bfloat16)
        if state is None:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            total, active = parameter_counts(model)
            print(model.config.layer_plan())
            print(f"parameters: {total / 1e6:.0f}M total, {active / 1e6:.0f}M active per token; "
                  f"batch {args.batch} x {args.length}; {torch.cuda.get_device_name()}, torch {torch.__version__}")
        model.load_state_dict(state)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        for _ in range(2):
            step_seconds(model, optimizer, input_ids)  # warm-up: kernel compilation, allocator
        torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(step_seconds(model, optimizer, input_ids) for _ in range(args.repeats))
        peak = torch.cuda.max_memory_allocated() / 2**30
        results.append((backend, seconds))
        ratio = seconds / results[0][1]
        print(f"{backend:>7}: {seconds * 1000:9.1f} ms/step  {tokens / seconds:10.0f} tokens/s  "
              f"peak {peak:5.1f} GiB  ({ratio:.2f}x the time of {results[0][0]})")
        del model, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
