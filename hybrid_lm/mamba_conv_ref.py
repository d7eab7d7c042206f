"""Causal depthwise conv1d of the Mamba mixer: the op's contract and its pure-PyTorch reference (the `torch` tier).

The Triton tier (mamba_conv_triton.py) and causal-conv1d's kernels (mamba_cuda.py) compute the same op; this
docstring is theirs too.

Shape legend: B = batch, D = channels, L = length, K = kernel width.

    out_t[d] = act(bias[d] + sum_k weight[d, k] * x_{t - (K - 1) + k}[d])

x before the sequence comes from `initial_state` (the last K - 1 inputs of the previous chunk,
zeros when None). With `seq_idx` (packed sequences) an input from another document counts as zero.
The signatures mirror causal-conv1d's `causal_conv1d_fn` / `causal_conv1d_update`.
"""

import torch
import torch.nn.functional as F

_ACTIVATIONS = {None: lambda x: x, "silu": F.silu, "swish": F.silu}


def activation_fn(name: str | None):
    """The activation `name` (None, "silu" or "swish") as a function; ValueError for any other name."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(k for k in _ACTIVATIONS if k)} or None, got {name!r}")
    return _ACTIVATIONS[name]


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
    return_final_state: bool = False,
):
    """Causal depthwise convolution over a whole sequence.

    Args:
        x: (B, D, L).  weight: (D, K).  bias: (D,).
        initial_state: (B, D, K - 1) inputs preceding x.  seq_idx: (B, L) document ids.
    Returns:
        out (B, D, L) in x's dtype and, with `return_final_state`, the last K - 1 inputs
        (B, D, K - 1), zeroed where they belong to an earlier document than the last one.
    """
    act = activation_fn(activation)
    batch, channels, length = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, channels, width - 1)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=-1)  # (B, D, K - 1 + L)

    if seq_idx is None:
        out = F.conv1d(padded, weight.to(x.dtype)[:, None, :], bias.to(x.dtype) if bias is not None else None, groups=channels)
    else:
        # the carried-in state belongs to the first document of each row
        padded_idx = torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=-1)
        windows = padded.unfold(-1, width, 1)  # (B, D, L, K)
        same_doc = padded_idx.unfold(-1, width, 1) == seq_idx[..., None]  # (B, L, K)
        out = (windows * same_doc[:, None].to(x.dtype) * weight.to(x.dtype)[:, None, :]).sum(-1)
        if bias is not None:
            out = out + bias.to(x.dtype)[:, None]
    out = act(out)

    if not return_final_state:
        return out
    final_state = padded[..., -(width - 1) :] if width > 1 else padded[..., :0]
    if seq_idx is not None and width > 1:
        final_idx = padded_idx[:, -(width - 1) :]
        final_state = final_state * (final_idx == seq_idx[:, -1:])[:, None].to(x.dtype)
    return out, final_state.contiguous()


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step; shifts `x` into `conv_state` in place.

    Args:
        x: (B, D).  conv_state: (B, D, K - 1).  weight: (D, K).  bias: (D,).
    Returns:
        out: (B, D) in x's dtype.
    """
    act = activation_fn(activation)
    window = torch.cat([conv_state.to(x.dtype), x[..., None]], dim=-1)  # (B, D, K)
    conv_state.copy_(window[..., 1:])
    out = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return act(out)
