"""Mamba kernel timings on one GPU: hybrid_lm's Triton kernels vs mamba-ssm / causal-conv1d vs the torch reference.

    python benchmarks/mamba_ops.py [--sweep] [--skip-torch] [--markdown FILE]

Selective scan (bf16, with z, D, dt bias + softplus) forward and forward+backward at the shapes of
issue #7, the causal conv1d (width 4, bias, silu), and the two decoding steps. Each time is the median
of `triton.testing.do_bench`, a wall time that includes host time at small shapes; the conv rows add each side's
GPU kernel time (torch.profiler), which is what a step whose host runs ahead pays. Bytes/s count each input read
once and each output written once, and are compared with a device-to-device copy measured in the same run. `--sweep` instead times alternatives to the
kernels' tile choices. mamba-ssm's package `__init__` imports modules
a bare machine may lack, so its submodules are imported without running it.
"""

import argparse
import functools
import importlib.util
import sys
import types

import torch
import triton
import triton.testing

from hybrid_lm.mamba_conv_ref import causal_conv1d_ref, causal_conv1d_update_ref
from hybrid_lm.mamba_conv_triton import (
    ConvTiles,
    causal_conv1d_triton,
    causal_conv1d_update_triton,
)
from hybrid_lm.mamba_scan_ref import selective_scan_ref, selective_state_update_ref
from hybrid_lm.mamba_scan_triton import (
    ScanTiles,
    scan_tiles,
    selective_scan_triton,
    selective_state_update_triton,
)
from timing import gpu_ms  # benchmarks/timing.py

SCAN_SHAPES = [(4, 2048, 2048, 16), (1, 4096, 16384, 16), (8, 2048, 1024, 64)]
CONV_SHAPES = [(4, 2048, 2048), (1, 4096, 16384), (8, 2048, 1024)]
DECODE_SHAPES = [(1, 4096, 16), (16, 4096, 16), (64, 2048, 64)]


def import_mamba_ssm():
    """(selective_scan_fn, selective_state_update) from mamba-ssm without its package __init__, or Nones."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        return None, None
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("mamba_ssm", package)
    found = []
    for module, name in (("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
                         ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except Exception as error:  # report and go on: the other columns are still worth having
            print(f"# could not import {module}.{name}: {error!r}")
            found.append(None)
    return tuple(found)


def import_causal_conv1d():
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except ImportError as error:
        print(f"# causal-conv1d unavailable: {error!r}")
        return None, None
    return causal_conv1d_fn, causal_conv1d_update


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms * 1e3


def scan_inputs(batch, channels, length, d_state, dtype=torch.bfloat16):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).to(dtype)

    u, delta, z = rand(batch, channels, length), rand(batch, channels, length, scale=0.5), rand(batch, channels, length)
    A = -torch.rand(channels, d_state, device="cuda") - 0.5
    B, C = rand(batch, d_state, length), rand(batch, d_state, length)
    D, bias = torch.randn(channels, device="cuda"), torch.randn(channels, device="cuda") * 0.3
    return [u, delta, A, B, C, D, z, bias]


def time_scan(fn, inputs, backward):
    leaves = [t.detach().requires_grad_(backward) for t in inputs]
    grad = torch.randn_like(inputs[0])

    def run():
        out = fn(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)
        if backward:
            out.backward(grad)
    return bench(run)


def scan_bytes(batch, channels, length, d_state, backward):
    big, small = batch * channels * length * 2, batch * d_state * length * 2
    forward = 4 * big + 2 * small  # u, delta, z in; out
    return forward + (7 * big + 4 * small if backward else 0)  # + u, delta, z, dout, B, C in; du, ddelta, dz, dB, dC out


def sweep_scan_tiles(shapes):
    """Times (T, forward BLOCK_D, backward BLOCK_D) alternatives to `mamba_scan_triton.scan_tiles` at each shape."""
    candidates = [(256, 2, 2), (256, 1, 2), (256, 1, 1), (512, 1, 1), (128, 4, 4), (128, 2, 4)]
    for shape in shapes:
        inputs = scan_inputs(*shape)
        print(f"# sweep {shape}: default tiles {tuple(scan_tiles(shape[2]))}", flush=True)
        for tiles in map(ScanTiles._make, candidates):
            scan = functools.partial(selective_scan_triton, tiles=tiles)
            fwd = time_scan(scan, inputs, False)
            both = time_scan(scan, inputs, True)
            print(f"#   T={tiles.chunk} fwd BLOCK_D={tiles.block_d} bwd BLOCK_D={tiles.block_d_backward}: "
                  f"fwd {fwd:.3f} ms, bwd {both - fwd:.3f} ms, fwd+bwd {both:.3f} ms", flush=True)
        del inputs


def sweep_conv_tiles(shapes):
    """Times alternatives to the conv kernels' `ConvTiles()`: the forward's (BLOCK_D, BLOCK_L, warps) and the
    backward's (BLOCK_D, BLOCK_L, warps, tiles a program walks), each by its kernels' GPU time (every kernel of
    the backward, the partials' sum included)."""
    forward_tiles = [(16, 128, 4), (8, 256, 4), (16, 128, 8), (8, 128, 4), (32, 64, 4)]
    backward_tiles = [(16, 128, 8, 8), (16, 128, 8, 16), (16, 128, 8, 4), (16, 128, 4, 8), (8, 128, 4, 8),
                      (16, 64, 4, 8), (8, 256, 8, 8), (32, 128, 16, 8)]
    for batch, channels, length in shapes:
        x, weight, bias = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
                           for shape in ((batch, channels, length), (channels, 4), (channels,)))
        grad = torch.randn_like(x)
        for block_d, block_l, warps in forward_tiles:
            tiles = ConvTiles(block_d, block_l, num_warps=warps)
            fwd = gpu_ms(lambda: causal_conv1d_triton(x, weight, bias, activation="silu", tiles=tiles), 20)
            print(f"# conv sweep {(batch, channels, length)} forward BLOCK_D={block_d} BLOCK_L={block_l} "
                  f"warps={warps}: {fwd:.4f} ms", flush=True)
        for block_d, block_l, warps, walked in backward_tiles:
            tiles = ConvTiles(block_d, block_l, backward_warps=warps, backward_tiles=walked)
            leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
            out = causal_conv1d_triton(*leaves, activation="silu", tiles=tiles)
            bwd = gpu_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), 20)
            print(f"# conv sweep {(batch, channels, length)} backward BLOCK_D={block_d} BLOCK_L={block_l} "
                  f"warps={warps} tiles={walked}: {bwd:.4f} ms", flush=True)


def conv_row(shape, name, kernels, bytes_moved, bandwidth, ours=float("nan"), theirs=float("nan"), ref=float("nan")):
    """One row of the conv table; `kernels`: (ours, causal-conv1d's) GPU ms; `bytes_moved`: the bytes the pass must
    move (x in and out forward; x, dout in and dx out backward)."""
    rate = bytes_moved / kernels[0] * 1e3
    return (f"| {shape} | {name} | {ours:.3f} | {theirs:.3f} | {ref:.3f} | {kernels[0]:.4f} | {kernels[1]:.4f} | "
            f"{kernels[0] / kernels[1]:.2f} | {rate / 1e9:.0f} ({rate / bandwidth:.0%}) |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="only time alternative tile choices")
    parser.add_argument("--skip-torch", action="store_true", help="leave out the (slow) torch reference")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    scan_fn, state_update_fn = import_mamba_ssm()
    conv_fn, conv_update_fn = import_causal_conv1d()
    bandwidth = copy_bandwidth()
    lines = [f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
             f"device-to-device copy {bandwidth / 1e12:.2f} TB/s (read + write).", ""]
    if args.sweep:
        sweep_scan_tiles(SCAN_SHAPES)
        sweep_conv_tiles(CONV_SHAPES)
        return
    lines.append("Scan tiles (T, forward BLOCK_D, backward BLOCK_D; one warp per program): "
                 + ", ".join(f"{shape}: {tuple(scan_tiles(shape[2]))}" for shape in SCAN_SHAPES) + ".")
    lines.append("")

    lines.append("| selective scan (B, D, L, N), bf16 | pass | triton ms | mamba-ssm ms | torch ms | triton / mamba-ssm | triton GB/s (of copy) |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in SCAN_SHAPES:
        inputs = scan_inputs(*shape)
        for backward in (False, True):
            ours = time_scan(selective_scan_triton, inputs, backward)
            theirs = time_scan(scan_fn, inputs, backward) if scan_fn else float("nan")
            ref = float("nan") if args.skip_torch else time_scan(selective_scan_ref, inputs, backward)
            rate = scan_bytes(*shape, backward) / ours * 1e3
            lines.append(f"| {shape} | {'fwd+bwd' if backward else 'fwd'} | {ours:.3f} | {theirs:.3f} | {ref:.2f} | "
                         f"{ours / theirs:.2f} | {rate / 1e9:.0f} ({rate / bandwidth:.0%}) |")
            print(lines[-1], flush=True)
        del inputs

    lines += ["", "| causal conv1d (B, D, L), K=4, bf16 | pass | triton ms | causal-conv1d ms | torch ms | triton GPU ms | "
              "causal-conv1d GPU ms | triton / causal-conv1d (GPU) | triton GB/s (of copy, GPU) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for batch, channels, length in CONV_SHAPES:
        x = torch.randn(batch, channels, length, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(channels, 4, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(channels, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn_like(x)

        def step(fn, backward):
            leaves = [t.detach().requires_grad_(backward) for t in (x, weight, bias)]

            def run():
                out = fn(*leaves, activation="silu")
                if backward:
                    for leaf in leaves:  # no accumulation kernels into earlier gradients
                        leaf.grad = None
                    out.backward(grad)
            return run
        # wall times (do_bench) include host time at small shapes; the GPU columns are the kernels' own time
        # (torch.profiler), and the bwd row is fwd+bwd minus fwd in it
        kernels = {}
        for backward in (False, True):
            ours = bench(step(causal_conv1d_triton, backward))
            theirs = bench(step(conv_fn, backward)) if conv_fn else float("nan")
            ref = bench(step(causal_conv1d_ref, backward))
            kernels[backward] = (gpu_ms(step(causal_conv1d_triton, backward), 50),
                                 gpu_ms(step(conv_fn, backward), 50) if conv_fn else float("nan"))
            lines.append(conv_row((batch, channels, length), "fwd+bwd" if backward else "fwd", kernels[backward],
                                  x.numel() * 2 * (5 if backward else 2), bandwidth, ours, theirs, ref))
            print(lines[-1], flush=True)
        backward_only = tuple(both - fwd for both, fwd in zip(kernels[True], kernels[False]))
        lines.append(conv_row((batch, channels, length), "bwd", backward_only, x.numel() * 2 * 3, bandwidth))
        print(lines[-1], flush=True)

    lines += ["", "| decoding step (B, D, N) | op | triton ms | mamba-ssm / causal-conv1d ms | torch ms | ratio |",
              "| --- | --- | --- | --- | --- | --- |"]
    for batch, channels, d_state in DECODE_SHAPES:
        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        state = torch.randn(batch, channels, d_state, device="cuda")
        x, dt, z, B, C = rand(batch, channels), rand(batch, channels), rand(batch, channels), rand(batch, d_state), rand(batch, d_state)
        A = -torch.rand(channels, d_state, device="cuda")
        D, dt_bias = torch.randn(channels, device="cuda"), torch.randn(channels, device="cuda")
        step = (x, dt, A, B, C, D, z, dt_bias, True)
        ours = bench(lambda: selective_state_update_triton(state, *step))
        theirs = bench(lambda: state_update_fn(state, *step)) if state_update_fn else float("nan")
        ref = bench(lambda: selective_state_update_ref(state, *step))
        lines.append(f"| {(batch, channels, d_state)} | ssm state update | {ours:.4f} | {theirs:.4f} | {ref:.4f} | {ours / theirs:.2f} |")
        conv_state, weight, bias = rand(batch, channels, 3), rand(channels, 4), rand(channels)
        ours = bench(lambda: causal_conv1d_update_triton(x, conv_state, weight, bias, "silu"))
        theirs = bench(lambda: conv_update_fn(x, conv_state, weight, bias, "silu")) if conv_update_fn else float("nan")
        ref = bench(lambda: causal_conv1d_update_ref(x, conv_state, weight, bias, "silu"))
        lines.append(f"| {(batch, channels, 4)} | conv state update | {ours:.4f} | {theirs:.4f} | {ref:.4f} | {ours / theirs:.2f} |")
        print(*lines[-2:], sep="\n", flush=True)

    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
