"""The host time `generate` spends outside the decoder stack: transformers' preparation (generation config, model
kwargs validation, masks, the cache) and its logits processing, with the decoder stack itself timed apart and left
out. That is what stands between time to first token and one prefill forward when the forward is host-bound, on
any device; it depends on the transformers release, so compare releases on one machine.

    python benchmarks/generate_host_time.py [--calls 40] [--device cpu]

A small random hybrid (8 layers, attention at layer 4, 8 experts top-2 every 2nd layer), a 64-token prompt,
`generate(max_new_tokens=1)` greedy with the default, dynamic and static caches. Prints the median and minimum
milliseconds per call outside the stack.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40, help="timed generate calls per cache (after 3 warm-ups)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = HybridLMConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, attn_layer_period=8,
        attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, num_experts=8, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=2, mamba_d_state=16,
    )
    model = HybridLMForCausalLM(config).to(args.device).eval()
    ids = torch.randint(3, config.vocab_size, (1, 64), device=args.device)
    synchronize = torch.cuda.synchronize if ids.is_cuda else (lambda: None)

    in_stack = [0.0]
    stack_forward = model.model.forward

    def timed_stack(*call_args, **kwargs):
        synchronize()
        start = time.perf_counter()
        out = stack_forward(*call_args, **kwargs)
        synchronize()
        in_stack[0] += time.perf_counter() - start
        return out

    model.model.forward = timed_stack
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {args.device}")
    for cache in (None, "dynamic", "static"):
        outside = []
        for call in range(args.calls + 3):
            in_stack[0] = 0.0
            synchronize()
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0,
                           cache_implementation=cache)
            synchronize()
            if call >= 3:
                outside.append((time.perf_counter() - start - in_stack[0]) * 1e3)
        print(f"cache_implementation={cache!s:>8}: outside the decoder stack {statistics.median(outside):.2f} ms "
              f"median, {min(outside):.2f} ms min per generate(max_new_tokens=1)", flush=True)


if __name__ == "__main__":
    main()
