"""Measured peak GPU memory of load + prefill against `hybrid-lm memory`'s estimate, per component.

    PYTHONPATH=. python benchmarks/memory.py [--config PATH] [--contexts 8192 131072 1048576] [--batch 1]
                                            [--weights bf16 nf4] [--prefill-chunk N]

For each weight format the model (random weights; the 426M bench config unless --config) is saved once in
bf16 and loaded with `from_pretrained` (nf4: bitsandbytes with `llm_int8_skip_modules` =
QUANTIZATION_SKIP_MODULES, needs `pip install bitsandbytes`). Then, per context, one prefill under
`torch.inference_mode()`: `model(input_ids, cache=DynamicCache(config=model.config), logits_to_keep=1)`,
in chunks of --prefill-chunk tokens when the context is longer. Measured, with torch's allocator:
    weights      memory_allocated() after loading
    cache        bytes of the cache's tensors after the prefill (KV + Mamba states)
    activations  max_memory_allocated() during the prefill - memory before it - cache
    total        max_memory_allocated() - the input ids
and the calculator's figures for the same settings, with measured / calculated. CUDA only.
"""

import argparse
import gc
import sys
import tempfile
import time

import torch
from transformers import DynamicCache

from hybrid_lm import HybridLMConfig, HybridLMForCausalLM
from hybrid_lm.memory_hybrid_lm import estimate_memory, load_source_config, quantization_skip_modules

BENCH_CONFIG = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, attn_layer_period=8, attn_layer_offset=4,
                    expert_layer_period=2, expert_layer_offset=1, num_experts=8, num_experts_per_tok=2,
                    intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4, mamba_d_state=16)
MiB = 2**20


def cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers Cache holds (key/value lists, conv / recurrent state dicts), each once."""
    seen, total = set(), 0

    def walk(value):
        nonlocal total
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif torch.is_tensor(value) and value.dim() > 0 and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()

    for layer in cache.layers:
        walk(list(vars(layer).values()))
    return total


def load(folder: str, weights: str) -> HybridLMForCausalLM:
    kwargs = dict(dtype=torch.bfloat16, device_map="cuda")
    if weights != "bf16":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=weights, bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=quantization_skip_modules(),
        ) if weights in ("nf4", "fp4") else BitsAndBytesConfig(load_in_8bit=True,
                                                                llm_int8_skip_modules=quantization_skip_modules())
    return HybridLMForCausalLM.from_pretrained(folder, **kwargs).eval()


@torch.inference_mode()
def prefill(model, context: int, batch: int, chunk: int | None) -> tuple[int, int, int, float]:
    """(bytes before the prefill, peak bytes during it, cache bytes after it, seconds)."""
    input_ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    cache = DynamicCache(config=model.config)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    step = chunk if chunk and chunk < context else context
    for begin in range(0, context, step):
        model(input_ids=input_ids[:, begin:begin + step], cache=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    held = cache_bytes(cache)
    return before - input_ids.numel() * 8, peak - input_ids.numel() * 8, held, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a hybrid_lm / Jamba / Mixtral / Llama / Mamba config.json or folder")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 131072, 1048576])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--weights", nargs="+", default=["bf16", "nf4"], choices=["bf16", "int8", "nf4", "fp4"])
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill longer contexts in chunks of N tokens")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/memory.py measures GPU memory: it needs CUDA", file=sys.stderr)
        return 2
    config = load_source_config(args.config) if args.config else HybridLMConfig(**BENCH_CONFIG)
    print(config.layer_plan().splitlines()[0])
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, batch {args.batch}, "
          f"prefill chunk {args.prefill_chunk}")
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        HybridLMForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        for weights in args.weights:
            if weights != "bf16":
                try:
                    import bitsandbytes  # noqa: F401
                except ImportError:
                    print(f"{weights}: skipped, bitsandbytes is not installed")
                    continue
            gc.collect()  # the previous model's reference cycles, before its memory is counted as free
            torch.cuda.empty_cache()
            free = torch.cuda.memory_allocated()
            model = load(folder, weights)
            loaded = torch.cuda.memory_allocated() - free
            # compile the kernels (Triton) outside the measurement
            prefill(model, 512, args.batch, None)
            for context in args.contexts:
                chunk = args.prefill_chunk if args.prefill_chunk and args.prefill_chunk < context else None
                try:
                    before, peak, held, seconds = prefill(model, context, args.batch, chunk)
                except torch.OutOfMemoryError:
                    print(f"{weights} context {context}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                est = estimate_memory(config, context, args.batch, weights, prefill_chunk=chunk)
                rows = [
                    ("weights", loaded, est.weights_bytes),
                    ("KV + Mamba states", held, est.kv_cache_bytes + est.mamba_state_bytes),
                    ("activations", peak - before - held, est.activation_bytes),
                    ("total (peak)", peak - free, est.total_bytes),
                ]
                print(f"\n{weights} weights, context {context:,} ({seconds:.1f} s)")
                print(f"  {'':<18} {'measured MiB':>13} {'calculated MiB':>15} {'ratio':>7}")
                for name, measured, calculated in rows:
                    print(f"  {name:<18} {measured / MiB:13.1f} {calculated / MiB:15.1f} "
                          f"{measured / max(calculated, 1):7.3f}")
                torch.cuda.empty_cache()
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
