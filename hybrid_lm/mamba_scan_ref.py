"""Selective state-space scan (Mamba-1): the op's contract and its pure-PyTorch reference (the `torch` tier).

The Triton tier (mamba_scan_triton.py) and mamba-ssm's kernel (mamba_cuda.py) compute the same op; this
docstring is theirs too.

Shape legend: B = batch, D = channels (d_inner), L = length, N = d_state, T = chunk length.
Glossary (Mamba paper, Section 3): `u` is the input x, `delta` is the step size Delta, `A` the
(negative, diagonal) state matrix, `B`/`C` the input-dependent input and output matrices, `D` the skip.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (for every channel d and state n)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t,      out_t = y_t * silu(z_t)

The signatures mirror mamba-ssm's `selective_scan_fn` / `selective_state_update`, with two
additions: an initial state (chunked prefill, continuing a cached sequence) and `seq_idx` (packed
sequences: the state restarts wherever `seq_idx` changes).

`selective_scan_ref` never loops over time steps. It walks the sequence in chunks of `chunk_size`
steps; inside a chunk the linear recurrence is a log-depth (Hillis-Steele) scan. Only the state at
each chunk start is stored: the backward pass recomputes a chunk's states from it, so memory is
O(B * D * N * L / T) rather than the O(B * D * N * L) an autograd graph through the scan would keep,
and every temporary stays small enough to live in cache. Arithmetic is float32 (float64 for float64
inputs) whatever the input dtype.
"""

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 64


def _scan_(a: torch.Tensor, b: torch.Tensor) -> None:
    """In place: b_t <- a_t * b_{t-1} + b_t along dim 0, so b ends up holding every state.

    a, b: (T, ...); `a` is overwritten too. Odd-even (Blelloch-style) reduction: combine the pairs
    (2i, 2i+1), solve the half-length problem on the odd elements, then finish the even ones. That
    is O(T) work in log2(T) rounds, each a few whole-tensor ops on contiguous (...) blocks.
    """
    length = b.shape[0]
    if length < 2:
        return
    pairs = length // 2
    even_a, odd_a = a[0 : 2 * pairs : 2], a[1::2]
    even_b, odd_b = b[0 : 2 * pairs : 2], b[1::2]
    odd_b.addcmul_(odd_a, even_b)
    odd_a.mul_(even_a)
    _scan_(odd_a, odd_b)
    b[2::2].addcmul_(a[2::2], b[1 : length - 1 : 2])


def _reverse_scan_(a: torch.Tensor, b: torch.Tensor) -> None:
    """In place: b_t <- a_t * b_{t+1} + b_t along dim 0 (the mirror image of `_scan_`).

    a, b: (T, ...); `a` is overwritten and a[T - 1] is never read.
    """
    length = b.shape[0]
    if length < 2:
        return
    first = length % 2  # pairs (first + 2i, first + 2i + 1): the earlier element waits for the later
    early_a, late_a = a[first : length - 1 : 2], a[first + 1 :: 2]
    early_b, late_b = b[first : length - 1 : 2], b[first + 1 :: 2]
    early_b.addcmul_(early_a, late_b)
    early_a.mul_(late_a)
    _reverse_scan_(early_a, early_b)
    b[first + 1 : length - 2 : 2].addcmul_(a[first + 1 : length - 2 : 2], b[first + 2 : length - 1 : 2])
    if first:
        b[0].addcmul_(a[0], b[1])


def _chunk_states(u, delta, A, B, reset, h0, keep_decay):
    """Discretizes one chunk and returns its decays and states.

    u, delta: (T, B, D); A: (D, N); B: (T, B, N); reset: (T, B) bool or None; h0: (B, D, N).
    Returns decay (T, B, D, N) = exp(delta * A), 0 where the state resets (None unless
    `keep_decay`), and the states h (T, B, D, N).
    """
    decay = torch.exp(delta[..., None] * A)
    if reset is not None:
        decay.masked_fill_(reset[..., None, None], 0.0)
    h = (delta * u)[..., None] * B[:, :, None, :]
    h[0].addcmul_(decay[0], h0)
    if keep_decay:
        _scan_(decay.clone(), h)
        return decay, h
    _scan_(decay, h)
    return None, h


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, dtype):
    """Casts to the compute dtype and moves time first: (B, D, L) -> (L, B, D), (B, N, L) -> (L, B, N)."""
    u_t = u.to(dtype).permute(2, 0, 1)
    dt = delta.to(dtype).permute(2, 0, 1)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    if delta_softplus:
        dt = F.softplus(dt)
    return u_t, dt.contiguous(), A.to(dtype), B.to(dtype).permute(2, 0, 1), C.to(dtype).permute(2, 0, 1)


# The contractions below are broadcast products and sums: on CPUs they beat batched matmuls of these
# thin (D, N) x (N, 1) shapes by 1.5-4x.
def _contract(states: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """(T, B, D, N) x (T, B, N) -> (T, B, D): y_t = sum_n C_t[n] * h_t[n]."""
    return (states * C[:, :, None, :]).sum(-1)


def _contract_channels(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(T, B, D, N) x (T, B, D) -> (T, B, N): sum_d weights_t[d] * states_t[d, n]."""
    return (states * weights[..., None]).sum(2)


class _SelectiveScanFn(torch.autograd.Function):
    """forward / setup_context / backward in the separate form, which torch.func and torch.export require.
    The third output, the state at each chunk start, is what the backward recomputes the chunks from."""

    @staticmethod
    def forward(u, delta, A, B, C, D, z, delta_bias, initial_state, reset, delta_softplus, chunk_size):
        dtype = torch.promote_types(u.dtype, torch.float32)
        batch, channels, length = u.shape
        u_t, dt, A_, B_t, C_t = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, dtype)
        reset_t = reset.t() if reset is not None else None  # (L, B)
        h = (
            initial_state.to(dtype)
            if initial_state is not None
            else u.new_zeros(batch, channels, A.shape[1], dtype=dtype)
        )

        y = torch.empty(length, batch, channels, dtype=dtype, device=u.device)
        chunk_starts = []
        for start in range(0, length, chunk_size):
            sl = slice(start, min(start + chunk_size, length))
            chunk_starts.append(h)
            _, states = _chunk_states(
                u_t[sl], dt[sl], A_, B_t[sl], reset_t[sl] if reset_t is not None else None, h, keep_decay=False
            )
            y[sl] = _contract(states, C_t[sl])
            h = states[-1].clone()

        y = y.permute(1, 2, 0)  # (B, D, L)
        if D is not None:
            y = y + D.to(dtype)[:, None] * u.to(dtype)
        out = y * F.silu(z.to(dtype)) if z is not None else y

        return out.to(u.dtype), h, torch.stack(chunk_starts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, z, delta_bias, initial_state, reset, delta_softplus, chunk_size = inputs
        chunk_starts = output[2]
        ctx.mark_non_differentiable(chunk_starts)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, reset, chunk_starts)
        ctx.has_initial_state = initial_state is not None
        ctx.delta_softplus = delta_softplus
        ctx.chunk_size = chunk_size

    @staticmethod
    def backward(ctx, grad_out, grad_final_state, _grad_chunk_starts):
        u, delta, A, B, C, D, z, delta_bias, reset, chunk_starts = ctx.saved_tensors
        dtype = chunk_starts.dtype
        chunk_size, length = ctx.chunk_size, u.shape[-1]
        u_t, dt, A_, B_t, C_t = _prepare(u, delta, A, B, C, delta_bias, ctx.delta_softplus, dtype)
        reset_t = reset.t() if reset is not None else None
        grad_out = grad_out.to(dtype)

        # 1. through the gate: out = y * silu(z), y = scan + D * u
        grad_y = grad_out * F.silu(z.to(dtype)) if z is not None else grad_out
        grad_y_t = grad_y.permute(2, 0, 1).contiguous()  # (L, B, D)

        grad_u = torch.empty_like(u_t)
        grad_dt = torch.empty_like(dt)
        grad_A = torch.zeros_like(A_)
        grad_B = torch.empty_like(B_t)
        grad_C = torch.empty_like(C_t)
        scan_y = torch.empty_like(u_t) if z is not None else None
        # dL/dh flowing back into the current chunk from later ones; starts as the final state's gradient
        carry = grad_final_state.to(dtype)

        # 2. chunks in reverse: recompute the states, then solve the adjoint recurrence
        #    lam_t = dL/dh_t = grad_y_t * C_t + decay_{t+1} * lam_{t+1}
        for index in reversed(range(chunk_starts.shape[0])):
            sl = slice(index * chunk_size, min((index + 1) * chunk_size, length))
            h0 = chunk_starts[index]
            decay, states = _chunk_states(
                u_t[sl], dt[sl], A_, B_t[sl], reset_t[sl] if reset_t is not None else None, h0, keep_decay=True
            )
            if scan_y is not None:
                scan_y[sl] = _contract(states, C_t[sl])
            grad_C[sl] = _contract_channels(states, grad_y_t[sl])

            lam = grad_y_t[sl][..., None] * C_t[sl][:, :, None, :]  # (T, B, D, N)
            lam[-1] += carry
            decay_next = torch.empty_like(decay)
            decay_next[:-1] = decay[1:]
            _reverse_scan_(decay_next, lam)
            carry = decay[0] * lam[0]

            # d/d(delta * A) of decay_t * h_{t-1}; zero where the state was reset (decay = 0)
            grad_log_decay = lam * decay
            grad_log_decay[1:] *= states[:-1]
            grad_log_decay[0] *= h0
            grad_dt[sl] = (grad_log_decay * A_).sum(-1)
            grad_A += (grad_log_decay * dt[sl][..., None]).sum((0, 1))
            lam_B = _contract(lam, B_t[sl])  # dL/d(delta * u), (T, B, D)
            grad_dt[sl] += lam_B * u_t[sl]
            grad_u[sl] = lam_B * dt[sl]
            grad_B[sl] = _contract_channels(lam, dt[sl] * u_t[sl])

        # 3. back to the caller's layouts
        grad_u = grad_u.permute(1, 2, 0)
        grad_D = grad_z = None
        if D is not None:
            grad_u = grad_u + grad_y * D.to(dtype)[:, None]
            grad_D = (grad_y * u.to(dtype)).sum((0, 2)).to(D.dtype)
        if z is not None:
            z_ = z.to(dtype)
            y = scan_y.permute(1, 2, 0)
            if D is not None:
                y = y + D.to(dtype)[:, None] * u.to(dtype)
            sig = torch.sigmoid(z_)
            grad_z = (grad_out * y * sig * (1 + z_ * (1 - sig))).to(z.dtype)
        grad_dt = grad_dt.permute(1, 2, 0)
        if ctx.delta_softplus:
            dt_raw = delta.to(dtype)
            if delta_bias is not None:
                dt_raw = dt_raw + delta_bias.to(dtype)[:, None]
            grad_dt = grad_dt * torch.sigmoid(dt_raw)
        grad_bias = grad_dt.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        grad_h0 = carry if ctx.has_initial_state else None
        return (
            grad_u.to(u.dtype), grad_dt.to(delta.dtype), grad_A.to(A.dtype),
            grad_B.permute(1, 2, 0).to(B.dtype), grad_C.permute(1, 2, 0).to(C.dtype),
            grad_D, grad_z, grad_bias, grad_h0, None, None, None,
        )


def resets_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) document ids -> (B, L) bool, True where a new document starts (never at t = 0)."""
    reset = torch.zeros_like(seq_idx, dtype=torch.bool)
    reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return reset


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """Chunked, exact selective scan.

    Args:
        u: (B, D, L) input.  delta: (B, D, L) step size before bias/softplus.  A: (D, N).
        B, C: (B, N, L).  D: (D,) skip.  z: (B, D, L) gate.  delta_bias: (D,).
        initial_state: (B, D, N) state before the first step (zeros when None).
        seq_idx: (B, L) integer document ids of a packed batch; the state restarts where it changes.
    Returns:
        out (B, D, L) in u's dtype, and with `return_final_state` the state after the last step
        (B, D, N) in float32 (float64 for float64 inputs).
    """
    reset = resets_from_seq_idx(seq_idx) if seq_idx is not None else None
    out, final_state, _ = _SelectiveScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, reset, delta_softplus, chunk_size
    )
    return (out, final_state) if return_final_state else out


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One decoding step; updates `state` in place.

    Args:
        state: (B, D, N), float32.  x, dt, z: (B, D).  A: (D, N).  B, C: (B, N).  D, dt_bias: (D,).
    Returns:
        out: (B, D) in x's dtype.
    """
    dtype = state.dtype
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt[..., None] * A.to(dtype))  # (B, D, N)
    new_state = state * decay + (dt * x.to(dtype))[..., None] * B.to(dtype)[:, None, :]
    state.copy_(new_state)
    out = torch.einsum("bdn,bn->bd", new_state, C.to(dtype))
    if D is not None:
        out = out + D.to(dtype) * x.to(dtype)
    if z is not None:
        out = out * F.silu(z.to(dtype))
    return out.to(x.dtype)
