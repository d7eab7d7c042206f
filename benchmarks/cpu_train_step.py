"""One CPU training step (forward + backward) of hybrid_lm and of transformers' JambaForCausalLM.

Same config, same weights, same batch; prints tokens/s of each and the ratio.

    python benchmarks/cpu_train_step.py [--batch 4] [--length 512] [--repeats 3]

transformers' Jamba runs its pure-PyTorch fallback here (no mamba-ssm on a CPU): its step takes
minutes, so it is timed once; hybrid_lm is timed `--repeats` times after a warm-up and the median kept.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import JambaConfig, JambaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "conversion"))

from sources import JAMBA_KEYS, jamba_config  # noqa: E402

from hybrid_lm import HybridLMForCausalLM  # noqa: E402

CONFIG = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4, attn_layer_period=4,
    attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
    num_attention_heads=8, num_key_value_heads=2, output_router_logits=True,
)


def train_step_seconds(model, input_ids) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = JambaForCausalLM(JambaConfig(**CONFIG)).train()
    model = HybridLMForCausalLM(jamba_config(reference.config.to_dict(), weights=None)).train()
    state = dict(kv for key, value in reference.state_dict().items() for kv in JAMBA_KEYS(key, value))
    model.load_state_dict(state)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.length))
    tokens = args.batch * args.length
    print(f"config: {CONFIG}\nbatch {args.batch} x {args.length} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(model.config.layer_plan())

    train_step_seconds(model, input_ids)  # warm-up
    ours = statistics.median(train_step_seconds(model, input_ids) for _ in range(args.repeats))
    print(f"hybrid_lm          : {ours:8.3f} s/step  {tokens / ours:10.1f} tokens/s")
    theirs = train_step_seconds(reference, input_ids)
    print(f"transformers Jamba : {theirs:8.3f} s/step  {tokens / theirs:10.1f} tokens/s")
    print(f"speed-up           : {theirs / ours:8.1f}x")


if __name__ == "__main__":
    main()
