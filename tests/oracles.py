"""Independent, deliberately naive references: one Python step per time step, float64.

They share no code with hybrid_lm; tests compare the package's ops against them (`assert_close_to` for a
half-precision result). Also a counter of live tensor bytes, against which the memory calculator is checked on CPU.
Shape legend: B = batch, D = channels, L = length, N = d_state, K = conv width.
"""

import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              initial_state=None, seq_idx=None):
    """u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L). Returns (out (B, D, L), final state (B, D, N))."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    h = initial_state.double() if initial_state is not None else u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None]
            h = h * keep
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def causal_conv1d_sequential(x, weight, bias=None, initial_state=None, seq_idx=None, activation=None):
    """x: (B, D, L); weight: (D, K). Returns (out (B, D, L), last K - 1 inputs of the last document)."""
    x, weight = x.double(), weight.double()
    batch, channels, length = x.shape
    width = weight.shape[1]
    history = [initial_state.double()[..., k] if initial_state is not None else x.new_zeros(batch, channels)
               for k in range(width - 1)]
    history_doc = [seq_idx[:, 0] if seq_idx is not None else None] * (width - 1)
    outs = []
    for t in range(length):
        window = (history[-(width - 1):] if width > 1 else []) + [x[..., t]]
        docs = (history_doc[-(width - 1):] if width > 1 else []) + [seq_idx[:, t] if seq_idx is not None else None]
        out = x.new_zeros(batch, channels)
        for k in range(width):
            contribution = window[k] * weight[:, k]
            if seq_idx is not None:
                contribution = contribution * (docs[k] == seq_idx[:, t]).double()[:, None]
            out = out + contribution
        if bias is not None:
            out = out + bias.double()
        outs.append(F.silu(out) if activation == "silu" else out)
        history.append(x[..., t])
        history_doc.append(seq_idx[:, t] if seq_idx is not None else None)
    final = torch.stack(history[-(width - 1):], dim=-1) if width > 1 else x[..., :0]
    if seq_idx is not None and width > 1:
        final_docs = torch.stack(history_doc[-(width - 1):], dim=-1)
        final = final * (final_docs == seq_idx[:, -1:])[:, None].double()
    return torch.stack(outs, dim=-1), final


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that the ops run inside the mode create, and the most of them alive
    at once (`peak`): a CPU stand-in for `torch.cuda.max_memory_allocated`, without allocator rounding."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._counted or key in inputs:  # a view, an in-place result: nothing new
                continue
            self._counted.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key, size):
        self.live -= size
        self._counted.discard(key)


TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def assert_close_to(actual, expected, dtype, name="", baseline=None):
    """float32: elementwise. bfloat16: the relative error of the whole tensor is at most 1e-2, or at most twice
    that of `baseline` (the reference itself run in bfloat16), whichever is larger."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected, **TOLERANCE[dtype], msg=name)
        return
    scale = expected.norm().item() + 1e-12
    error = (actual.double() - expected).norm().item() / scale
    allowed = max(1e-2, 2 * (baseline.double() - expected).norm().item() / scale if baseline is not None else 0)
    assert error <= allowed, f"{name}: relative error {error:.2e} > {allowed:.2e}"
