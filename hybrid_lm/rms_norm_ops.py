"""RMSNorm, optionally with the residual add before it: the pure-PyTorch reference and the one dispatch function.

Shape legend: M = rows (every leading dimension), H = hidden size.

    s   = x + residual                              (when a residual is given; rounded to their promoted dtype)
    h   = s * rsqrt(mean(s ** 2) + eps)             (float32)
    out = weight * h.to(s.dtype)                    (rounded to promote(weight, s) once)

This is the Llama / Jamba eager formula, which `rms_norm_ref` keeps literally. The Triton tier
(triton_rms_norm.py) reads x (and the residual) once, writes the output (and the sum) once, saves only the
per-row float32 rstd and its input for the backward, and rounds exactly where the reference does. In eager
PyTorch the same norm is about seven kernels forward, with float32 intermediates saved for the backward. Eager
calls take torch's fused `F.rms_norm` instead, whose dispatch costs the host less (see `rms_norm`).
"""

import torch
import torch.nn.functional as F

from .custom_ops import has_triton_dtypes, tier_runs_on

try:  # transformers' remote-code loader skips imports inside try blocks; without triton the reference runs
    from .triton_rms_norm import MAX_HIDDEN, rms_norm_triton
except ImportError:
    rms_norm_triton, MAX_HIDDEN = None, 0


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """Reference RMSNorm: float32 statistics, the normalized value cast to the input dtype, times the weight.

    Mirrors transformers' `LlamaRMSNorm.forward` / `JambaRMSNorm.forward`.

    Args:
        x: (..., H).  weight: (H,).  eps: added to the mean square.
        residual: (..., H) or None; when given, the norm is of `x + residual`.
    Returns:
        out (..., H) in promote(weight.dtype, input dtype); with `residual`, (out, x + residual), the sum in
        the promoted dtype of x and residual (x's when they share it) and out its norm.
    """
    if residual is not None:
        total = x + residual
        return rms_norm_ref(total, weight, eps), total
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def _fused_tier_takes(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, backend: str) -> bool:
    """Whether a fused norm may compute this call for `config.kernel_backend` = `backend`: CUDA tensors unless
    "torch" (CPU ones in Triton's interpreter only for "triton", as for the Mamba ops), float32 / bfloat16 / float16,
    a (H,) weight, a residual of x's shape, H > 0, no DTensor. Decided from types and shapes only (no device values),
    so the choice is the same in eager mode, under torch.compile and in CUDA graphs."""
    return (
        tier_runs_on(backend, x, weight, residual)
        and has_triton_dtypes(x, weight, residual)
        and weight.dim() == 1 and x.dim() >= 1 and 0 < x.shape[-1] == weight.shape[0]
        and (residual is None or residual.shape == x.shape)
    )


def rms_norm_torch_fused(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    """`rms_norm_ref`'s contract through torch's own fused RMSNorm (`F.rms_norm`: one kernel forward, one backward
    on CUDA), for tensors of one dtype. Its output is rounded once, after the product with the weight (the reference
    rounds the normalized value first): within one rounding step of the reference."""
    total = x if residual is None else x + residual
    out = F.rms_norm(total, (total.shape[-1],), weight, eps)
    if out.dtype != total.dtype:  # CUDA autocast runs rms_norm in float32; the reference keeps the inputs' dtype
        out = out.to(total.dtype)
    return out if residual is None else (out, total)


def _in_graph_capture(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (a CPU-only torch has no such query)."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
             backend: str = "auto"):
    """`rms_norm_ref`'s contract (same args, returns and dtypes), on a fused norm where one applies.

    backend: the model's `config.kernel_backend`; "torch" keeps pure PyTorch. Where `_fused_tier_takes` says a
    fused norm may run (CUDA tensors unless "torch"), the choice follows where the time goes:
    - eager (training, prefill, eager decoding): torch's fused `F.rms_norm` after the residual add, for x, weight
      and residual of one dtype. Eager steps are bound by host time, and per norm (forward + backward, with a
      residual, bf16, on an H200 host) the eager formula cost the host 735-915 us, `rms_norm_triton` through its
      custom op and Triton's launcher 935-1191 us, `F.rms_norm` 243-321 us, its dispatch being C++; in inference
      95 us a call for the custom op (benchmarks/RESULTS.md, "Fused RMSNorm").
    - under torch.compile (the graph decode step, compiled training): the reference, which Inductor fuses with
      the ops around it (the residual add, the product after it). In the decode step that beat the Triton kernel:
      on an H100, mamba-ssm's dense config at batch 16 went from 0.59 to 0.52 ms a step, the bench config at
      batch 1 from 0.69 to 0.63 ms (benchmarks/RESULTS.md, "Generation").
    - inference in a CUDA graph capture without compilation, and eager inference with mixed dtypes: the Triton
      kernels (`rms_norm_triton`), one launch with the residual add fused in and the reference's rounding kept
      exactly; host cost is paid once there.
    The reference in every other case (CPU, meta, float64, mixed dtypes in eager training, mismatched shapes).
    Differentiable in x, weight and residual either way (`rms_norm_triton` itself is, for its tests).
    """
    if torch.compiler.is_compiling() or not _fused_tier_takes(x, weight, residual, backend):
        return rms_norm_ref(x, weight, eps, residual)
    records_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual))
    one_dtype = all(t.dtype == x.dtype for t in (weight, residual) if t is not None)
    kernel_fits = not records_grad and rms_norm_triton is not None and x.shape[-1] <= MAX_HIDDEN
    if kernel_fits and (not one_dtype or _in_graph_capture(x)):
        return rms_norm_triton(x, weight, eps, residual)
    if one_dtype:
        return rms_norm_torch_fused(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
