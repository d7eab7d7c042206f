"""RMSNorm with an optional fused residual add: the Triton tier, forward and backward.

Shape legend: M = rows (every leading dimension flattened), H = hidden size, BM x BH = a program's tile
(BM rows, BH = next power of two >= H columns, the tail masked), G = backward programs.
Same semantics, signature and rounding as `rms_norm_ops.rms_norm_ref` (see there for the formula):

    s = x + residual (rounded to its dtype)   r = rsqrt(mean(s^2) + eps)   h = s * r   out = w * round(h)

Arithmetic is float32. h is rounded to s's dtype and the product with the weight is rounded once to
promote(w, s): what `weight * h.to(dtype)` does in PyTorch, whose same-dtype half-precision multiply is
computed in float32 too (the product of two bf16 / fp16 values is exact in float32).

Forward: one program per block of BM rows reads x (and the residual) once and writes out (and s) and the
per-row r. Only s (x itself without a residual) and r are kept for the backward, which recomputes h:

    g = dout * w      ds = r * (g - h * mean(g * h)) + dsum      dw = sum over rows of dout * round(h)

(round(h) is what multiplied the weight; the rounding counts as identity in the chain rule, as in autograd).
dsum is the gradient reaching s directly (the residual stream). ds is the gradient of x and of the residual.
The backward runs G programs, each looping over every G-th block of rows and keeping its dw partial sum in
registers; torch adds the G partial rows afterwards (deterministic, no atomics).
"""

import torch

try:  # transformers' remote-code loader skips imports inside try blocks; rms_norm_ops falls back to the reference
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton kernels need triton: pip install triton") from error

from .custom_ops import op_namespace, require_triton_dtypes

_NS = op_namespace(__name__)

# The largest H one program's tile holds; rms_norm_ops sends wider rows to the reference.
MAX_HIDDEN = 65536
# A tile holds about this many elements: BM = max(1, _TILE_ELEMENTS // BH). Tests lower it to get several programs.
_TILE_ELEMENTS = 4096
# Backward programs per streaming multiprocessor (G = this x SMs, at most one per block of rows).
_BWD_PROGRAMS_PER_SM = 2
_BWD_PROGRAMS_OFF_GPU = 3  # the interpreter's G: small, so that the tests cross the per-program loop


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 x rounded to the nearest `dtype` value (ties to even), kept in float32, so that `.to(dtype)` after
    it is exact. bfloat16 by hand: Triton's CPU interpreter truncates in `.to(tl.bfloat16)` (the GPU rounds)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000  # stays NaN (rounding could carry its payload into infinity)
        out = tl.where(is_nan, x, rounded.to(tl.float32, bitcast=True))
    elif dtype == tl.float16:
        out = x.to(tl.float16).to(tl.float32)
    else:
        out = x
    return out


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, rstd_ptr,
    rows, hidden, stride_x, stride_res, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """x, res: (M, H) with unit column stride; w: (H,); out, sum: (M, H) contiguous; rstd: (M,) float32."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_H)
    mask_m = row < rows
    mask_h = col < hidden
    mask = mask_m[:, None] & mask_h[None, :]
    s = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row[:, None] * stride_res + col[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _rounded(s + res, sum_ptr.dtype.element_ty)  # the sum is rounded once, as `x + residual` is
        tl.store(sum_ptr + row[:, None] * hidden + col[None, :], s.to(sum_ptr.dtype.element_ty), mask=mask)
    rstd = tl.rsqrt(tl.sum(s * s, axis=1) / hidden + eps)  # (BM,)
    tl.store(rstd_ptr + row, rstd, mask=mask_m)
    if HAS_RESIDUAL:
        h = _rounded(s * rstd[:, None], sum_ptr.dtype.element_ty)
    else:
        h = _rounded(s * rstd[:, None], x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + col, mask=mask_h, other=0.0).to(tl.float32)
    out = _rounded(h * w[None, :], out_ptr.dtype.element_ty)
    tl.store(out_ptr + row[:, None] * hidden + col[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dout_ptr, dsum_ptr, s_ptr, w_ptr, rstd_ptr, ds_ptr, dw_ptr,
    rows, hidden, stride_dout, stride_dsum, stride_s,
    HAS_DSUM: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dout, dsum, s: (M, H) with unit column stride; w: (H,); rstd: (M,); ds: (M, H) contiguous, in s's dtype;
    dw: (G, H) float32 partial sums, one row per program."""
    pid = tl.program_id(0)
    col = tl.arange(0, BLOCK_H)
    mask_h = col < hidden
    w = tl.load(w_ptr + col, mask=mask_h, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for block in range(pid, tl.cdiv(rows, BLOCK_M), tl.num_programs(0)):
        row = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = row < rows
        mask = mask_m[:, None] & mask_h[None, :]
        s = tl.load(s_ptr + row[:, None] * stride_s + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + row[:, None] * stride_dout + col[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=mask_m, other=0.0)
        h = s * rstd[:, None]
        if WEIGHT_GRAD:
            dw += dout * _rounded(h, s_ptr.dtype.element_ty)
        g = dout * w[None, :]
        ds = rstd[:, None] * (g - h * (tl.sum(g * h, axis=1) / hidden)[:, None])
        if HAS_DSUM:
            ds += tl.load(dsum_ptr + row[:, None] * stride_dsum + col[None, :], mask=mask, other=0.0).to(tl.float32)
        ds = _rounded(ds, ds_ptr.dtype.element_ty).to(ds_ptr.dtype.element_ty)
        tl.store(ds_ptr + row[:, None] * hidden + col[None, :], ds, mask=mask)
    if WEIGHT_GRAD:
        tl.store(dw_ptr + pid.to(tl.int64) * hidden + col, tl.sum(dw, axis=0), mask=mask_h)


# ----------------------------------------------------------------------------- launchers


def _tiles(hidden: int) -> tuple[int, int, int]:
    """(BM, BH, warps) for rows of `hidden` elements."""
    block_h = triton.next_power_of_2(hidden)
    block_m = max(1, _TILE_ELEMENTS // block_h)
    return block_m, block_h, min(16, max(1, block_m * block_h // 256))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (M, H) with unit column stride (a view where possible, a copy otherwise)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _dtypes(x, weight, residual) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the normalized input s, dtype of the output), by PyTorch's type promotion."""
    norm_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return norm_dtype, torch.promote_types(weight.dtype, norm_dtype)


def _rms_norm_fwd(x, weight, residual, eps):
    hidden = x.shape[-1]
    norm_dtype, out_dtype = _dtypes(x, weight, residual)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = torch.empty(x.shape if residual is not None else 0, dtype=norm_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else None
    rows = x2.shape[0]
    if rows:
        block_m, block_h, warps = _tiles(hidden)
        _rms_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
            x2, res2, weight.contiguous(), out, total, rstd,
            rows, hidden, x2.stride(0), res2.stride(0) if res2 is not None else 0, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
        )
    return out, total, rstd


def _bwd_programs(device: torch.device, blocks: int) -> int:
    if device.type == "cuda":
        programs = _BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = _BWD_PROGRAMS_OFF_GPU
    return max(1, min(blocks, programs))


def _rms_norm_bwd(grad_out, grad_sum, saved, weight, rstd, weight_grad):
    hidden = saved.shape[-1]
    ds = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
    s2, dout2 = _rows(saved), _rows(grad_out)
    dsum2 = _rows(grad_sum) if grad_sum is not None else None
    rows = s2.shape[0]
    block_m, block_h, warps = _tiles(hidden)
    programs = _bwd_programs(saved.device, triton.cdiv(rows, block_m))
    dw = torch.zeros(programs if weight_grad else 0, hidden, dtype=torch.float32, device=saved.device)
    if rows:
        _rms_norm_bwd_kernel[(programs,)](
            dout2, dsum2, s2, weight.contiguous(), rstd, ds, dw,
            rows, hidden, dout2.stride(0), dsum2.stride(0) if dsum2 is not None else 0, s2.stride(0),
            HAS_DSUM=grad_sum is not None, WEIGHT_GRAD=weight_grad, BLOCK_M=block_m, BLOCK_H=block_h,
            num_warps=warps,
        )
    return ds, dw.sum(0)


# ----------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op(f"{_NS}::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns out (..., H), the sum x + residual (..., H) (empty without a residual) and rstd (...) float32."""
    return _rms_norm_fwd(x, weight, residual, eps)


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps):
    norm_dtype, out_dtype = _dtypes(x, weight, residual)
    total = x.new_empty(x.shape if residual is not None else 0, dtype=norm_dtype)
    return x.new_empty(x.shape, dtype=out_dtype), total, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    grad_out: torch.Tensor, grad_sum: torch.Tensor | None, saved: torch.Tensor, weight: torch.Tensor,
    rstd: torch.Tensor, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the gradient of the normalized input s (in s's dtype) and dweight (H,) float32 (empty when
    `weight_grad` is False)."""
    return _rms_norm_bwd(grad_out, grad_sum, saved, weight, rstd, weight_grad)


@_rms_norm_bwd_op.register_fake
def _(grad_out, grad_sum, saved, weight, rstd, weight_grad):
    return saved.new_empty(saved.shape), saved.new_empty(saved.shape[-1] if weight_grad else 0, dtype=torch.float32)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, residual, _ = inputs
    out, total, rstd = output
    # the norm's input: the sum with a residual, x itself without
    ctx.save_for_backward(total if residual is not None else x, weight, rstd)
    ctx.x_dtype, ctx.out_dtype = x.dtype, out.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _rms_norm_backward(ctx, grad_out, grad_sum, _grad_rstd):
    saved, weight, rstd = ctx.saved_tensors
    has_residual = ctx.residual_dtype is not None
    if grad_out is None:
        grad_out = saved.new_zeros(saved.shape, dtype=ctx.out_dtype)
    ds, dw = _rms_norm_bwd_op(grad_out, grad_sum if has_residual else None, saved, weight, rstd,
                              ctx.needs_input_grad[1])
    return (
        ds.to(ctx.x_dtype), dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
        ds.to(ctx.residual_dtype) if has_residual else None, None,
    )


_rms_norm_fwd_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


# ----------------------------------------------------------------------------- public function


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """RMSNorm (of x + residual, when given) on the Triton kernels; same contract as `rms_norm_ops.rms_norm_ref`.

    Args:
        x: (..., H), any strides.  weight: (H,), H <= MAX_HIDDEN.  residual: (..., H) of x's shape, or None.
    Returns:
        out (..., H) in promote(weight.dtype, input dtype); with `residual`, (out, x + residual).
        Differentiable in x, weight and residual.
    """
    require_triton_dtypes("rms_norm_triton", x=x, weight=weight, residual=residual)
    hidden = x.shape[-1] if x.dim() else 0
    if weight.dim() != 1 or hidden != weight.shape[0] or not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"rms_norm_triton takes x (..., H) and weight (H,) with 0 < H <= {MAX_HIDDEN}, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm_triton: residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)}")
    args = (x, weight, residual, float(eps))
    out, total, _ = _rms_norm_fwd_op(*args)  # one launch path, as for the Mamba ops: eager, autograd, compile, graphs
    return out if residual is None else (out, total)
