"""Mixture-of-experts block, forward + backward: the per-expert module loop and the all-experts dense path (what
the block ran before, in eager and compiled mode) against the grouped products, eager and compiled.

    python benchmarks/experts.py                 # CPU: a small size, float32
    python benchmarks/experts.py --device cuda   # GPU: the bench size (H 1024, I 2816, 8 experts top-2, 4096 tokens), bf16
    python benchmarks/experts.py --profile       # also the torch.profiler table of each eager path

Prints the median milliseconds per forward + backward, the ratio to the eager module loop, the peak memory on CUDA,
and which grouped product backend ran.
"""

import argparse
import statistics
import time

import torch

from hybrid_lm import HybridLMConfig
from hybrid_lm.experts_ops import grouped_mm_backend
from hybrid_lm.feed_forward_hybrid_lm import HybridLMSparseMoeBlock

SIZES = {  # hidden, intermediate, experts, top-k, tokens
    "bench": (1024, 2816, 8, 2, 4096),
    "small": (256, 704, 8, 2, 512),
}


def path_fn(block, path):
    """(T, H) -> (T, H) through one of the block's paths, the router included."""
    method = {"module loop": block._module_loop_forward, "dense": block._dense_forward,
              "grouped": block._grouped_forward}[path]

    def run(tokens):
        _, weights, index = block.router(tokens)
        return method(tokens, weights, index)
    return run


def time_ms(fn, tokens, grad, device, warmup, iters):
    def step():
        tokens.grad = None
        fn(tokens).backward(grad)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: bench on CUDA, small on CPU")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = args.device
    size = args.size or ("bench" if device == "cuda" else "small")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    iters = args.iters or (20 if device == "cuda" else 5)
    hidden, intermediate, experts, top_k, num_tokens = SIZES[size]

    config = HybridLMConfig(hidden_size=hidden, intermediate_size=intermediate, num_experts=experts,
                            num_experts_per_tok=top_k, num_hidden_layers=2, vocab_size=256)
    torch.manual_seed(0)
    block = HybridLMSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.02)
    block = block.to(device, dtype)
    tokens = torch.randn(num_tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(tokens)
    weight = torch.empty(experts, hidden, 2 * intermediate, device=device, dtype=dtype)
    print(f"torch {torch.__version__}, {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), "
          f"{dtype}, H={hidden} I={intermediate} E={experts} K={top_k} T={num_tokens}; "
          f"grouped product backend, eager: {grouped_mm_backend(tokens, weight)}")

    paths = [("module loop", "eager"), ("grouped", "eager")]
    if not args.no_compile:
        paths += [("dense", "compiled"), ("grouped", "compiled")]
    results = {}
    for path, mode in paths:
        fn = path_fn(block, path)
        if mode == "compiled":
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = time_ms(fn, tokens, grad, device, warmup=3, iters=iters)
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device == "cuda" else ""
        results[path, mode] = ms
        print(f"{path + ', ' + mode:<22} {ms:9.2f} ms   x{results['module loop', 'eager'] / ms:5.2f} vs module loop{peak}")
        if args.profile and mode == "eager":
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
            with torch.profiler.profile(activities=activities) as prof:
                tokens.grad = None
                fn(tokens).backward(grad)
            sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=12))


if __name__ == "__main__":
    main()
