"""Causal depthwise conv1d of the Mamba mixer: the Triton tier, forward, backward and the decoding step.

Shape legend: B = batch, D = channels, L = length, K = kernel width, P = time steps per program.
The op's contract is the docstring of mamba_conv_ref.py, whose `causal_conv1d_ref` / `causal_conv1d_update_ref`
this file's public functions mirror:

    out_t[d] = act(bias[d] + sum_k weight[d, k] * x_{t - (K - 1) + k}[d])

with inputs before the sequence taken from `initial_state` (document of the row's first token) and,
under `seq_idx`, inputs of another document counted as zero. Arithmetic is float32; outputs are
rounded once to x's dtype.

Each program owns a [BLOCK_D, P] tile of positions and reads the K shifted input tiles it needs (the
overlap is served by the cache). The backward runs in two passes: the first recomputes the pre-activation
over output positions and stores its gradient (float32, one tensor the size of x) with per-program partial
sums of dweight / dbias that torch adds up (deterministic, no atomics); the second gathers the input gradient
from K shifted tiles of it. (One pass would recompute the pre-activation at the K outputs each input feeds:
K^2 shifted loads against 2K + K here.)
"""

from typing import NamedTuple

import torch

try:  # transformers' remote-code checks skip imports inside try blocks; mamba_kernels reports the absence
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton kernels need triton: pip install triton") from error

from .custom_ops import eager_or_op, given_flags, op_namespace, require_triton_dtypes
from .mamba_conv_ref import activation_fn

_NS = op_namespace(__name__)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile(ptr, strides, batch, offs_d, t):
    """Pointers to [batch, offs_d, t] ([BLOCK_D, P]) of a (B, D, L) tensor of `strides` (b, d, l): x and dout
    are read in any layout, such as the (B, L, D) one of the input projection's output."""
    stride_b, stride_d, stride_l = strides
    return ptr + batch * stride_b + offs_d.to(tl.int64)[:, None] * stride_d + t.to(tl.int64)[None, :] * stride_l


@triton.jit
def _load_input(x_ptr, x_strides, init_ptr, seq_ptr, batch, offs_d, mask_d, src, doc, channels, length,
                WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """x[batch, offs_d, src] as float32 [BLOCK_D, P], from initial_state where src < 0, zero where src is
    outside [-(K - 1), L) or (with seq_idx) belongs to another document than `doc` ([P])."""
    inside = (src >= 0) & (src < length)
    value = tl.load(_tile(x_ptr, x_strides, batch, offs_d, src), mask=mask_d[:, None] & inside[None, :], other=0.0)
    value = value.to(tl.float32)
    if HAS_INIT:
        before = (src < 0) & (src >= 1 - WIDTH)
        init_rows = (batch * channels + offs_d.to(tl.int64)) * (WIDTH - 1) + (WIDTH - 1)
        value += tl.load(init_ptr + init_rows[:, None] + src[None, :], mask=mask_d[:, None] & before[None, :],
                         other=0.0).to(tl.float32)
    if HAS_SEQ:
        # the carried-in state belongs to the row's first document
        src_doc = tl.load(seq_ptr + batch * length + tl.maximum(src, 0), mask=src < length, other=0)
        value = tl.where((src_doc == doc)[None, :], value, 0.0)
    return value


@triton.jit
def _pre_activation(x_ptr, x_strides, weight_ptr, bias_ptr, init_ptr, seq_ptr, batch, offs_d, mask_d, t, doc,
                    channels, length, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                    HAS_SEQ: tl.constexpr, BLOCK_D: tl.constexpr):
    """bias + sum_k weight[:, k] * x_{t - (K - 1) + k}, float32 [BLOCK_D, P], for output positions t ([P]) of
    document `doc` ([P], with seq_idx)."""
    acc = tl.zeros([BLOCK_D, t.shape[0]], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(WIDTH):
        w = tl.load(weight_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[:, None] * _load_input(x_ptr, x_strides, init_ptr, seq_ptr, batch, offs_d, mask_d,
                                        t - (WIDTH - 1) + k, doc, channels, length, WIDTH, HAS_INIT, HAS_SEQ)
    return acc


@triton.jit
def _silu_grad(pre):
    sig = tl.sigmoid(pre)
    return sig * (1.0 + pre * (1.0 - sig))


# The conv's optional inputs: a None tensor turns its HAS_* flag off. With K = 1 the initial and final states are
# (B, D, 0): nothing to read or write.
_has_bias = given_flags(HAS_BIAS="bias_ptr")
_has_init_seq = {
    **given_flags(HAS_SEQ="seq_ptr"), "HAS_INIT": lambda args: args["init_ptr"] is not None and args["WIDTH"] > 1,
}


@triton.heuristics({**_has_bias, **_has_init_seq})
@triton.jit
def _conv_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, init_ptr, seq_ptr, out_ptr,
    channels, length, stride_x_b, stride_x_d, stride_x_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """x: (B, D, L) of strides stride_x_*; out: (B, D, L); weight: (D, K); bias: (D,); init: (B, D, K - 1);
    seq: (B, L); each of bias, init, seq may be None. All but x contiguous."""
    x_strides = (stride_x_b, stride_x_d, stride_x_l)
    batch = tl.program_id(2).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < channels
    mask_t = t < length
    doc = tl.load(seq_ptr + batch * length + t, mask=mask_t, other=0) if HAS_SEQ else None
    acc = _pre_activation(x_ptr, x_strides, weight_ptr, bias_ptr, init_ptr, seq_ptr, batch, offs_d, mask_d, t, doc,
                          channels, length, WIDTH, HAS_BIAS, HAS_INIT, HAS_SEQ, BLOCK_D)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    rows = batch * channels * length + offs_d.to(tl.int64) * length
    tl.store(out_ptr + rows[:, None] + t[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_d[:, None] & mask_t[None, :])


@triton.heuristics(_has_init_seq)
@triton.jit
def _conv_final_state_kernel(
    x_ptr, init_ptr, seq_ptr, final_ptr,
    channels, length, stride_x_b, stride_x_d, stride_x_l,
    WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """final: (B, D, K - 1), the last K - 1 inputs, zero where they belong to an earlier document than the last."""
    x_strides = (stride_x_b, stride_x_d, stride_x_l)
    batch = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_K)
    mask_d = offs_d < channels
    doc = tl.load(seq_ptr + batch * length + length - 1 + 0 * j) if HAS_SEQ else None
    value = _load_input(x_ptr, x_strides, init_ptr, seq_ptr, batch, offs_d, mask_d, length - (WIDTH - 1) + j, doc,
                        channels, length, WIDTH, HAS_INIT, HAS_SEQ)
    final_rows = (batch * channels + offs_d.to(tl.int64)) * (WIDTH - 1)
    tl.store(final_ptr + final_rows[:, None] + j[None, :], value.to(final_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (j < WIDTH - 1)[None, :])


@triton.heuristics({**_has_bias, **_has_init_seq})
@triton.jit
def _conv_bwd_pre_kernel(
    x_ptr, weight_ptr, bias_ptr, init_ptr, seq_ptr, dout_ptr, gpre_ptr, dweight_ptr, dbias_ptr,
    channels, length, stride_x_b, stride_x_d, stride_x_l, stride_dout_b, stride_dout_d, stride_dout_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """The backward's first pass, over output positions t: the pre-activation gradient
    gpre_t = dout_t * act'(pre_t) into gpre (B, D, L) float32, and this program's partial sums of
    dweight (B, nP, D, K) and dbias (B, nP, D), float32. Other inputs as in `_conv_fwd_kernel`, plus dout
    (B, D, L) of strides stride_dout_*."""
    x_strides = (stride_x_b, stride_x_d, stride_x_l)
    pid_l = tl.program_id(0)
    batch = tl.program_id(2).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < channels
    mask_t = t < length
    mask = mask_d[:, None] & mask_t[None, :]
    doc = tl.load(seq_ptr + batch * length + t, mask=mask_t, other=0) if HAS_SEQ else None
    gpre = tl.load(_tile(dout_ptr, (stride_dout_b, stride_dout_d, stride_dout_l), batch, offs_d, t), mask=mask,
                   other=0.0).to(tl.float32)
    if SILU:
        pre = _pre_activation(x_ptr, x_strides, weight_ptr, bias_ptr, init_ptr, seq_ptr, batch, offs_d, mask_d, t, doc,
                              channels, length, WIDTH, HAS_BIAS, HAS_INIT, HAS_SEQ, BLOCK_D)
        gpre = gpre * _silu_grad(pre)
    rows = batch * channels * length + offs_d.to(tl.int64) * length
    tl.store(gpre_ptr + rows[:, None] + t[None, :], gpre, mask=mask)

    partial = (batch * tl.num_programs(0) + pid_l) * channels + offs_d
    for k in tl.static_range(WIDTH):  # the shifted inputs again: the first pass's loads are still in the cache
        x = _load_input(x_ptr, x_strides, init_ptr, seq_ptr, batch, offs_d, mask_d, t - (WIDTH - 1) + k, doc,
                        channels, length, WIDTH, HAS_INIT, HAS_SEQ)
        tl.store(dweight_ptr + partial * WIDTH + k, tl.sum(gpre * x, axis=1), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + partial, tl.sum(gpre, axis=1), mask=mask_d)


@triton.jit
def _input_grad(gpre_ptr, weight_ptr, seq_ptr, dfinal_ptr, batch, offs_d, mask_d, s, channels, length,
                WIDTH: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradient of the inputs at positions s ([P], may be negative: initial-state positions), from the
    pre-activation gradient gpre (B, D, L): input s feeds outputs s .. s + K - 1 of its own document."""
    src_doc = tl.load(seq_ptr + batch * length + tl.maximum(s, 0), mask=s < length, other=0) if HAS_SEQ else None
    rows = batch * channels * length + offs_d.to(tl.int64) * length
    grad = tl.zeros([BLOCK_D, s.shape[0]], dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        t = s + j  # the output that input s reaches through weight[:, K - 1 - j]
        valid = (t >= 0) & (t < length)
        if HAS_SEQ:
            doc = tl.load(seq_ptr + batch * length + t, mask=valid, other=0)
            valid = valid & (doc == src_doc)
        gpre = tl.load(gpre_ptr + rows[:, None] + t[None, :], mask=mask_d[:, None] & valid[None, :], other=0.0)
        w = tl.load(weight_ptr + offs_d * WIDTH + (WIDTH - 1 - j), mask=mask_d, other=0.0).to(tl.float32)
        grad += w[:, None] * gpre
    if HAS_DFINAL:
        # final_state[j] is input L - (K - 1) + j when it belongs to the last document
        j_final = s - (length - (WIDTH - 1))
        is_final = (j_final >= 0) & (j_final < WIDTH - 1)
        if HAS_SEQ:
            last_doc = tl.load(seq_ptr + batch * length + length - 1 + 0 * s)
            is_final = is_final & (src_doc == last_doc)
        final_rows = (batch * channels + offs_d.to(tl.int64)) * (WIDTH - 1)
        grad += tl.load(dfinal_ptr + final_rows[:, None] + j_final[None, :], mask=mask_d[:, None] & is_final[None, :],
                        other=0.0).to(tl.float32)
    return grad


@triton.heuristics({**given_flags(HAS_SEQ="seq_ptr"),
                    "HAS_INIT": lambda args: args["dinit_ptr"] is not None and args["WIDTH"] > 1,
                    "HAS_DFINAL": lambda args: args["dfinal_ptr"] is not None and args["WIDTH"] > 1})
@triton.jit
def _conv_bwd_input_kernel(
    gpre_ptr, weight_ptr, seq_ptr, dfinal_ptr, dx_ptr, dinit_ptr, channels, length,
    WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The backward's second pass, over input positions s: dx (B, D, L) and, in the first program of each row,
    dinit (B, D, K - 1), from gpre (B, D, L) float32 and dfinal (B, D, K - 1)."""
    pid_l = tl.program_id(0)
    batch = tl.program_id(2).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < channels
    grad = _input_grad(gpre_ptr, weight_ptr, seq_ptr, dfinal_ptr, batch, offs_d, mask_d, s, channels, length,
                       WIDTH, HAS_SEQ, HAS_DFINAL, BLOCK_D)
    rows = batch * channels * length + offs_d.to(tl.int64) * length
    tl.store(dx_ptr + rows[:, None] + s[None, :], grad.to(dx_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (s < length)[None, :])
    if HAS_INIT:  # the initial state's positions -(K - 1) .. -1, once per row
        if pid_l == 0:
            s_init = tl.arange(0, BLOCK_K) - (WIDTH - 1)
            grad_init = _input_grad(gpre_ptr, weight_ptr, seq_ptr, dfinal_ptr, batch, offs_d, mask_d, s_init, channels,
                                    length, WIDTH, HAS_SEQ, HAS_DFINAL, BLOCK_D)
            init_rows = (batch * channels + offs_d.to(tl.int64)) * (WIDTH - 1) + (WIDTH - 1)
            tl.store(dinit_ptr + init_rows[:, None] + s_init[None, :], grad_init.to(dinit_ptr.dtype.element_ty),
                     mask=mask_d[:, None] & (s_init < 0)[None, :])


@triton.heuristics(_has_bias)
@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, weight_ptr, bias_ptr, out_ptr,
    channels, stride_x_b, stride_state_b, stride_state_d, stride_state_k, stride_out_b,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x, out: (B, D) with unit channel stride; state: (B, D, K - 1), shifted in place; weight: (D, K)."""
    batch = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_K)
    mask_d = offs_d < channels
    in_state = mask_d[:, None] & (j < WIDTH - 1)[None, :]
    state_ptrs = state_ptr + batch * stride_state_b + offs_d[:, None] * stride_state_d + j[None, :] * stride_state_k
    x = tl.load(x_ptr + batch * stride_x_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state = tl.load(state_ptrs, mask=in_state, other=0.0).to(tl.float32)
    # the window is (state[0], ..., state[K - 2], x); the new state drops state[0] and appends x
    shifted = tl.load(state_ptrs + stride_state_k, mask=in_state & (j < WIDTH - 2)[None, :], other=0.0).to(tl.float32)
    shifted = tl.where((j == WIDTH - 2)[None, :], x[:, None], shifted)
    weight = tl.load(weight_ptr + offs_d[:, None] * WIDTH + j[None, :], mask=in_state, other=0.0).to(tl.float32)
    out = tl.sum(state * weight, axis=1)
    out += x * tl.load(weight_ptr + offs_d * WIDTH + (WIDTH - 1), mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.debug_barrier()  # every read of the old state happens before any write of the new one
    tl.store(state_ptrs, shifted.to(state_ptr.dtype.element_ty), mask=in_state)
    tl.store(out_ptr + batch * stride_out_b + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------- tiles


class ConvTiles(NamedTuple):
    """Tile sizes of the conv kernels: each program owns BLOCK_D channels by BLOCK_L positions, run by `num_warps`
    warps. The defaults were timed on an H100 (`python benchmarks/mamba_ops.py --sweep`)."""

    block_d: int = 16
    block_l: int = 128
    num_warps: int = 4


def _block_k(width: int) -> int:
    return triton.next_power_of_2(max(width - 1, 1))


# ----------------------------------------------------------------------------- custom ops (launchers)
# Custom ops for torch.compile and CUDA-graph capture, called directly in eager code, autograd in a
# `torch.autograd.Function`: see the scan's.


def _conv_fwd_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None, silu: bool, with_final_state: bool, block_d: int, block_l: int, num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out (B, D, L) and the final state (B, D, K - 1), both in x's dtype; the final state is empty
    unless `with_final_state`."""
    batch, channels, length = x.shape
    width = weight.shape[1]
    # x is read in its own layout (the mixer hands over a (B, L, D) view of the input projection); the rest is small
    weight, initial_state, seq_idx = (t.contiguous() if t is not None else None for t in (weight, initial_state, seq_idx))
    out = x.new_empty(x.shape)
    final_state = x.new_empty(batch, channels, width - 1) if with_final_state else x.new_empty(0)
    _conv_fwd_kernel[(triton.cdiv(length, block_l), triton.cdiv(channels, block_d), batch)](
        x, weight, bias, initial_state, seq_idx, out, channels, length, *x.stride(),
        WIDTH=width, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=num_warps,
    )
    if with_final_state and width > 1:
        _conv_final_state_kernel[(triton.cdiv(channels, block_d), batch)](
            x, initial_state, seq_idx, final_state, channels, length, *x.stride(),
            WIDTH=width, BLOCK_D=block_d, BLOCK_K=_block_k(width), num_warps=num_warps,
        )
    return out, final_state


_causal_conv1d_fwd = torch.library.custom_op(f"{_NS}::causal_conv1d_fwd", _conv_fwd_launch, mutates_args=())


@_causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_state, seq_idx, silu, with_final_state, block_d, block_l, num_warps):
    final_state = x.new_empty(x.shape[0], x.shape[1], weight.shape[1] - 1) if with_final_state else x.new_empty(0)
    return x.new_empty(x.shape), final_state


def _conv_bwd_launch(
    grad_out: torch.Tensor, grad_final_state: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None, silu: bool,
    block_d: int, block_l: int, num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx, d(initial_state) (empty when it is None), dweight and dbias (float32; empty when None)."""
    batch, channels, length = x.shape
    width = weight.shape[1]
    weight, initial_state, seq_idx, grad_final_state = (
        t.contiguous() if t is not None else None for t in (weight, initial_state, seq_idx, grad_final_state)
    )
    n_blocks = triton.cdiv(length, block_l)
    grid = (n_blocks, triton.cdiv(channels, block_d), batch)
    gpre = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    dweight = torch.empty(batch, n_blocks, channels, width, device=x.device, dtype=torch.float32)
    dbias = torch.empty(batch, n_blocks, channels, device=x.device, dtype=torch.float32)
    _conv_bwd_pre_kernel[grid](
        x, weight, bias, initial_state, seq_idx, grad_out, gpre, dweight, dbias,
        channels, length, *x.stride(), *grad_out.stride(),
        WIDTH=width, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=num_warps,
    )
    dx = x.new_empty(x.shape)
    dinit = initial_state.new_empty(initial_state.shape) if initial_state is not None else x.new_empty(0)
    _conv_bwd_input_kernel[grid](
        gpre, weight, seq_idx, grad_final_state, dx, dinit if initial_state is not None else None, channels, length,
        WIDTH=width, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=_block_k(width), num_warps=num_warps,
    )
    return dx, dinit, dweight.sum((0, 1)), dbias.sum((0, 1)) if bias is not None else x.new_empty(0, dtype=torch.float32)


_causal_conv1d_bwd = torch.library.custom_op(f"{_NS}::causal_conv1d_bwd", _conv_bwd_launch, mutates_args=())


@_causal_conv1d_bwd.register_fake
def _(grad_out, grad_final_state, x, weight, bias, initial_state, seq_idx, silu, block_d, block_l, num_warps):
    dinit = initial_state.new_empty(initial_state.shape) if initial_state is not None else x.new_empty(0)
    dbias = x.new_empty(weight.shape[0] if bias is not None else 0, dtype=torch.float32)
    return x.new_empty(x.shape), dinit, weight.new_empty(weight.shape, dtype=torch.float32), dbias


_conv_fwd = eager_or_op(_conv_fwd_launch, _causal_conv1d_fwd)
_conv_bwd = eager_or_op(_conv_bwd_launch, _causal_conv1d_bwd)


class _CausalConv1dTriton(torch.autograd.Function):
    """The conv's autograd: forward and backward through the two ops above. Returns out, and the final state
    (B, D, K - 1) when `return_final_state`."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, seq_idx, silu, tiles, return_final_state):
        out, final_state = _conv_fwd(x, weight, bias, initial_state, seq_idx, silu, return_final_state,
                                              *tiles)
        ctx.save_for_backward(x, weight, bias, initial_state, seq_idx)
        ctx.silu, ctx.tiles = silu, tiles
        return (out, final_state) if return_final_state else out

    @staticmethod
    def backward(ctx, grad_out, grad_final_state=None):
        x, weight, bias, initial_state, seq_idx = ctx.saved_tensors
        dx, dinit, dweight, dbias = _conv_bwd(
            grad_out, grad_final_state, x, weight, bias, initial_state, seq_idx, ctx.silu, *ctx.tiles
        )
        return (
            dx, dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None,
            dinit if initial_state is not None else None, None, None, None, None,
        )


# ----------------------------------------------------------------------------- the decoding step


@torch.library.custom_op(f"{_NS}::causal_conv1d_update", mutates_args=("conv_state",))
def _causal_conv1d_update(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
) -> torch.Tensor:
    """Returns out (B, D) and shifts x into `conv_state`. Tiles: up to 256 channels a program."""
    batch, channels = x.shape
    width = weight.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    out = x.new_empty(x.shape)
    block_d = min(triton.next_power_of_2(channels), 256)
    _conv_update_kernel[(triton.cdiv(channels, block_d), batch)](
        x, conv_state, weight, bias, out,
        channels, x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), out.stride(0),
        WIDTH=width, SILU=silu, BLOCK_D=block_d, BLOCK_K=_block_k(width), num_warps=4,
    )
    return out


@_causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, silu):
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------- public functions


def _check_conv_inputs(op, x, weight, bias, activation, **tensors):
    activation_fn(activation)  # raises ValueError for an unknown name
    require_triton_dtypes(op, x=x, weight=weight, bias=bias, **tensors)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be (channels, width), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, seq_idx=None, activation=None,
                         return_final_state=False, tiles: ConvTiles | None = None):
    """The causal depthwise convolution over a whole sequence: `mamba_conv_ref.causal_conv1d_ref`'s arguments,
    shapes and results, differentiable in x, weight, bias and initial_state; x (and its gradient) may have any
    strides. `tiles`: the kernels' tile sizes, None takes `ConvTiles()`. Takes float32, bfloat16 and float16 tensors (TypeError otherwise)."""
    _check_conv_inputs("causal_conv1d_triton", x, weight, bias, activation, initial_state=initial_state)
    if x.dim() != 3 or x.shape[1] != weight.shape[0] or x.shape[2] == 0:
        raise ValueError(
            f"x must be (batch, {weight.shape[0]}, length >= 1) for weight {tuple(weight.shape)}, got {tuple(x.shape)}"
        )
    batch, channels, length = x.shape
    if initial_state is not None and tuple(initial_state.shape) != (batch, channels, weight.shape[1] - 1):
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)}, expected {(batch, channels, weight.shape[1] - 1)}"
        )
    if seq_idx is not None and tuple(seq_idx.shape) != (batch, length):
        raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)}, expected {(batch, length)}")
    # contiguous here, not only inside the op: autograd then saves the copies, and the backward makes none again.
    # x stays in its layout: the kernels read any strides.
    weight, initial_state, seq_idx = (t.contiguous() if t is not None else None for t in (weight, initial_state, seq_idx))
    return _CausalConv1dTriton.apply(x, weight, bias, initial_state, seq_idx, activation is not None,
                                     tiles or ConvTiles(), bool(return_final_state))


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None):
    """One decoding step, shifting `x` into `conv_state` in place: `mamba_conv_ref.causal_conv1d_update_ref`'s
    arguments, shapes and result."""
    _check_conv_inputs("causal_conv1d_update_triton", x, weight, bias, activation, conv_state=conv_state)
    expected = (x.shape[0], weight.shape[0], weight.shape[1] - 1)
    if x.dim() != 2 or x.shape[1] != weight.shape[0] or tuple(conv_state.shape) != expected:
        raise ValueError(
            f"x must be (batch, {weight.shape[0]}) and conv_state {expected} for weight {tuple(weight.shape)}, "
            f"got x {tuple(x.shape)} and conv_state {tuple(conv_state.shape)}"
        )
    return _causal_conv1d_update(x, conv_state, weight, bias, activation is not None)
