"""Attention of one decode step on a GPU, side by side: hybrid_lm's split-K Triton kernels
(`triton_decode_attention.py`) and PyTorch's SDPA backends on the same bf16 inputs, the way a static cache hands them
over (keys allocated to the prompt + 256 and filled to the prompt, a boolean mask over the filled part).

    python benchmarks/decode_attention.py [--batch 1 16 64] [--keys 1024 8192 32768] [--heads 16 --kv-heads 4
                                           --head-dim 64] [--sweep]

Engines, each timed as its kernels' own GPU time (`timing.gpu_ms`, so host time and cuDNN's plan building do not
count):
- triton: `decode_attention_triton` with the default `DecodeTiles` (what the model runs); "triton, dot" with its
  products on `tl.dot`;
- sdpa efficient after repeat_kv: K and V copied once per query head, then the memory-efficient backend (what
  transformers' sdpa path runs for a masked one-query step under torch.compile; the model's path before the kernels);
- sdpa efficient / cudnn / math, enable_gqa: SDPA with grouped heads and one backend allowed ("not supported" where
  that backend refuses the call).
Every engine's output is checked against `decode_attention_ref`. `--sweep` also times the kernels over a grid of
`DecodeTiles` and prints the five fastest.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_lm.decode_attention_ops import decode_attention_ref  # noqa: E402
from hybrid_lm.triton_decode_attention import DecodeTiles, decode_attention_triton  # noqa: E402
from timing import gpu_ms  # noqa: E402


def inputs(batch, keys, heads, kv_heads, head_dim):
    generator = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    key = torch.randn(batch, kv_heads, keys + 256, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    value = torch.randn_like(key)
    mask = torch.zeros(1, 1, 1, keys + 256, dtype=torch.bool, device="cuda")
    mask[..., :keys] = True
    return query, key, value, mask


def engines(query, key, value, mask, scaling):
    """{name: () -> (B, 1, nh, D)}"""
    group = query.shape[1] // key.shape[1]

    def sdpa(backend, gqa):
        def run():
            k, v = (key, value) if gqa else (t.repeat_interleave(group, dim=1) for t in (key, value))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
            return out.transpose(1, 2)
        return run

    return {
        "triton": lambda: decode_attention_triton(query, key, value, mask, scaling),
        "triton, dot": lambda: decode_attention_triton(query, key, value, mask, scaling, DecodeTiles(dot=True)),
        "sdpa efficient after repeat_kv": sdpa(SDPBackend.EFFICIENT_ATTENTION, False),
        "sdpa efficient, enable_gqa": sdpa(SDPBackend.EFFICIENT_ATTENTION, True),
        "sdpa cudnn, enable_gqa": sdpa(SDPBackend.CUDNN_ATTENTION, True),
        "sdpa math, enable_gqa": sdpa(SDPBackend.MATH, True),
    }


def microseconds(fn) -> float:
    return gpu_ms(fn, reps=50) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--keys", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sweep", action="store_true", help="also time the kernels over a grid of DecodeTiles")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.heads} heads / {args.kv_heads} kv heads, "
          f"head dim {args.head_dim}, bf16; kernels' GPU us per call")
    scaling = args.head_dim ** -0.5
    with torch.no_grad():
        for batch, keys in itertools.product(args.batch, args.keys):
            query, key, value, mask = inputs(batch, keys, args.heads, args.kv_heads, args.head_dim)
            reference = decode_attention_ref(query, key, value, mask, scaling).float()
            kv_bytes = 2 * key[:, :, :keys].numel() * key.element_size()
            for name, run in engines(query, key, value, mask, scaling).items():
                try:
                    error = (run().float() - reference).abs().max().item()
                    us = microseconds(run)
                except RuntimeError as failure:  # a backend that refuses these inputs
                    print(f"B {batch:3d} keys {keys:6d}  {name:32s} not supported: {str(failure).splitlines()[0][:90]}")
                    continue
                print(f"B {batch:3d} keys {keys:6d}  {name:32s} {us:8.2f} us  {kv_bytes / us / 1e3:6.0f} GB/s of K, V"
                      f"  max |error| {error:.1e}", flush=True)
            if args.sweep:
                timed = []
                for programs, min_keys, warps, block_n, dot in itertools.product(
                        [2, 4, 8], [32, 128], [4, 8], [None, 64, 128], [False, True]):
                    tiles = DecodeTiles(programs_per_sm=programs, min_keys_per_split=min_keys, block_n=block_n,
                                        num_warps=warps, dot=dot)
                    timed.append((microseconds(
                        lambda: decode_attention_triton(query, key, value, mask, scaling, tiles)), tiles))
                timed.sort(key=lambda pair: pair[0])
                print("  fastest tiles: " + "; ".join(f"{us:.2f} us {tuple(tiles)}" for us, tiles in timed[:5]))


if __name__ == "__main__":
    main()
