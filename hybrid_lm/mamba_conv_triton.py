"""Causal depthwise conv1d of the Mamba mixer: the Triton tier, forward, backward and the decoding step.

Shape legend: B = batch, D = channels, L = length, K = kernel width (at most 9 here), P = positions per program.
The op's contract is the docstring of mamba_conv_ref.py, whose `causal_conv1d_ref` / `causal_conv1d_update_ref`
this file's public functions mirror:

    out_t[d] = act(bias[d] + sum_k weight[d, k] * x_{t - (K - 1) + k}[d])

with inputs before the sequence taken from `initial_state` (document of the row's first token) and,
under `seq_idx`, inputs of another document counted as zero. Arithmetic is float32; outputs are
rounded once to x's dtype.

Each program owns a [BLOCK_D, P] tile of positions. A tile shifted by one position is not 16-byte aligned, so the
K shifted views the formula needs cannot be loaded as vectors, and Triton has no shift of a tile held in registers.
So each tile is loaded whole (three tiles in all: the previous, this and the next 8 positions, all aligned) and
split in registers into its 8 *components*: component e holds positions 8g + e of each group g of 8 positions.
Position 8g + m is then component m of this group for 0 <= m < 8, component m + 8 of the tile 8 positions back for
m < 0 and component m - 8 of the tile 8 positions on for m >= 8, so every shifted view is a component, and each
output component is a sum of K of them. The backward runs in one pass: it recomputes the pre-activation
gradient at this group's 8 positions and the next group's first K - 1, from which each input gathers its gradient
(the outputs s .. s + K - 1 it feeds). Each backward program walks a few consecutive tiles and keeps its partial
dweight / dbias in registers; a small second kernel adds the partials up in a fixed order (deterministic, no
atomics) and writes them in the weights' dtypes. The shifted tiles overlap this program's and its neighbours' own,
which the cache holds, so the DRAM traffic is about that of the formula: x read once forward; x and dout read, dx
written, once backward.
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

# The widest kernel the component scheme takes: K - 1 earlier positions must lie within one group of 8.
MAX_WIDTH = 9


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile(ptr, strides, batch, offs_d, t):
    """Pointers to [batch, offs_d, t] ([BLOCK_D, P]) of a (B, D, L) tensor of `strides` (b, d, l): x and dout
    are read in any layout, such as the (B, L, D) one of the input projection's output."""
    stride_b, stride_d, stride_l = strides
    return ptr + batch * stride_b + offs_d.to(tl.int64)[:, None] * stride_d + t.to(tl.int64)[None, :] * stride_l


@triton.jit
def _inputs(x_ptr, x_strides, init_ptr, batch, offs_d, mask_d, p, channels, length, WIDTH: tl.constexpr,
            HAS_INIT: tl.constexpr):
    """x[batch, offs_d, p] as float32 [BLOCK_D, P]: from initial_state where -(K - 1) <= p < 0, zero where p is
    outside [-(K - 1), L)."""
    inside = (p >= 0) & (p < length)
    value = tl.load(_tile(x_ptr, x_strides, batch, offs_d, p), mask=mask_d[:, None] & inside[None, :], other=0.0)
    value = value.to(tl.float32)
    if HAS_INIT:
        before = (p < 0) & (p >= 1 - WIDTH)
        init_rows = (batch * channels + offs_d.to(tl.int64)) * (WIDTH - 1) + (WIDTH - 1)
        value += tl.load(init_ptr + init_rows[:, None] + p[None, :], mask=mask_d[:, None] & before[None, :],
                         other=0.0).to(tl.float32)
    return value


@triton.jit
def _documents(seq_ptr, batch, p, length):
    """seq_idx[batch, p] as [1, P]; positions before the sequence belong to its first document (the carried-in
    state's); positions past its end are ids of no consequence (their inputs and output gradients are zero)."""
    return tl.load(seq_ptr + batch * length + tl.maximum(p, 0), mask=p < length, other=0)[None, :]


@triton.jit
def _split8(v):
    """[R, 8G] -> its 8 components [R, G], component e holding positions 8g + e. In a loaded bf16 / fp16 tile each
    thread holds 8 consecutive positions (one 16-byte vector), so the split moves no data between threads (for
    float32 tiles, 4 a vector, the compiler moves half of them through shared memory)."""
    v = tl.reshape(v, (v.shape[0], v.shape[1] // 8, 2, 2, 2))  # position 8g + 4a + 2b + c
    c0, c1 = tl.split(v)
    c0b0, c0b1 = tl.split(c0)
    c1b0, c1b1 = tl.split(c1)
    e0, e4 = tl.split(c0b0)
    e2, e6 = tl.split(c0b1)
    e1, e5 = tl.split(c1b0)
    e3, e7 = tl.split(c1b1)
    return e0, e1, e2, e3, e4, e5, e6, e7


@triton.jit
def _join8(parts):
    """The inverse of `_split8`: 8 components [R, G] -> [R, 8G]."""
    c0 = tl.join(tl.join(parts[0], parts[4]), tl.join(parts[2], parts[6]))
    c1 = tl.join(tl.join(parts[1], parts[5]), tl.join(parts[3], parts[7]))
    v = tl.join(c0, c1)
    return tl.reshape(v, (v.shape[0], v.shape[1] * 8))


@triton.jit
def _at(before, here, after, m: tl.constexpr):
    """Position 8g + m of each group g (-8 <= m < 16), from the components of the tiles 8 positions back, here and
    8 positions on."""
    if m < 0:
        return before[m + 8]
    elif m < 8:
        return here[m]
    else:
        return after[m - 8]


@triton.jit
def _weights(weight_ptr, offs_d, mask_d, WIDTH: tl.constexpr):
    """weight[offs_d, k] for k = 0 .. K - 1: a tuple of K float32 [BLOCK_D], loaded once per program."""
    weights = ()
    for k in tl.static_range(WIDTH):
        weights = weights + (tl.load(weight_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32),)
    return weights


@triton.jit
def _pre_activation(xs, docs, weights, bias, m: tl.constexpr, WIDTH: tl.constexpr, HAS_SEQ: tl.constexpr):
    """bias + sum_k weight[:, k] * x at 8g + m - (K - 1) + k, float32 [BLOCK_D, G]; xs and docs are the (before,
    here, after) components of x and (with seq_idx) of the document ids."""
    acc = bias
    for k in tl.static_range(WIDTH):  # the input at 8g + m - (K - 1) + k
        x = _at(xs[0], xs[1], xs[2], m - (WIDTH - 1) + k)
        if HAS_SEQ:
            same = _at(docs[0], docs[1], docs[2], m - (WIDTH - 1) + k) == _at(docs[0], docs[1], docs[2], m)
            x = tl.where(same, x, 0.0)
        acc += weights[k][:, None] * x
    return acc


@triton.jit
def _silu_grad(pre):
    sig = 1.0 / (1.0 + tl.exp2(pre * -1.4426950408889634))  # sigmoid, the sign folded into the log2(e) factor
    return sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _program_tile(BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, channels):
    """This program's batch row, channels [BLOCK_D] (and their mask) and first position."""
    batch = tl.program_id(2).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return batch, offs_d, offs_d < channels, tl.program_id(0) * BLOCK_L


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
    seq: (B, L); each of bias, init, seq may be None. All but x contiguous. BLOCK_L: a multiple of 8."""
    x_strides = (stride_x_b, stride_x_d, stride_x_l)
    batch, offs_d, mask_d, t0 = _program_tile(BLOCK_D, BLOCK_L, channels)
    t = t0 + tl.arange(0, BLOCK_L)
    here = _split8(_inputs(x_ptr, x_strides, init_ptr, batch, offs_d, mask_d, t, channels, length, WIDTH, HAS_INIT))
    before = _split8(_inputs(x_ptr, x_strides, init_ptr, batch, offs_d, mask_d, t - 8, channels, length, WIDTH,
                             HAS_INIT))
    xs = (before, here, here)  # outputs read no later inputs: the third slot is never taken
    docs = xs  # unused without seq_idx
    if HAS_SEQ:
        docs_here = _split8(_documents(seq_ptr, batch, t, length))
        docs = (_split8(_documents(seq_ptr, batch, t - 8, length)), docs_here, docs_here)
    bias = tl.zeros([BLOCK_D, BLOCK_L // 8], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    weights = _weights(weight_ptr, offs_d, mask_d, WIDTH)
    out = ()
    for e in tl.static_range(8):
        acc = _pre_activation(xs, docs, weights, bias, e, WIDTH, HAS_SEQ)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        out = out + (acc,)
    rows = batch * channels * length + offs_d.to(tl.int64) * length
    tl.store(out_ptr + rows[:, None] + t[None, :], _join8(out).to(out_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (t < length)[None, :])


@triton.heuristics(_has_init_seq)
@triton.jit
def _conv_final_state_kernel(
    x_ptr, init_ptr, seq_ptr, final_ptr,
    channels, length, stride_x_b, stride_x_d, stride_x_l,
    WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """final: (B, D, K - 1), the last K - 1 inputs, zero where they belong to an earlier document than the last."""
    batch = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_K)
    mask_d = offs_d < channels
    p = length - (WIDTH - 1) + j
    value = _inputs(x_ptr, (stride_x_b, stride_x_d, stride_x_l), init_ptr, batch, offs_d, mask_d, p, channels,
                    length, WIDTH, HAS_INIT)
    if HAS_SEQ:
        last = _documents(seq_ptr, batch, length - 1 + 0 * j, length)
        value = tl.where(_documents(seq_ptr, batch, p, length) == last, value, 0.0)
    final_rows = (batch * channels + offs_d.to(tl.int64)) * (WIDTH - 1)
    tl.store(final_ptr + final_rows[:, None] + j[None, :], value.to(final_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (j < WIDTH - 1)[None, :])


@triton.heuristics({**_has_bias, **_has_init_seq, "HAS_DFINAL": lambda args: args["dfinal_ptr"] is not None
                    and args["WIDTH"] > 1})
@triton.jit
def _conv_bwd_kernel(
    x_ptr, weight_ptr, bias_ptr, init_ptr, seq_ptr, dout_ptr, dfinal_ptr, dx_ptr, dinit_ptr, dweight_ptr, dbias_ptr,
    channels, length, stride_x_b, stride_x_d, stride_x_l, stride_dout_b, stride_dout_d, stride_dout_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_DFINAL: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    TILES: tl.constexpr,
):
    """The backward over input positions s of TILES consecutive tiles: dx (B, D, L) and, in the first program of
    each row, dinit (B, D, K - 1); this program's partial sums of dweight (B, nP, D, K) and (with a bias) dbias
    (B, nP, D), float32. dout (B, D, L) of strides stride_dout_*; dfinal (B, D, K - 1) or None; other inputs as in
    `_conv_fwd_kernel`. Input s feeds outputs s .. s + K - 1 of its own document, whose pre-activation gradients
    dout_t * act'(pre_t) are recomputed here: this group's 8 and the next group's first K - 1."""
    x_strides = (stride_x_b, stride_x_d, stride_x_l)
    dout_strides = (stride_dout_b, stride_dout_d, stride_dout_l)
    batch, offs_d, mask_d, start = _program_tile(BLOCK_D, BLOCK_L * TILES, channels)
    bias = tl.zeros([BLOCK_D, BLOCK_L // 8], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    weights = _weights(weight_ptr, offs_d, mask_d, WIDTH)
    # this program's dweight[:, k] and dbias, summed over the tiles it walks position by position, and over
    # positions only at the end
    dweight = ()
    for k in tl.static_range(WIDTH):
        dweight = dweight + (tl.zeros([BLOCK_D, BLOCK_L // 8], dtype=tl.float32),)
    dbias = tl.zeros([BLOCK_D, BLOCK_L // 8], dtype=tl.float32)
    for tile in range(tl.minimum(TILES, tl.cdiv(length - start, BLOCK_L))):
        t = start + tile * BLOCK_L + tl.arange(0, BLOCK_L)
        xs = (
            _split8(_inputs(x_ptr, x_strides, init_ptr, batch, offs_d, mask_d, t - 8, channels, length, WIDTH,
                            HAS_INIT)),
            _split8(_inputs(x_ptr, x_strides, init_ptr, batch, offs_d, mask_d, t, channels, length, WIDTH, HAS_INIT)),
            _split8(_inputs(x_ptr, x_strides, init_ptr, batch, offs_d, mask_d, t + 8, channels, length, WIDTH,
                            HAS_INIT)),
        )
        douts = ()
        for shift in tl.static_range(2):
            p = t + 8 * shift
            inside = mask_d[:, None] & (p < length)[None, :]
            douts = douts + (_split8(tl.load(_tile(dout_ptr, dout_strides, batch, offs_d, p), mask=inside,
                                             other=0.0).to(tl.float32)),)
        docs = xs  # unused without seq_idx
        if HAS_SEQ:
            docs = (_split8(_documents(seq_ptr, batch, t - 8, length)), _split8(_documents(seq_ptr, batch, t, length)),
                    _split8(_documents(seq_ptr, batch, t + 8, length)))

        gpre = ()  # dL/d(pre) at 8g + m, m = 0 .. 8 + K - 2
        for m in tl.static_range(8 + WIDTH - 1):
            g = _at(douts[0], douts[0], douts[1], m)  # m >= 0: the first slot is never taken
            if SILU:
                g = g * _silu_grad(_pre_activation(xs, docs, weights, bias, m, WIDTH, HAS_SEQ))
            gpre = gpre + (g,)

        dx = ()
        for e in tl.static_range(8):
            grad = tl.zeros([BLOCK_D, BLOCK_L // 8], dtype=tl.float32)
            for j in tl.static_range(WIDTH):  # the output at 8g + e + j, through weight[:, K - 1 - j]
                g = gpre[e + j]
                if HAS_SEQ:
                    g = tl.where(_at(docs[0], docs[1], docs[2], e + j) == docs[1][e], g, 0.0)
                grad += weights[WIDTH - 1 - j][:, None] * g
            dx = dx + (grad,)
        grad = _join8(dx)
        if HAS_DFINAL:  # final_state[j] is input L - (K - 1) + j when it belongs to the last document
            j_final = t - (length - (WIDTH - 1))
            is_final = (j_final >= 0) & (j_final < WIDTH - 1)
            if HAS_SEQ:
                last = _documents(seq_ptr, batch, length - 1 + 0 * t, length)
                is_final = is_final[None, :] & (_join8(docs[1]) == last)  # the documents of t, loaded above
            else:
                is_final = is_final[None, :]
            final_rows = (batch * channels + offs_d.to(tl.int64)) * (WIDTH - 1)
            grad += tl.load(dfinal_ptr + final_rows[:, None] + j_final[None, :], mask=mask_d[:, None] & is_final,
                            other=0.0).to(tl.float32)
        rows = batch * channels * length + offs_d.to(tl.int64) * length
        tl.store(dx_ptr + rows[:, None] + t[None, :], grad.to(dx_ptr.dtype.element_ty),
                 mask=mask_d[:, None] & (t < length)[None, :])

        summed = ()
        for k in tl.static_range(WIDTH):
            products = dweight[k]
            for e in tl.static_range(8):
                x = _at(xs[0], xs[1], xs[2], e - (WIDTH - 1) + k)
                if HAS_SEQ:
                    x = tl.where(_at(docs[0], docs[1], docs[2], e - (WIDTH - 1) + k) == docs[1][e], x, 0.0)
                products += gpre[e] * x
            summed = summed + (products,)
        dweight = summed
        if HAS_BIAS:
            for e in tl.static_range(8):
                dbias += gpre[e]
        if HAS_INIT:  # the initial state's positions -(K - 1) + i, i = 0 .. K - 2, once per row
            if start + tile * BLOCK_L == 0:
                first = (tl.arange(0, BLOCK_L // 8) == 0)[None, :]  # group 0: positions 0 .. 7
                init_rows = (batch * channels + offs_d.to(tl.int64)) * (WIDTH - 1)
                for i in tl.static_range(WIDTH - 1):
                    grad_init = tl.zeros([BLOCK_D, BLOCK_L // 8], dtype=tl.float32)
                    for j in tl.static_range(WIDTH - 1 - i, WIDTH):  # outputs i - (K - 1) + j >= 0
                        g = gpre[i - (WIDTH - 1) + j]
                        if HAS_SEQ:
                            g = tl.where(docs[1][i - (WIDTH - 1) + j] == docs[1][0], g, 0.0)
                        grad_init += weights[WIDTH - 1 - j][:, None] * g
                    grad_init = tl.sum(tl.where(first, grad_init, 0.0), axis=1)
                    if HAS_DFINAL:  # with L < K - 1 the final state holds initial-state inputs too
                        slot = i - length + 0 * offs_d  # this input's slot in the final state
                        in_final = mask_d & (slot >= 0) & (slot < WIDTH - 1)
                        if HAS_SEQ:
                            first_doc = tl.load(seq_ptr + batch * length + 0 * offs_d)
                            last_doc = tl.load(seq_ptr + batch * length + length - 1 + 0 * offs_d)
                            in_final = in_final & (first_doc == last_doc)
                        grad_init += tl.load(dfinal_ptr + init_rows + slot, mask=in_final, other=0.0).to(tl.float32)
                    tl.store(dinit_ptr + init_rows + i, grad_init.to(dinit_ptr.dtype.element_ty), mask=mask_d)

    partial = (batch * tl.num_programs(0) + tl.program_id(0)) * channels + offs_d
    for k in tl.static_range(WIDTH):
        tl.store(dweight_ptr + partial * WIDTH + k, tl.sum(dweight[k], axis=1), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + partial, tl.sum(dbias, axis=1), mask=mask_d)


@triton.heuristics(given_flags(HAS_BIAS="dbias_ptr"))
@triton.jit
def _conv_bwd_sum_kernel(
    partial_dweight_ptr, partial_dbias_ptr, dweight_ptr, dbias_ptr, partials, channels,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dweight (D, K) and dbias (D,) in their own dtypes: the sums over the backward programs' float32 partials
    (partials, D, K) and (partials, D), in a fixed order."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, BLOCK_K)[None, :]
    mask_d = offs_d < channels
    mask = mask_d[:, None] & (k < WIDTH)
    dweight = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for partial in range(partials):
        rows = partial * channels + offs_d
        dweight += tl.load(partial_dweight_ptr + rows[:, None] * WIDTH + k, mask=mask, other=0.0)
        if HAS_BIAS:
            dbias += tl.load(partial_dbias_ptr + rows, mask=mask_d, other=0.0)
    tl.store(dweight_ptr + offs_d[:, None] * WIDTH + k, dweight.to(dweight_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + offs_d, dbias.to(dbias_ptr.dtype.element_ty), mask=mask_d)


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
    """Tile sizes of the conv kernels: each program owns BLOCK_D channels by BLOCK_L positions (a multiple of 8), run
    by `num_warps` warps forward and `backward_warps` backward; a backward program walks `backward_tiles`
    consecutive tiles, summing its partial dweight and dbias in registers. The defaults were timed on an H100
    (`python benchmarks/mamba_ops.py --sweep`): one 16-byte vector of a tile per thread backward."""

    block_d: int = 16
    block_l: int = 128
    num_warps: int = 4
    backward_warps: int = 8
    backward_tiles: int = 8


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
    block_d: int, block_l: int, num_warps: int, backward_tiles: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx, d(initial_state) (empty when it is None), dweight and dbias (in their tensors' dtypes; dbias
    empty when bias is None)."""
    batch, channels, length = x.shape
    width = weight.shape[1]
    weight, initial_state, seq_idx, grad_final_state = (
        t.contiguous() if t is not None else None for t in (weight, initial_state, seq_idx, grad_final_state)
    )
    n_programs = triton.cdiv(length, block_l * backward_tiles)
    dx = x.new_empty(x.shape)
    dinit = initial_state.new_empty(initial_state.shape) if initial_state is not None else x.new_empty(0)
    partial_dweight = torch.empty(batch, n_programs, channels, width, device=x.device, dtype=torch.float32)
    partial_dbias = (torch.empty(batch, n_programs, channels, device=x.device, dtype=torch.float32)
                     if bias is not None else None)
    _conv_bwd_kernel[(n_programs, triton.cdiv(channels, block_d), batch)](
        x, weight, bias, initial_state, seq_idx, grad_out, grad_final_state, dx,
        dinit if initial_state is not None else None, partial_dweight, partial_dbias,
        channels, length, *x.stride(), *grad_out.stride(),
        WIDTH=width, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l, TILES=backward_tiles, num_warps=num_warps,
    )
    dweight = weight.new_empty(weight.shape)
    dbias = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    sum_block_d = min(triton.next_power_of_2(channels), 128)
    _conv_bwd_sum_kernel[(triton.cdiv(channels, sum_block_d),)](
        partial_dweight, partial_dbias, dweight, dbias if bias is not None else None, batch * n_programs, channels,
        WIDTH=width, BLOCK_D=sum_block_d, BLOCK_K=triton.next_power_of_2(width),
    )
    return dx, dinit, dweight, dbias


_causal_conv1d_bwd = torch.library.custom_op(f"{_NS}::causal_conv1d_bwd", _conv_bwd_launch, mutates_args=())


@_causal_conv1d_bwd.register_fake
def _(grad_out, grad_final_state, x, weight, bias, initial_state, seq_idx, silu, block_d, block_l, num_warps,
      backward_tiles):
    dinit = initial_state.new_empty(initial_state.shape) if initial_state is not None else x.new_empty(0)
    dbias = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), dinit, weight.new_empty(weight.shape), dbias


_conv_fwd = eager_or_op(_conv_fwd_launch, _causal_conv1d_fwd)
_conv_bwd = eager_or_op(_conv_bwd_launch, _causal_conv1d_bwd)


class _CausalConv1dTriton(torch.autograd.Function):
    """The conv's autograd: forward and backward through the two ops above. Returns out, and the final state
    (B, D, K - 1) when `return_final_state`."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, seq_idx, silu, tiles, return_final_state):
        out, final_state = _conv_fwd(x, weight, bias, initial_state, seq_idx, silu, return_final_state,
                                     tiles.block_d, tiles.block_l, tiles.num_warps)
        ctx.save_for_backward(x, weight, bias, initial_state, seq_idx)
        ctx.silu, ctx.tiles = silu, tiles
        return (out, final_state) if return_final_state else out

    @staticmethod
    def backward(ctx, grad_out, grad_final_state=None):
        x, weight, bias, initial_state, seq_idx = ctx.saved_tensors
        dx, dinit, dweight, dbias = _conv_bwd(
            grad_out, grad_final_state, x, weight, bias, initial_state, seq_idx, ctx.silu, ctx.tiles.block_d,
            ctx.tiles.block_l, ctx.tiles.backward_warps, ctx.tiles.backward_tiles,
        )
        return (
            dx, dweight, dbias if bias is not None else None, dinit if initial_state is not None else None,
            None, None, None, None,
        )


# ----------------------------------------------------------------------------- the decoding step


def _conv_update_launch(
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


_causal_conv1d_update = torch.library.custom_op(
    f"{_NS}::causal_conv1d_update", _conv_update_launch, mutates_args=("conv_state",)
)


@_causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, silu):
    return x.new_empty(x.shape)


_conv_update = eager_or_op(_conv_update_launch, _causal_conv1d_update)


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
    strides, and are read fastest with unit stride along L. Kernel widths up to MAX_WIDTH (ValueError beyond).
    `tiles`: the kernels' tile sizes, None takes `ConvTiles()`. Takes float32, bfloat16 and float16 tensors (TypeError otherwise)."""
    _check_conv_inputs("causal_conv1d_triton", x, weight, bias, activation, initial_state=initial_state)
    if x.dim() != 3 or x.shape[1] != weight.shape[0] or x.shape[2] == 0:
        raise ValueError(
            f"x must be (batch, {weight.shape[0]}, length >= 1) for weight {tuple(weight.shape)}, got {tuple(x.shape)}"
        )
    batch, channels, length = x.shape
    if weight.shape[1] > MAX_WIDTH:
        raise ValueError(f"causal_conv1d_triton takes kernel widths up to {MAX_WIDTH}, got {weight.shape[1]}; "
                         "use mamba_conv_ref.causal_conv1d_ref (kernel_backend='torch') for wider kernels")
    tiles = tiles or ConvTiles()
    if tiles.block_l % 8:
        raise ValueError(f"the conv tiles' block_l must be a multiple of 8 positions, got {tiles.block_l}")
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
                                     tiles, bool(return_final_state))


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
    return _conv_update(x, conv_state, weight, bias, activation is not None)
