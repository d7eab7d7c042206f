"""RMSNorm, optionally with the residual add before it: the pure-PyTorch reference and the one dispatch function.

Shape legend: M = rows (every leading dimension), H = hidden size.

    s   = x + residual                              (when a residual is given; rounded to their promoted dtype)
    h   = s * rsqrt(mean(s ** 2) + eps)             (float32)
    out = weight * h.to(s.dtype)                    (rounded to promote(weight, s) once)

This is the Llama / Jamba eager formula, which `rms_norm_ref` keeps literally. The Triton tier
(triton_rms_norm.py) reads x (and the residual) once, writes the output (and the sum) once, saves only the
per-row float32 rstd and its input for the backward, and rounds exactly where the reference does. In eager
PyTorch the same norm is about seven kernels forward, with float32 intermediates saved for the backward.
"""

import torch

from .custom_ops import has_triton_dtypes, triton_runs_on

try:  # transformers' remote-code loader skips imports inside try blocks; without triton the reference runs
    from .triton_rms_norm import MAX_HIDDEN, rms_norm_triton
except ImportError:
    rms_norm_triton, MAX_HIDDEN = None, 0

try:  # tensor-parallel parameters are DTensors: the reference handles them
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has none
    DTensor = ()


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


def _kernel_takes(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, backend: str) -> bool:
    """Whether the Triton tier computes this call for `config.kernel_backend` = `backend`: CUDA tensors unless
    "torch" (CPU ones in Triton's interpreter only for "triton", as for the Mamba ops), float32 / bfloat16 /
    float16, a (H,) weight, a residual of x's shape, 0 < H <= MAX_HIDDEN, no DTensor. Decided from types and shapes
    only (no device values), so the choice is the same in eager mode, under torch.compile and in CUDA graphs."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    device = x.device
    return (
        rms_norm_triton is not None
        and (backend != "torch" if device.type == "cuda" else backend == "triton" and triton_runs_on(device))
        and has_triton_dtypes(*tensors)
        and all(t.device == device and not isinstance(t, DTensor) for t in tensors)
        and weight.dim() == 1 and x.dim() >= 1 and 0 < x.shape[-1] == weight.shape[0] <= MAX_HIDDEN
        and (residual is None or residual.shape == x.shape)
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
             backend: str = "auto"):
    """`rms_norm_ref`'s contract (same args, returns, dtypes and rounding), on the Triton kernels where they apply.

    backend: the model's `config.kernel_backend`; "torch" keeps pure PyTorch. The kernels run when `_kernel_takes`
    says so and no gradient is recorded (inference, decoding), the reference in every other case (CPU, meta,
    float64, mismatched shapes, training).

    Why not in training: on an H200 the kernels' forward + backward take 6x less GPU time than the eager formula
    (62 against 396 us at 8192 x 1024 bf16 with a residual), but in one run of the bench config's train step they
    made the default (triton) tier 10-12 ms slower while the cuda tier gained 5-6 ms (benchmarks/RESULTS.md,
    "Fused RMSNorm"): the triton tier's eager step is bound by host time, and each norm through the custom op and
    Triton's launcher costs the host more than the eager formula's launches. Differentiable in x, weight and
    residual either way (`rms_norm_triton` itself is, for its tests).
    """
    records_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, residual))
    if not records_grad and _kernel_takes(x, weight, residual, backend):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
