"""One bf16 training step (forward + backward + fused AdamW) on a GPU, side by side in one run: transformers'
JambaForCausalLM with the mamba-ssm / causal-conv1d kernels, and hybrid_lm per kernel tier, eager and compiled, on
the same config, weights and batch.

    python benchmarks/gpu_train_step.py [--config bench|1.3b] [--engines jamba triton cuda triton+compile ...]
                                        [--batch 4] [--length 2048] [--repeats 5] [--profile]

Engines: `jamba` (transformers' model, its mamba-ssm path when the kernels import), `torch` / `triton` / `cuda`
(hybrid_lm's `kernel_backend`), each with `+compile` for `torch.compile(model)` or `+cudagraphs` for
`torch.compile(model, mode="reduce-overhead")` (the compiled forward and backward replayed from CUDA graphs, which
takes the host's launch overhead out of the step; the optimizer step stays outside). Per engine: ms per step, tokens/s,
peak memory, MFU (model FLOPs per step / step time / the bf16 peak of the GPU) and the ratio to the first engine;
`--profile` adds, per engine, the GPU kernels that took most of one step (torch.profiler).

Model FLOPs (PaLM's convention, counted from the config, the same for every engine): 6 x the active parameters a
token goes through (embedding lookup excluded, lm_head included) per token, plus 6 x 2 x the causal attention
score/value products (half of the L x L square), plus the selective scan (fwd about 9 FLOPs per channel and state,
backward twice that).
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
from anchors import jamba_model  # noqa: E402

SHAPE = dict(attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, num_experts=8,
             num_experts_per_tok=2, num_attention_heads=16, num_key_value_heads=4, mamba_d_state=16, vocab_size=32000)
CONFIGS = {
    # the issues' 426M bench config (219M active per token)
    "bench": dict(SHAPE, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8),
    # ~1.2B (about 0.5B active), trained at 8192 tokens a row
    "1.3b": dict(SHAPE, hidden_size=2048, intermediate_size=4096, num_hidden_layers=8),
}
BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core FLOP/s, datasheet


def model_flops(model, tokens_per_row: int, rows: int) -> float:
    """Training FLOPs of one step (forward + backward), from the config."""
    config = model.config
    _, active = parameter_counts(model)
    active -= model.model.embed_tokens.weight.numel()
    if config.tie_word_embeddings:
        active += model.lm_head.weight.numel()  # the tied head still multiplies
    tokens = rows * tokens_per_row
    attention_layers = sum(kind == "attention" for kind in config.layers_block_type)
    head_dim = config.hidden_size // config.num_attention_heads
    attention = 6 * 2 * attention_layers * config.num_attention_heads * head_dim * tokens_per_row * tokens / 2
    d_inner = config.mamba_expand * config.hidden_size
    scan = 3 * 9 * (config.num_hidden_layers - attention_layers) * d_inner * config.mamba_d_state * tokens
    return 6 * active * tokens + attention + scan


def step_seconds(model, optimizer, input_ids) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA-graph trees (nothing for other engines)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def profile_step(model, optimizer, input_ids, rows: int = 12) -> str:
    """The `rows` kernels with the most GPU time in one step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_seconds(model, optimizer, input_ids)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60)


def build(engine: str, config: dict, state: dict):
    backend, _, compiled = engine.partition("+")
    if compiled not in ("", "compile", "cudagraphs"):
        raise ValueError(f"unknown engine {engine!r}: a backend, optionally with +compile or +cudagraphs")
    model = HybridLMForCausalLM(HybridLMConfig(**config, kernel_backend="triton" if backend == "jamba" else backend))
    model.load_state_dict(state)
    model = model.to("cuda", torch.bfloat16)
    if backend == "jamba":
        model = jamba_model(model)
    model.train()
    if compiled == "cudagraphs":
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model) if compiled else model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="bench")
    parser.add_argument("--engines", nargs="+", default=["jamba", "triton", "cuda", "triton+compile"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print each engine's top GPU kernels of one step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    torch.manual_seed(0)
    config = CONFIGS[args.config]
    reference = HybridLMForCausalLM(HybridLMConfig(**config))
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    total, active = parameter_counts(reference)
    flops = model_flops(reference, args.length, args.batch)
    name = torch.cuda.get_device_name()
    peak_flops = next((rate for chip, rate in BF16_PEAK.items() if chip in name), None)
    print(reference.config.layer_plan().splitlines()[0])
    print(f"parameters: {total / 1e6:.0f}M total, {active / 1e6:.0f}M active per token; batch {args.batch} x "
          f"{args.length}; {flops / 1e12:.1f} TFLOP a step; {name}, torch {torch.__version__}")
    del reference
    input_ids = torch.randint(0, config["vocab_size"], (args.batch, args.length), device="cuda")
    tokens = args.batch * args.length
    first = None
    for engine in args.engines:
        try:
            model = build(engine, config, state)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            # the peak counts the warm-ups: CUDA-graph engines allocate their graphs' memory pools there
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                step_seconds(model, optimizer, input_ids)  # warm-up: kernel compilation, allocator
            seconds = statistics.median(step_seconds(model, optimizer, input_ids) for _ in range(args.repeats))
            table = profile_step(model, optimizer, input_ids) if args.profile else ""
        except Exception as error:  # report the engine that could not run, and go on with the others
            print(f"{engine:>15}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        finally:
            model = optimizer = None
        peak = torch.cuda.max_memory_allocated() / 2**30
        first = first or (engine, seconds)
        mfu = f"MFU {flops / seconds / peak_flops:5.1%}" if peak_flops else ""
        print(f"{engine:>15}: {seconds * 1000:8.1f} ms/step  {tokens / seconds:9.0f} tokens/s  peak {peak:5.1f} GiB  "
              f"{mfu}  ({first[1] / seconds:.2f}x the speed of {first[0]})", flush=True)
        if table:
            print(table, flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
