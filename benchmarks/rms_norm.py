"""RMSNorm (+ residual add) timings on one GPU: the torch reference, torch's fused `F.rms_norm` (what the model runs
in eager calls), the Triton kernels (mixed-dtype inference, uncompiled graph captures), torch.compile of the reference.

    python benchmarks/rms_norm.py [--shapes 8192x1024,16384x4096] [--dtype bfloat16] [--reps 100] [--no-flush]

For each (rows, hidden) shape, without and with the residual add: forward, and forward + backward (gradients of x,
weight and residual). `ms` is the median over `--reps` runs timed with CUDA events after a warm-up, the L2 cache
flushed before each run unless `--no-flush`: a wall time, which includes the host's launch time wherever the GPU
waits for it (autograd and dispatch; at small shapes that is most of it). `GPU ms` is the kernels' own time, the
mean of `--reps` back-to-back runs from torch.profiler (L2 warm): what the op costs inside a step whose host runs
ahead. GB/s (of `GPU ms`) counts the bytes the fused kernels must move (each (M, H) input read once, each output written once; weight and
rstd left out) for every implementation, so the column compares speed on one scale; `x ref` is the reference's
`GPU ms` over this one's. Needs CUDA and triton; refuses otherwise.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_lm.rms_norm_ops import rms_norm_torch_fused, rms_norm_ref
from timing import gpu_ms, time_ms  # noqa: E402

EPS = 1e-6
DEFAULT_SHAPES = [(8192, 1024), (16384, 4096)]


def _inputs(rows: int, hidden: int, dtype: torch.dtype, residual: bool):
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, device="cuda", dtype=dtype)

    x, weight = rand(rows, hidden).requires_grad_(), (1 + 0.1 * rand(hidden)).requires_grad_()
    res = rand(rows, hidden).requires_grad_() if residual else None
    grads = [rand(rows, hidden)] + ([rand(rows, hidden)] if residual else [])
    return x, weight, res, grads


def _steps(fn, x, weight, res, grads):
    """(forward, forward + backward) closures for fn(x, weight, eps, residual)."""
    leaves = [t for t in (x, weight, res) if t is not None]

    def forward():
        with torch.no_grad():
            return fn(x, weight, EPS, res)

    def forward_backward():
        out = fn(x, weight, EPS, res)
        outputs = list(out) if res is not None else [out]
        return torch.autograd.grad(outputs, leaves, grads)

    return forward, forward_backward


def benchmark_rms_norm(shapes=DEFAULT_SHAPES, dtype=torch.bfloat16, reps: int = 100, flush: bool = True) -> list[dict]:
    """Times every implementation at every shape, with and without the residual; returns one dict per row printed."""
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/rms_norm.py times CUDA kernels, and this machine has no CUDA device "
                         "(torch.cuda.is_available() is False); run it on a GPU machine")
    try:
        from hybrid_lm.triton_rms_norm import rms_norm_triton
    except ImportError as error:
        raise SystemExit(f"benchmarks/rms_norm.py needs triton for the kernels: {error} (pip install triton)") from None
    implementations = {
        "torch reference": rms_norm_ref,
        "torch F.rms_norm": rms_norm_torch_fused,
        "triton": rms_norm_triton,
        "torch.compile(reference)": torch.compile(rms_norm_ref, dynamic=False),
    }
    element = torch.empty((), dtype=dtype).element_size()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}, median of {reps} runs, "
          f"L2 {'flushed' if flush else 'warm'}")
    print(f"{'shape':>12} {'residual':>8} {'pass':>9} {'implementation':>26} {'ms':>9} {'GPU ms':>9} {'GB/s':>8} "
          f"{'x ref':>6}")
    results = []
    for rows, hidden in shapes:
        for residual in (False, True):
            x, weight, res, grads = _inputs(rows, hidden, dtype, residual)
            expected = rms_norm_ref(x, weight, EPS, res)
            # bytes the fused kernels move: x (+ residual) in, out (+ sum) out; backward: dout (+ dsum), s in, ds out
            forward_bytes = (2 + 2 * residual) * rows * hidden * element
            backward_bytes = (3 + residual) * rows * hidden * element
            for pass_name, bytes_moved in (("forward", forward_bytes), ("fwd+bwd", forward_bytes + backward_bytes)):
                reference_ms = None
                for name, fn in implementations.items():
                    forward, forward_backward = _steps(fn, x, weight, res, grads)
                    if pass_name == "forward":
                        got = forward()
                        for a, b in zip(*[(t,) if isinstance(t, torch.Tensor) else t for t in (got, expected)]):
                            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # a broken kernel is not timed
                    step = forward if pass_name == "forward" else forward_backward
                    ms, kernel_ms = time_ms(step, reps, flush=flush), gpu_ms(step, reps)
                    reference_ms = reference_ms or kernel_ms
                    row = {"shape": f"{rows}x{hidden}", "residual": residual, "pass": pass_name, "implementation": name,
                           "ms": ms, "gpu_ms": kernel_ms, "gbps": bytes_moved / kernel_ms / 1e6,
                           "speedup": reference_ms / kernel_ms}
                    results.append(row)
                    print(f"{row['shape']:>12} {residual!s:>8} {pass_name:>9} {name:>26} {ms:9.4f} {kernel_ms:9.4f} "
                          f"{row['gbps']:8.0f} {row['speedup']:6.2f}", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(f"{m}x{h}" for m, h in DEFAULT_SHAPES),
                        help="comma-separated ROWSxHIDDEN")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--no-flush", action="store_true", help="keep the L2 cache warm between runs")
    args = parser.parse_args(argv)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    benchmark_rms_norm(shapes, getattr(torch, args.dtype), args.reps, flush=not args.no_flush)


if __name__ == "__main__":
    main()
