"""The decode step's projections at 1-16 rows on one GPU: cuBLAS (`F.linear`) against the split-K Triton product
that the compiled decode step uses for 2-16 rows (`hybrid_lm/triton_split_k_matmul.py`).

    python benchmarks/split_k_matmul.py [--rows 2 4 8 16] [--reps 200]

GPU microseconds per product (torch.profiler, kernels only, L2 warm: what a projection costs inside a replayed CUDA
graph): `cuBLAS` counts its split-K reduction kernel where it runs one; `split-K` is the kernel alone, since in the
step its partial sums fuse into the next kernel; `+ sum` adds an eager sum of the partials, an upper bound for a
product whose consumer cannot take the sum. `floor` is the weight's bytes at the bandwidth given by `--bandwidth`
(GB/s). Needs CUDA and triton; refuses otherwise.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import gpu_ms  # noqa: E402

# (N, K) of the bench and dense configs' projections (hidden 1024, Mamba inner 2048, MLP 2816, vocabulary 32000)
PROJECTIONS = {"in_proj": (4096, 1024), "x_proj": (96, 2048), "out_proj": (1024, 2048), "gate_up": (5632, 1024),
               "down": (1024, 2816), "q_proj": (1024, 1024), "lm_head": (32000, 1024)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--bandwidth", type=float, default=3350, help="GB/s for the floor (H100 SXM: 3350)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/split_k_matmul.py times CUDA kernels, and this machine has no CUDA device")
    try:
        from hybrid_lm.triton_split_k_matmul import split_k_matmul, split_k_tiles
    except ImportError as error:
        raise SystemExit(f"benchmarks/split_k_matmul.py needs triton: {error} (pip install triton)") from None
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bfloat16, GPU us per product")
    print(f"{'projection':>10} {'N x K':>12} {'rows':>4} {'floor':>6} {'cuBLAS':>7} {'split-K':>8} {'+ sum':>6} "
          f"{'x cuBLAS':>8} {'slices':>6}")
    for name, (n, k) in PROJECTIONS.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        floor = n * k * 2 / args.bandwidth / 1e3
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            error = (split_k_matmul(x, weight.t()).sum(0) - F.linear(x, weight).float()).abs().max().item()
            if error > 1e-2 * k ** 0.5:
                raise SystemExit(f"{name} at {rows} rows: the split-K product is off by {error:.3g}")
            cublas = gpu_ms(lambda: F.linear(x, weight), args.reps) * 1e3
            split = gpu_ms(lambda: split_k_matmul(x, weight.t()), args.reps) * 1e3
            summed = gpu_ms(lambda: split_k_matmul(x, weight.t()).sum(0).to(x.dtype), args.reps) * 1e3
            print(f"{name:>10} {f'{n} x {k}':>12} {rows:>4} {floor:6.2f} {cublas:7.2f} {split:8.2f} {summed:6.2f} "
                  f"{cublas / split:7.2f}x {split_k_tiles(n, k, x.device)[1]:>6}", flush=True)


if __name__ == "__main__":
    main()
