"""Grouped matrix product of the mixture of experts: one product per projection over all experts.

Shape legend: S = routed (token, slot) pairs sorted by expert, E = experts, Din / Dout = in / out features.

    out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]          (offs[-1] = 0)

Rows are grouped by expert and `offs` (int32, on the device) holds the cumulative row counts, the layout of
`torch._grouped_mm` and of transformers' `grouped_mm` experts implementation (`integrations/moe.py`), whose
conventions this file follows: weights in nn.Linear layout (E, Dout, Din), gate and up concatenated per expert,
`offs` from the sorted expert ids without leaving the device.

Backends, chosen by one rule (`grouped_mm_backend`) from the device, the dtype, the shapes and whether
torch.compile is tracing; never by trying and catching an error:
- "grouped_mm": `torch._grouped_mm`. On CUDA only where it has its fast kernel (bfloat16 on sm90 / sm100,
  torch >= 2.8): elsewhere CUDA's own fallback copies `offs` to the host. On CPU from torch 2.9 in eager mode
  for float32 / bfloat16 / float16, and under torch.compile for bfloat16 only (torch's fake kernel rejects the
  other dtypes, as of 2.13). Every row stride must be a multiple of 16 bytes, the backward's too:
  Din * itemsize % 16 == 0 and Dout * itemsize % 16 == 0.
- "loop": one `mm` per expert inside a custom op, so torch.compile sees one opaque node (no graph break, no
  every-expert-on-every-token dense path) and autograd one backward. It reads `offs` on the host once per call:
  free on CPU, a host sync on CUDA (float32 / float16 there, or GPUs before sm90).
- "masked": where CUDA has no fast kernel and the call is compiled or captured in a CUDA graph (which cannot
  read `offs` on the host): every expert's product on every row, each row keeping its own expert's. E times
  the FLOPs, no host read; the fast-kernel case (bfloat16 on sm90+) never comes here.
"""

import torch

from .custom_ops import op_namespace

_NS = op_namespace(__name__)
_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def grouped_mm_ref(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Reference grouped product, one `mm` per group.

    Args:
        x: (S, Din) rows sorted by group.  w: (E, Din, Dout).  offs: (E,) cumulative row counts, offs[-1] == S.
    Returns:
        (S, Dout) in x's dtype.
    """
    out, start = [], 0
    for group, stop in enumerate(offs.tolist()):
        out.append(x[start:stop] @ w[group])
        start = stop
    return torch.cat(out)


# ---- "loop" backend: a custom op around the per-expert products ----

@torch.library.custom_op(f"{_NS}::grouped_mm_loop", mutates_args=())
def _grouped_mm_loop_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for group, stop in enumerate(offs.tolist()):  # the one host read of this call
        if stop > start:
            torch.mm(x[start:stop], w[group], out=out[start:stop])
        start = stop
    return out


@_grouped_mm_loop_op.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op(f"{_NS}::grouped_mm_loop_bwd", mutates_args=())
def _grouped_mm_loop_bwd_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor,
                            grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = torch.empty_like(x)
    grad_w = torch.zeros_like(w)  # an expert without rows gets a zero gradient
    start = 0
    for group, stop in enumerate(offs.tolist()):
        if stop > start:
            torch.mm(grad_out[start:stop], w[group].T, out=grad_x[start:stop])
            torch.mm(x[start:stop].T, grad_out[start:stop], out=grad_w[group])
        start = stop
    return grad_x, grad_w


@_grouped_mm_loop_bwd_op.register_fake
def _(x, w, offs, grad_out):
    return torch.empty_like(x), torch.empty_like(w)


def _loop_setup_context(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _loop_backward(ctx, grad_out):
    x, w, offs = ctx.saved_tensors
    grad_x, grad_w = _grouped_mm_loop_bwd_op(x, w, offs, grad_out.contiguous())
    return grad_x, grad_w, None


_grouped_mm_loop_op.register_autograd(_loop_backward, setup_context=_loop_setup_context)


# ---- dispatch ----

def _row_aligned(t: torch.Tensor) -> bool:
    """The non-unit stride of the last two dimensions is a multiple of 16 bytes (row- or column-major)."""
    stride = t.stride(-2) if t.stride(-1) == 1 else t.stride(-1)
    return stride * t.element_size() % 16 == 0

def grouped_mm_backend(x: torch.Tensor, w: torch.Tensor) -> str:
    """"grouped_mm" where `torch._grouped_mm` runs without a host sync and torch.compile can trace it, else "loop".

    x: (S, Din), w: (E, Din, Dout), both of one dtype. The rules are in the module docstring.
    """
    # the backward multiplies (S, Dout) gradients by w transposed: Dout's rows must be aligned as well as Din's
    out_aligned = w.shape[-1] * w.element_size() % 16 == 0
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or not (_row_aligned(x) and _row_aligned(w)
                                                                         and out_aligned):
        return "loop"
    if x.device.type == "cuda":
        sm_major = torch.cuda.get_device_capability(x.device)[0]
        fast_kernel = sm_major == 9 or (sm_major == 10 and _TORCH_VERSION >= (2, 9))
        if x.dtype == torch.bfloat16 and fast_kernel:
            return "grouped_mm"
        return "masked" if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing() else "loop"
    if x.device.type == "cpu" and _TORCH_VERSION >= (2, 9):
        if torch.compiler.is_compiling():
            return "grouped_mm" if x.dtype == torch.bfloat16 else "loop"
        return "grouped_mm" if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else "loop"
    return "loop"


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (S, Din) rows sorted by group, w (E, Din, Dout) any strides, offs (E,) int32 with offs[-1] == S
    -> (S, Dout). Differentiable in x and w; the same values as `grouped_mm_ref`."""
    backend = grouped_mm_backend(x, w)
    if backend == "grouped_mm":
        return torch._grouped_mm(x, w, offs=offs)
    if backend == "masked":
        return _grouped_mm_masked(x, w, offs)
    return _grouped_mm_loop_op(x, w.contiguous(), offs)


def _grouped_mm_masked(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The "masked" backend: same signature and values as `grouped_mm_ref`, without reading `offs` on the host."""
    rows = torch.arange(x.shape[0], device=x.device, dtype=offs.dtype)
    group = torch.searchsorted(offs, rows, right=True)  # (S,) the group of each row
    out = x.new_zeros(x.shape[0], w.shape[2])
    for e in range(w.shape[0]):
        out = torch.where((group == e)[:, None], x @ w[e], out)
    return out


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offs: torch.Tensor,
                   expert_ids: torch.Tensor) -> torch.Tensor:
    """Per-expert nn.Linear on rows grouped by expert: x (S, Din), weight (E, Dout, Din), bias (E, Dout) or None,
    offs (E,) int32, expert_ids (S,) the sorted expert of each row (for the bias) -> (S, Dout)."""
    out = grouped_mm(x, weight.transpose(-2, -1), offs)
    return out if bias is None else out + bias[expert_ids]


def expert_offsets(sorted_expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(S,) expert ids in ascending order -> (E,) int32 cumulative counts, computed on the device (no host sync,
    static shape under torch.compile)."""
    experts = torch.arange(num_experts, device=sorted_expert_ids.device, dtype=sorted_expert_ids.dtype)
    return torch.searchsorted(sorted_expert_ids, experts, right=True, out_int32=True)
