"""Greedy generation speed on a GPU, side by side in one run: hybrid_lm (dynamic cache, eager; the default path: a
static cache the model keeps and hybrid_lm's loop replaying one CUDA graph a step; optionally `hf_loop`, the same
cache under transformers' own loop over its compiled step), transformers' JambaForCausalLM on the same weights
(with the mamba-ssm / causal-conv1d kernels when they import), and mamba-ssm's `MambaLMHeadModel.generate(cg=True)`
on a dense hybrid beside hybrid_lm's same dense model (`num_experts=1`).

    python benchmarks/generate.py [--engines ...] [--batch 1 16] [--prompt 128] [--new 256] [--config bench|dense]
                                  [--profile]

Per engine, batch and prompt length: time to first token (a generate of one new token; for hybrid_lm also as a
multiple of one prefill forward), ms per decode step ((time for `--new` tokens - time to first token) / (new - 1)),
tokens/s (batch x new / total time), peak memory, the time of the first call (compilation and graph capture
included), and the bandwidth floor of a decode step (the bytes of the weights one token reads / the copy bandwidth
measured here). The greedy tokens of every hybrid_lm path are compared with the eager dynamic path.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_lm import HybridLMConfig, HybridLMForCausalLM  # noqa: E402
from hybrid_lm.hub_hybrid_lm import parameter_counts  # noqa: E402
from anchors import jamba_model, mamba_ssm_model  # noqa: E402

CONFIGS = {
    # the 426M bench config of the issues: a:m 1:7, MoE every 2nd layer
    "bench": dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, attn_layer_period=8,
        attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, num_experts=8, num_experts_per_tok=2,
        num_attention_heads=16, num_key_value_heads=4, mamba_d_state=16,
    ),
    # mamba-ssm's dense hybrid: the same stack with one MLP per layer, and its Mamba1 mixer, which has no dt / B / C
    # norms (Jamba's `mamba_inner_layernorms`)
    "dense": dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, attn_layer_period=8,
        attn_layer_offset=4, num_experts=1, num_experts_per_tok=1, num_attention_heads=16, num_key_value_heads=4,
        mamba_d_state=16, mamba_inner_layernorms=False,
    ),
}


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = min(timed(lambda: y.copy_(x)) for _ in range(5))
    return 2 * x.numel() * 4 / seconds


def measure(name, generate, batch, prompt_len, new, reference=None, prefill=None):
    """generate(input_ids, max_new_tokens) -> (B, prompt + new) ids; prefill(input_ids) runs one forward of the
    prompt (the floor of the time to the first token)."""
    torch.manual_seed(0)
    ids = torch.randint(3, 32000, (batch, prompt_len), device="cuda")
    warm_up = timed(lambda: generate(ids, new))  # kernels, compilation and graph capture
    generate(ids, 1)
    torch.cuda.reset_peak_memory_stats()
    first = min(timed(lambda: generate(ids, 1)) for _ in range(2))
    out = None

    def run():
        nonlocal out
        out = generate(ids, new)

    total = min(timed(run) for _ in range(2))
    step = (total - first) / (new - 1)
    peak = torch.cuda.max_memory_allocated() / 2**30
    ttft = f"TTFT {first * 1e3:8.1f} ms"
    if prefill is not None:
        ttft += f" ({first / min(timed(lambda: prefill(ids)) for _ in range(2)):.2f}x prefill)"
    same = "" if reference is None else ("  same tokens" if torch.equal(out, reference) else
                                         f"  {(out != reference).sum().item()} tokens differ")
    print(f"{name:>28} bs {batch:>3} prompt {prompt_len:>5}: {ttft}  {step * 1e3:7.2f} ms/step  "
          f"{batch * new / total:9.0f} tok/s  peak {peak:5.1f} GiB  first call {warm_up:5.1f} s{same}", flush=True)
    return out


def hybrid_generate(model, cache_implementation=None):
    """Greedy generate; `cache_implementation=None` is the default path (on CUDA: a static cache the model keeps and
    hybrid_lm's graph loop, whose CUDA graph is recorded on the first call of a batch size)."""
    def generate(ids, new):
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0, cache_implementation=cache_implementation)
    return generate


def hybrid_generate_transformers_loop(model):
    """The default path with transformers' own decoding loop over its compiled step (CUDA-graph trees) instead of
    hybrid_lm's graph loop: the A/B for decoding_hybrid_lm.py."""
    from hybrid_lm import generation_hybrid_lm

    generate = hybrid_generate(model)

    def with_transformers_loop(ids, new):
        chooser = generation_hybrid_lm._why_not_graph_loop
        generation_hybrid_lm._why_not_graph_loop = lambda *args: "the benchmark asks for transformers' loop"
        try:
            return generate(ids, new)
        finally:
            generation_hybrid_lm._why_not_graph_loop = chooser
    return with_transformers_loop


def prefill_forward(model):
    def prefill(ids):
        with torch.no_grad():
            return model(ids, logits_to_keep=1)
    return prefill


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="bench")
    parser.add_argument("--engines", nargs="+", default=["eager", "graphs", "jamba", "mamba_ssm"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, nargs="+", default=[128])
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--profile", action="store_true",
                        help="first, the GPU kernels of each engine's decode step at the first batch size and prompt")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    torch.manual_seed(0)
    model = HybridLMForCausalLM(HybridLMConfig(**CONFIGS[args.config])).to("cuda", torch.bfloat16).eval()
    total, active = parameter_counts(model)
    floor = 2 * active / copy_bandwidth()  # bf16 weights a token reads, at the copy bandwidth
    print(model.config.layer_plan().splitlines()[0])
    print(f"{total / 1e6:.0f}M parameters, {active / 1e6:.0f}M active per token; {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; decode floor (active bf16 weights / copy bandwidth) {floor * 1e3:.3f} ms/step")
    engines = {
        "eager": lambda: ("hybrid_lm dynamic (eager)", hybrid_generate(model, "dynamic"), prefill_forward(model)),
        "graphs": lambda: ("hybrid_lm default (graphs)", hybrid_generate(model), prefill_forward(model)),
        "hf_loop": lambda: ("hybrid_lm static, hf loop", hybrid_generate_transformers_loop(model),
                            prefill_forward(model)),
        "jamba": lambda: ("transformers Jamba", hybrid_generate(jamba_model(model).eval()), None),
        "mamba_ssm": lambda: ("mamba-ssm cg=True (dense)", mamba_ssm_generate(model.config), None),
    }
    if args.profile:
        for engine in args.engines:
            name, generate, _ = engines[engine]()
            profile_decode(name, generate, args.batch[0], args.prompt[0])
            torch.cuda.empty_cache()
    for prompt_len in args.prompt:
        for batch in args.batch:
            reference = None
            for engine in args.engines:
                try:
                    name, generate, prefill = engines[engine]()
                    out = measure(name, generate, batch, prompt_len, args.new,
                                  reference if engine in ("graphs", "hf_loop") else None, prefill)
                    if engine == "eager":
                        reference = out
                except Exception as error:  # report the engine that could not run, and go on with the others
                    print(f"{engine:>28} bs {batch:>3} prompt {prompt_len:>5}: failed: {type(error).__name__}: "
                          f"{str(error)[:300]}", flush=True)
                torch.cuda.empty_cache()


def profile_decode(name, generate, batch, prompt_len, new=64):
    """GPU kernels per decode step of one engine (torch.profiler over a generate of `new` tokens after a warm-up,
    less one of a single token, so the prefill drops out), the busiest first."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, 32000, (batch, prompt_len), device="cuda")

    def kernels(tokens):  # {kernel: (calls, GPU us)}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            generate(ids, tokens)
            torch.cuda.synchronize()
        return {e.key: (e.count, e.self_device_time_total) for e in prof.key_averages()
                if e.device_type == torch.autograd.DeviceType.CUDA}

    generate(ids, new)
    steps, first = kernels(new + 1), kernels(1)
    per_step = {key: ((calls - first.get(key, (0, 0))[0]) / new, (us - first.get(key, (0, 0))[1]) / new)
                for key, (calls, us) in steps.items()}
    print(f"{name}, bs {batch}: GPU busy {sum(us for _, us in per_step.values()) / 1e3:.3f} ms per decode step")
    for key, (calls, us) in sorted(per_step.items(), key=lambda item: -item[1][1])[:25]:
        if calls > 0:
            print(f"  {calls:5.1f} calls {us / calls:7.2f} us  {key[:100]}")


def mamba_ssm_generate(config):
    model = mamba_ssm_model(config)

    def generate(ids, new):
        return model.generate(ids, max_length=ids.shape[1] + new, cg=True, top_k=1, eos_token_id=None)
    return generate


if __name__ == "__main__":
    main()
