"""Selective state-space scan (Mamba-1): the Triton tier, forward, backward and the decoding step.

Shape legend: B = batch, D = channels (d_inner), L = length, N = d_state, T = chunk length,
nc = number of chunks = ceil(L / T).
The op's contract (the recurrence, every argument and shape) is the docstring of mamba_scan_ref.py, whose
`selective_scan_ref` / `selective_state_update_ref` this file's public functions mirror: dt bias + softplus, D skip, silu(z) gate, initial state, final state and state
resets where `seq_idx` changes are all fused. State and accumulation are float32 whatever the input
dtype (bf16, fp16, fp32; float64 is the torch tier's job).

Layout of the work: one program (one warp) per (block of BLOCK_D channels, batch row) walks the
sequence in chunks of T steps. For each chunk it loads [BLOCK_D, T] tiles of u, delta (and z) once, then loops
over the N states: builds the decays a = exp(delta * A[:, n]) and inputs b = delta * u * B[n] as
[BLOCK_D, T] tiles and solves h_t = a_t * h_{t-1} + b_t with `tl.associative_scan` along T. The state
that carries one chunk into the next goes through a small float32 buffer `states` (B, nc + 1, N, D):
slot c holds the state before chunk c, so it doubles as the checkpoint the backward pass recomputes
a chunk from, slot 0 is the initial state and slot nc the final one.

The backward walks chunks in reverse with the same tiles: recompute a chunk's states from its slot,
solve the adjoint lam_t = g_t * C_t + a_{t+1} * lam_{t+1} with a reversed scan (carried between
chunks through a second buffer like `states`), and form every gradient from h and lam. dB and dC are
sums over channels: each program reduces its BLOCK_D rows and adds into float32 buffers atomically.
dA, dD and the dt bias get per-program partial sums that torch adds up afterwards.
"""

from typing import NamedTuple

import torch

try:  # transformers' remote-code checks skip imports inside try blocks; mamba_kernels reports the absence
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton kernels need triton: pip install triton") from error

from .custom_ops import eager_or_op, given_flags, op_namespace, require_triton_dtypes

_NS = op_namespace(__name__)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _first_order_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): x -> a2 * (a1 * x + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|); log1p(w) = log(1 + w) * w / ((1 + w) - 1) keeps small w exact
    w = tl.exp(-tl.abs(x))
    one_plus = 1.0 + w
    log1p = tl.where(one_plus == 1.0, w, tl.log(one_plus) * w / (one_plus - 1.0))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)


@triton.jit
def _load_dt(delta_ptr, offsets, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Returns (dt after bias and softplus, zero where masked; dt before softplus)."""
    raw = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _program_rows(D_ptr, bias_ptr, channels, length, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's batch row, channels offs_d ([BLOCK_D]) and their mask, the step offsets within a chunk
    offs_j ([T]), the channels' row offsets into (B, D, L) tensors, and their dt bias and D skip (float32)."""
    batch = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_T)
    mask_d = offs_d < channels
    rows = batch * channels * length + offs_d.to(tl.int64) * length
    # zeros, not None, for an absent input: Triton's compiler (unlike its interpreter) rejects a None from `x if
    # FLAG else None` inside a called function; the kernels read them only under their flags
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return batch, offs_d, offs_j, mask_d, rows, bias, skip


@triton.jit
def _load_chunk(u_ptr, delta_ptr, rows, offs_j, mask_d, chunk, length, bias, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Chunk `chunk` of a program's rows: its steps t and their mask ([T]), the tile's mask and offsets into the
    (B, D, L) tensors, and u and dt (after bias and softplus) as float32 [BLOCK_D, T] tiles."""
    t = chunk * BLOCK_T + offs_j
    mask_t = t < length
    mask = mask_d[:, None] & mask_t[None, :]
    offsets = rows[:, None] + t[None, :]
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dt, _ = _load_dt(delta_ptr, offsets, mask, bias, HAS_BIAS, SOFTPLUS)
    return t, mask_t, mask, offsets, u, dt


@triton.jit
def _gate_grad(dout_ptr, z_ptr, offsets, mask, HAS_Z: tl.constexpr):
    """dL/dy from dL/dout, out = y * silu(z)."""
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dout = dout * z * tl.sigmoid(z)
    return dout


@triton.jit
def _resets(seq_ptr, batch, t, length):
    """[T] bool, True where seq_idx[batch, t] != seq_idx[batch, t - 1] (never at t = 0 or past the end)."""
    inside = (t > 0) & (t < length)
    row = seq_ptr + batch * length
    current = tl.load(row + t, mask=inside, other=0)
    previous = tl.load(row + t - 1, mask=inside, other=0)
    return inside & (current != previous)


@triton.jit
def _state_inputs(A_ptr, B_ptr, C_ptr, slot_ptr, n, d_state, channels, length, BC_row, offs_d, t, mask_d, mask_t):
    """A[:, n] ([BLOCK_D]), B[n] and C[n] over the chunk ([T]) and column n of a states slot ([BLOCK_D]);
    zeros for n = N, the prefetch past the last state."""
    mask_d = mask_d & (offs_d * 0 + n < d_state)
    mask_t = mask_t & (t * 0 + n < d_state)
    A_n = tl.load(A_ptr + offs_d * d_state + n, mask=mask_d, other=0.0)
    B_n = tl.load(B_ptr + BC_row + n * length + t, mask=mask_t, other=0.0).to(tl.float32)
    C_n = tl.load(C_ptr + BC_row + n * length + t, mask=mask_t, other=0.0).to(tl.float32)
    slot_n = tl.load(slot_ptr + n * channels, mask=mask_d, other=0.0)
    return A_n, B_n, C_n, slot_n


@triton.jit
def _fill_slot(slot_ptr, value_ptr, batch, offs_d, mask_d, channels, d_state, HAS_VALUE: tl.constexpr):
    """Writes a (B, D, N) state (`value_ptr`, contiguous; zeros when absent) into the (N, D) float32 slot of this
    program's channels."""
    for n in range(d_state):
        value = tl.zeros(offs_d.shape, dtype=tl.float32)
        if HAS_VALUE:
            value = tl.load(value_ptr + batch * channels * d_state + offs_d * d_state + n, mask=mask_d,
                            other=0.0).to(tl.float32)
        tl.store(slot_ptr + n * channels, value, mask=mask_d)


# the scan's optional inputs: a None tensor turns its flag off (Triton compiles one variant per combination)
_scan_flags = triton.heuristics(given_flags(HAS_D="D_ptr", HAS_Z="z_ptr", HAS_BIAS="bias_ptr", HAS_SEQ="seq_ptr"))


@_scan_flags
@triton.heuristics(given_flags(HAS_INIT="init_ptr"))
@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, init_ptr,
    out_ptr, states_ptr,
    channels, length, d_state,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """u, delta, z, out: (B, D, L); A: (D, N) float32; B, C: (B, N, L); D, bias: (D,) or None; seq: (B, L) or
    None; init: the initial state (B, D, N) or None (zeros); states: (B, nc + 1, N, D) float32, written here (slot
    0 from init). All contiguous."""
    batch, offs_d, offs_j, mask_d, rows, bias, skip = _program_rows(D_ptr, bias_ptr, channels, length, HAS_D, HAS_BIAS,
                                                                    BLOCK_D, BLOCK_T)
    BC_row = batch * d_state * length
    n_chunks = tl.cdiv(length, BLOCK_T)
    slot_size = d_state * channels
    states_row = states_ptr + batch * (n_chunks + 1) * slot_size + offs_d
    last = (offs_j == BLOCK_T - 1)[None, :]
    _fill_slot(states_row, init_ptr, batch, offs_d, mask_d, channels, d_state, HAS_INIT)

    for chunk in range(n_chunks):
        t, mask_t, mask, offsets, u, dt = _load_chunk(u_ptr, delta_ptr, rows, offs_j, mask_d, chunk, length, bias,
                                                      HAS_BIAS, SOFTPLUS, BLOCK_T)
        dtu = dt * u
        reset = _resets(seq_ptr, batch, t, length)[None, :] if HAS_SEQ else None
        y = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        # slot `chunk` was written by other threads in the previous iteration
        tl.debug_barrier()
        slot = states_row + chunk * slot_size
        A_n, B_n, C_n, h0 = _state_inputs(A_ptr, B_ptr, C_ptr, slot, 0, d_state, channels, length, BC_row, offs_d, t,
                                          mask_d, mask_t)
        for n in range(d_state):
            # the next state's loads go out before this state's arithmetic, which hides their latency
            A_next, B_next, C_next, h0_next = _state_inputs(A_ptr, B_ptr, C_ptr, slot, n + 1, d_state, channels,
                                                            length, BC_row, offs_d, t, mask_d, mask_t)
            a = tl.exp2(dt * (A_n * 1.4426950408889634)[:, None])
            if HAS_SEQ:
                a = tl.where(reset, 0.0, a)
            decay, h = tl.associative_scan((a, dtu * B_n[None, :]), axis=1, combine_fn=_first_order_combine)
            h += decay * h0[:, None]  # the chunk's start state enters after the scan, which need not wait for it
            y += h * C_n[None, :]
            # past the end a = 1 and b = 0, so the last column is the state after this chunk. A masked
            # store of the column would move the whole tile through shared memory: reduce instead.
            h_last = tl.sum(tl.where(last, h, 0.0), axis=1)
            tl.store(states_row + (chunk + 1) * slot_size + n * channels, h_last, mask=mask_d)
            A_n, B_n, C_n, h0 = A_next, B_next, C_next, h0_next
        if HAS_D:
            y += u * skip[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@_scan_flags
@triton.heuristics(given_flags(HAS_DFINAL="dfinal_ptr"))
@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, dout_ptr, dfinal_ptr, states_ptr,
    adjoint_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    channels, length, d_state,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
):
    """Inputs as in `_scan_fwd_kernel`, plus dout (B, D, L), the final state's gradient dfinal (B, D, N) or None
    (zeros), and the forward's `states`. adjoint: (B, nc + 1, N, D) float32, written here: slot nc from dfinal,
    slot c dL/d(state before chunk c), so slot 0 ends as the initial state's gradient.
    du, ddelta, dz: (B, D, L) in the inputs' dtypes.  dB, dC: (B, N, L), dA: (D, N), dD, dbias: (D,), float32,
    zeroed, added into (dz, dD, dbias None when z, D, bias are)."""
    batch, offs_d, offs_j, mask_d, rows, bias, skip = _program_rows(D_ptr, bias_ptr, channels, length, HAS_D, HAS_BIAS,
                                                                    BLOCK_D, BLOCK_T)
    BC_row = batch * d_state * length
    n_chunks = tl.cdiv(length, BLOCK_T)
    slot_size = d_state * channels
    states_row = states_ptr + batch * (n_chunks + 1) * slot_size + offs_d
    adjoint_row = adjoint_ptr + batch * (n_chunks + 1) * slot_size + offs_d
    first = (offs_j == 0)[None, :]
    _fill_slot(adjoint_row + n_chunks * slot_size, dfinal_ptr, batch, offs_d, mask_d, channels, d_state, HAS_DFINAL)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    for chunk_from_end in range(n_chunks):
        chunk = n_chunks - 1 - chunk_from_end
        t, mask_t, mask, offsets, u, dt = _load_chunk(u_ptr, delta_ptr, rows, offs_j, mask_d, chunk, length, bias,
                                                      HAS_BIAS, SOFTPLUS, BLOCK_T)
        dtu = dt * u
        # the adjoint needs a_{t+1}: recompute it from delta one step ahead rather than shift a tile
        mask_next = mask_d[:, None] & (t + 1 < length)[None, :]
        dt_next, _ = _load_dt(delta_ptr, offsets + 1, mask_next, bias, HAS_BIAS, SOFTPLUS)
        if HAS_SEQ:
            reset = _resets(seq_ptr, batch, t, length)[None, :]
            reset_next = _resets(seq_ptr, batch, t + 1, length)[None, :]
        g = _gate_grad(dout_ptr, z_ptr, offsets, mask, HAS_Z)  # dL/dy, y = scan + D * u
        y = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        d_dt = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        d_dtu = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)  # dL/d(dt * u) = sum_n lam * B
        tl.debug_barrier()
        slot = states_row + chunk * slot_size
        carry_slot = adjoint_row + (chunk + 1) * slot_size
        A_n, B_n, C_n, h0 = _state_inputs(A_ptr, B_ptr, C_ptr, slot, 0, d_state, channels, length, BC_row, offs_d, t,
                                          mask_d, mask_t)
        carry = tl.load(carry_slot, mask=mask_d, other=0.0)
        for n in range(d_state):
            # prefetch as in the forward
            A_next, B_next, C_next, h0_next = _state_inputs(A_ptr, B_ptr, C_ptr, slot, n + 1, d_state, channels,
                                                            length, BC_row, offs_d, t, mask_d, mask_t)
            carry_next = tl.load(carry_slot + (n + 1) * channels, mask=mask_d & (offs_d * 0 + n + 1 < d_state), other=0.0)
            A2_n = (A_n * 1.4426950408889634)[:, None]
            # 1. recompute this chunk's states
            a = tl.exp2(dt * A2_n)
            if HAS_SEQ:
                a = tl.where(reset, 0.0, a)
            b = dtu * B_n[None, :]
            decay, h = tl.associative_scan((a, b), axis=1, combine_fn=_first_order_combine)
            h += decay * h0[:, None]
            y += h * C_n[None, :]
            tl.atomic_add(dC_ptr + BC_row + n * length + t, tl.sum(g * h, axis=0), mask=mask_t, sem="relaxed")
            # 2. adjoint, reversed: lam_t = g_t * C_t + a_{t+1} * lam_{t+1}. Past the end a = 1; the last
            #    column's a_{t+1} belongs to the next chunk and is already inside `carry`.
            a_next = tl.exp2(dt_next * A2_n)
            if HAS_SEQ:
                a_next = tl.where(reset_next, 0.0, a_next)
            a_next = tl.where(mask_next & (offs_j < BLOCK_T - 1)[None, :], a_next, 1.0)
            decay_after, lam = tl.associative_scan((a_next, g * C_n[None, :]), axis=1,
                                                   combine_fn=_first_order_combine, reverse=True)
            lam += decay_after * carry[:, None]
            carry_out = tl.sum(tl.where(first, a * lam, 0.0), axis=1)  # a column, as in the forward
            tl.store(adjoint_row + chunk * slot_size + n * channels, carry_out, mask=mask_d)
            # 3. gradients: d/d(dt * A) of a_t * h_{t-1} is lam_t * (h_t - b_t)
            grad_log_a = tl.where(mask, lam * (h - b), 0.0)
            d_dt += grad_log_a * A_n[:, None]
            tl.atomic_add(dA_ptr + offs_d * d_state + n, tl.sum(grad_log_a * dt, axis=1), mask=mask_d, sem="relaxed")
            d_dtu += lam * B_n[None, :]
            tl.atomic_add(dB_ptr + BC_row + n * length + t, tl.sum(lam * dtu, axis=0), mask=mask_t, sem="relaxed")
            A_n, B_n, C_n, h0, carry = A_next, B_next, C_next, h0_next, carry_next

        du = d_dtu * dt
        d_dt += d_dtu * u
        if HAS_D:
            y += u * skip[:, None]
            du += g * skip[:, None]
            dD_acc += tl.sum(g * u, axis=1)
        # dout, z and the raw dt are loaded again rather than kept in registers through the state loop
        if HAS_Z:
            dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            z_sig = tl.sigmoid(z)
            dz = dout * y * z_sig * (1.0 + z * (1.0 - z_sig))
            tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            _, dt_raw = _load_dt(delta_ptr, offsets, mask, bias, HAS_BIAS, False)
            d_dt = d_dt * tl.sigmoid(dt_raw)
        d_dt = tl.where(mask, d_dt, 0.0)
        dbias_acc += tl.sum(d_dt, axis=1)
        tl.store(du_ptr + offsets, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offsets, d_dt.to(ddelta_ptr.dtype.element_ty), mask=mask)

    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=mask_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, dbias_acc, mask=mask_d, sem="relaxed")


@triton.heuristics(given_flags(HAS_D="D_ptr", HAS_Z="z_ptr", HAS_BIAS="bias_ptr"))
@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    channels, d_state,
    stride_state_b, stride_state_d, stride_state_n, stride_x_b, stride_dt_b, stride_z_b,
    stride_B_b, stride_C_b, stride_out_b,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """state: (B, D, N), updated in place; x, dt, z, out: (B, D) with unit channel stride;
    A: (D, N) contiguous; B, C: (B, N) with unit state stride; D, bias: (D,) or None."""
    pid_d = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < channels
    mask_n = offs_n < d_state
    mask = mask_d[:, None] & mask_n[None, :]
    x = tl.load(x_ptr + batch * stride_x_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + batch * stride_dt_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * d_state + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + batch * stride_B_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + batch * stride_C_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    state_ptrs = state_ptr + batch * stride_state_b + offs_d[:, None] * stride_state_d + offs_n[None, :] * stride_state_n
    state = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
    state = state * tl.exp2(dt[:, None] * A * 1.4426950408889634) + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)
    out = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        out += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + batch * stride_z_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        out = out * z * tl.sigmoid(z)
    tl.store(out_ptr + batch * stride_out_b + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------- tiles


class ScanTiles(NamedTuple):
    """Tile sizes of the scan kernels, one warp a program: T steps a chunk, and the channels (BLOCK_D) a program
    takes forward and backward."""

    chunk: int
    block_d: int
    block_d_backward: int


def scan_tiles(length: int, max_chunk: int = 256, elements_per_warp: int = 512) -> ScanTiles:
    """The default tiles for a sequence of `length` steps.

    One warp per program keeps the scans along T and the backward's sums over channels inside a warp
    (shuffles, no shared memory or barriers). A tile holds `elements_per_warp` elements: two channels by
    T = 256 steps on long sequences, more channels on short ones. Chosen by timing alternatives on an
    H100 (`python benchmarks/mamba_ops.py --sweep`, figures in benchmarks/RESULTS.md).
    """
    chunk = min(max_chunk, max(16, triton.next_power_of_2(length)))
    block_d = max(1, elements_per_warp // chunk)
    return ScanTiles(chunk, block_d, block_d)


# ----------------------------------------------------------------------------- custom ops (launchers)
# Each launcher is registered as a custom op, so torch.compile sees it as one node (with the fake implementation
# below it) and CUDA-graph capture records its launches (launchers allocate, never synchronise). Eager calls skip
# the op's dispatch (`eager_or_op`). Autograd is the `torch.autograd.Function` further down, not a
# `register_autograd` on the op: the op's generated autograd wrapper cost about 0.5 ms of host time per backward
# call on the H200 machine (benchmarks/RESULTS.md, "Host time of the Mamba ops"), and torch.compile traces a
# Function as well. Every aten call a launcher saves is host time too: the kernels fill the first states slot and
# add the parameter gradients up themselves.


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


def _scan_fwd_launch(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None, delta_softplus: bool,
    chunk: int, block_d: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out (B, D, L) and the chunk-start states (B, nc + 1, N, D) float32, which the backward recomputes
    from; slot nc is the final state."""
    batch, channels, length = u.shape
    d_state = A.shape[1]
    u, delta, B, C, z, seq_idx, initial_state = (_contiguous(t) for t in (u, delta, B, C, z, seq_idx, initial_state))
    states = torch.empty(batch, triton.cdiv(length, chunk) + 1, d_state, channels, device=u.device,
                         dtype=torch.float32)
    out = u.new_empty(u.shape)
    _scan_fwd_kernel[(triton.cdiv(channels, block_d), batch)](
        u, delta, A.float().contiguous(), B, C, D, z, delta_bias, seq_idx, initial_state, out, states,
        channels, length, d_state,
        SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_T=chunk, num_warps=1,
    )
    return out, states


_selective_scan_fwd = torch.library.custom_op(f"{_NS}::selective_scan_fwd", _scan_fwd_launch, mutates_args=())


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, chunk, block_d):
    batch, channels, length = u.shape
    d_state = A.shape[1]
    states = u.new_empty(batch, -(-length // chunk) + 1, d_state, channels, dtype=torch.float32)
    return u.new_empty(u.shape), states


def _scan_bwd_launch(
    grad_out: torch.Tensor, grad_final_state: torch.Tensor | None,
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None, states: torch.Tensor, delta_softplus: bool, initial_state_grad: bool,
    chunk: int, block_d: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns du, ddelta, dz (empty when z is None), the float32 gradients of the small inputs in one flat
    tensor (`_small_grads` splits it) and, if `initial_state_grad`, d(initial state) (B, D, N) float32 (else
    empty). Custom ops cannot return None, nor outputs that alias each other."""
    batch, channels, length = u.shape
    d_state = A.shape[1]
    u, delta, B, C, z, seq_idx, grad_out, grad_final_state = (
        _contiguous(t) for t in (u, delta, B, C, z, seq_idx, grad_out, grad_final_state))
    adjoint = states.new_empty(states.shape)
    du, ddelta = u.new_empty(u.shape), delta.new_empty(delta.shape)
    dz = z.new_empty(z.shape) if z is not None else u.new_empty(0)
    small = torch.zeros(_small_grads_size(batch, channels, length, d_state), device=u.device, dtype=torch.float32)
    dB, dC, dA, dD, dbias = _small_grads(small, batch, channels, length, d_state)
    _scan_bwd_kernel[(triton.cdiv(channels, block_d), batch)](
        u, delta, A.float().contiguous(), B, C, D, z, delta_bias, seq_idx, grad_out, grad_final_state, states,
        adjoint, du, ddelta, dz if z is not None else None, dB, dC, dA, dD, dbias,
        channels, length, d_state,
        SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_T=chunk, num_warps=1,
    )
    dh0 = adjoint[:, 0].transpose(1, 2).contiguous() if initial_state_grad else u.new_empty(0)
    return du, ddelta, dz, small, dh0


def _small_grads_size(batch: int, channels: int, length: int, d_state: int) -> int:
    return 2 * batch * d_state * length + channels * d_state + 2 * channels


def _small_grads(small: torch.Tensor, batch: int, channels: int, length: int, d_state: int):
    """Views of the backward's flat float32 gradients: dB, dC (B, N, L), dA (D, N), dD, dbias (D,)."""
    sizes = (batch * d_state * length, batch * d_state * length, channels * d_state, channels, channels)
    dB, dC, dA, dD, dbias = small.split(sizes)
    return (dB.view(batch, d_state, length), dC.view(batch, d_state, length), dA.view(channels, d_state), dD,
            dbias)


_selective_scan_bwd = torch.library.custom_op(f"{_NS}::selective_scan_bwd", _scan_bwd_launch, mutates_args=())


@_selective_scan_bwd.register_fake
def _(grad_out, grad_final_state, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, delta_softplus,
      initial_state_grad, chunk, block_d):
    batch, channels, length = u.shape
    d_state = A.shape[1]
    f32 = torch.float32
    return (
        u.new_empty(u.shape), delta.new_empty(delta.shape), z.new_empty(z.shape) if z is not None else u.new_empty(0),
        u.new_empty(_small_grads_size(batch, channels, length, d_state), dtype=f32),
        u.new_empty((batch, channels, d_state) if initial_state_grad else (0,), dtype=f32),
    )


_scan_fwd = eager_or_op(_scan_fwd_launch, _selective_scan_fwd)
_scan_bwd = eager_or_op(_scan_bwd_launch, _selective_scan_bwd)


# ----------------------------------------------------------------------------- autograd


class _SelectiveScanTriton(torch.autograd.Function):
    """The scan's autograd: forward and backward through the two launchers above. Returns out, and the final state
    (B, D, N) float32 when `return_final_state`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, tiles,
                return_final_state):
        chunk, block_d, block_d_backward = tiles
        out, states = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, chunk,
                                block_d)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, states)
        ctx.delta_softplus, ctx.chunk, ctx.block_d_backward = delta_softplus, chunk, block_d_backward
        ctx.initial_state_dtype = initial_state.dtype if initial_state is not None else None
        if not return_final_state:
            return out
        return out, states[:, -1].transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out, grad_final_state=None):
        u, delta, A, B, C, D, z, delta_bias, seq_idx, states = ctx.saved_tensors
        initial_state_grad = ctx.initial_state_dtype is not None and ctx.needs_input_grad[8]
        du, ddelta, dz, small, dh0 = _scan_bwd(
            grad_out, grad_final_state, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, ctx.delta_softplus,
            initial_state_grad, ctx.chunk, ctx.block_d_backward,
        )
        (batch, channels, length), d_state = u.shape, A.shape[1]
        dB, dC, dA, dD, dbias = _small_grads(small, batch, channels, length, d_state)
        if B.dtype == C.dtype != torch.float32:  # one cast for both
            dB, dC = small[: 2 * dB.numel()].view(2, *dB.shape).to(B.dtype).unbind(0)
        return (
            du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.to(D.dtype) if D is not None else None, dz if z is not None else None,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None,
            dh0.to(ctx.initial_state_dtype) if initial_state_grad else None,
            None, None, None, None,
        )


# ----------------------------------------------------------------------------- the decoding step


def _state_update_launch(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    dt_softplus: bool,
) -> torch.Tensor:
    """Returns out (B, D) and writes the new state into `state`. Tiles: all N states of up to 2048 // N
    channels a program."""
    batch, channels, d_state = state.shape
    x, dt, z = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x, dt, z))
    B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (B, C))
    A = A.contiguous()
    out = x.new_empty(x.shape)
    block_n = triton.next_power_of_2(d_state)
    block_d = max(1, min(triton.next_power_of_2(channels), 2048 // block_n))
    _state_update_kernel[(triton.cdiv(channels, block_d), batch)](
        state, x, dt, A, B, C, D, z, dt_bias, out,
        channels, d_state,
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), dt.stride(0),
        z.stride(0) if z is not None else 0, B.stride(0), C.stride(0), out.stride(0),
        SOFTPLUS=dt_softplus, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    return out


_selective_state_update = torch.library.custom_op(
    f"{_NS}::selective_state_update", _state_update_launch, mutates_args=("state",)
)


@_selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape)


_state_update = eager_or_op(_state_update_launch, _selective_state_update)


# ----------------------------------------------------------------------------- public functions


def _check_shapes(expected: dict, context: str) -> None:
    """Raises ValueError for the first given tensor of `expected` ({name: (tensor or None, shape)}) of another shape."""
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} {context}")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                          seq_idx=None, return_final_state=False, tiles: ScanTiles | None = None):
    """The fused selective scan: `mamba_scan_ref.selective_scan_ref`'s arguments, shapes and results (the final
    state is float32), differentiable in every tensor but seq_idx. `tiles`: the kernels' tile sizes, None takes
    `scan_tiles(L)`. Takes float32, bfloat16 and float16 tensors (TypeError otherwise)."""
    require_triton_dtypes("selective_scan_triton", u=u, delta=delta, B=B, C=C, z=z)
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length), got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if length == 0:
        raise ValueError("u has length 0; call the scan with at least one step")
    d_state = A.shape[-1]
    _check_shapes({
        "delta": (delta, (batch, channels, length)), "A": (A, (channels, d_state)),
        "B": (B, (batch, d_state, length)), "C": (C, (batch, d_state, length)),
        "D": (D, (channels,)), "z": (z, (batch, channels, length)), "delta_bias": (delta_bias, (channels,)),
        "initial_state": (initial_state, (batch, channels, d_state)), "seq_idx": (seq_idx, (batch, length)),
    }, f"for u of shape {tuple(u.shape)} and d_state {d_state}; B and C must be (batch, d_state, length)")
    if seq_idx is not None and (seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool):
        raise TypeError(f"seq_idx must hold integer document ids, got {seq_idx.dtype}")

    chunk, block_d, block_d_backward = tiles or scan_tiles(length)
    # contiguous here, not only inside the op: autograd then saves the copies, and the backward makes none again
    u, delta, B, C, z, seq_idx = (_contiguous(t) for t in (u, delta, B, C, z, seq_idx))
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
                                      bool(delta_softplus), (chunk, block_d, block_d_backward),
                                      bool(return_final_state))


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step, updating `state` in place: `mamba_scan_ref.selective_state_update_ref`'s arguments,
    shapes and result. The state may be of any float dtype; the arithmetic is float32."""
    require_triton_dtypes("selective_state_update_triton", state=state, x=x, dt=dt, B=B, C=C, z=z)
    if state.dim() != 3:
        raise ValueError(f"state must be (batch, channels, d_state), got shape {tuple(state.shape)}")
    batch, channels, d_state = state.shape
    _check_shapes({
        "x": (x, (batch, channels)), "dt": (dt, (batch, channels)), "A": (A, (channels, d_state)),
        "B": (B, (batch, d_state)), "C": (C, (batch, d_state)), "D": (D, (channels,)),
        "z": (z, (batch, channels)), "dt_bias": (dt_bias, (channels,)),
    }, f"for state {tuple(state.shape)}")
    return _state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
