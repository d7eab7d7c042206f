"""The CUDA-extension tier: mamba-ssm's compiled selective scan and causal-conv1d's conv, when installed.

Shape legend: B = batch, D = channels, L = length, N = d_state, K = conv width.

mamba-ssm 2.3's package `__init__` imports modules (and packages) that a plain training machine may lack,
so the scan is called through its compiled extension `selective_scan_cuda` directly, with our own
autograd wrapper; causal-conv1d is imported normally. Neither supports everything the reference does
(mamba_scan_ref.py, mamba_conv_ref.py: the contract): `mamba_kernels.CudaKernels` routes calls that need an
initial state or `seq_idx` (and, for the scan, a differentiable final state) to the Triton tier (see
`scan_supports` / `conv_supports`). mamba-ssm's decoding step is itself a Triton kernel, so this tier decodes with ours.
"""

import torch
import torch.nn.functional as F

try:  # transformers' remote-code loader skips imports inside try blocks
    import selective_scan_cuda
except ImportError as error:
    raise ImportError(
        "the 'cuda' backend needs mamba-ssm: pip install 'mamba-ssm>=2.2' (or pip install -e '.[cuda]' in a "
        "hybrid_lm checkout; hybrid-lm is not on PyPI)"
    ) from error
try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
except ImportError as error:
    raise ImportError(
        "the 'cuda' backend needs causal-conv1d: pip install 'causal-conv1d>=1.4' (or pip install -e '.[cuda]' in "
        "a hybrid_lm checkout; hybrid-lm is not on PyPI)"
    ) from error


def scan_supports(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, return_final_state) -> bool:
    """Whether mamba-ssm's kernel computes this call: no initial state or resets, matching dtypes
    (its B, C, delta and z follow u; A, D and the bias are float32), no gradient through the final state."""
    if initial_state is not None or seq_idx is not None or not u.is_cuda:
        return False
    if any(t is not None and t.dtype != u.dtype for t in (delta, B, C, z)):
        return False
    if any(t is not None and t.dtype != torch.float32 for t in (A, D, delta_bias)):
        return False
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    return not (return_final_state and wants_grad)


def conv_supports(x, weight, bias, initial_state=None, seq_idx=None) -> bool:
    """causal-conv1d takes widths 2 to 4, a bias of the weight's dtype, and an initial state or seq_idx only in
    a channels-last layout (which we don't use). The final state it does not return: `causal_conv1d_cuda_ext`
    takes it from x."""
    if not x.is_cuda or not 2 <= weight.shape[1] <= 4 or (bias is not None and bias.dtype != weight.dtype):
        return False
    return initial_state is None and seq_idx is None


class _SelectiveScanCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        u, delta, z = (t.contiguous() if t is not None and t.stride(-1) != 1 else t for t in (u, delta, z))
        B, C = (t.contiguous().unsqueeze(1) for t in (B, C))  # the extension wants (B, groups, N, L)
        D = D.contiguous() if D is not None else None
        out, states, *gated = selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, out)
        ctx.delta_softplus = delta_softplus
        # `states` interleaves (decay product, state) per chunk: the last chunk's state is the final one
        final_state = states[:, :, -1, 1::2].float()
        ctx.mark_non_differentiable(final_state)
        return (gated[0] if z is not None else out), final_state

    @staticmethod
    def backward(ctx, grad_out, _grad_final_state):
        u, delta, A, B, C, D, z, delta_bias, states, out = ctx.saved_tensors
        grads = selective_scan_cuda.bwd(
            u, delta, A, B, C, D, z, delta_bias, grad_out.contiguous(), states, out if z is not None else None,
            None, ctx.delta_softplus, False,
        )
        du, ddelta, dA, dB, dC, dD, dbias = grads[:7]
        return (
            du, ddelta, dA, dB.squeeze(1), dC.squeeze(1), dD if D is not None else None,
            grads[7] if z is not None else None, dbias if delta_bias is not None else None, None,
        )


def selective_scan_cuda_ext(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_final_state=False):
    """mamba-ssm's scan. u, delta, z: (B, D, L); A: (D, N) float32; B, C: (B, N, L); D, delta_bias: (D,)."""
    out, final_state = _SelectiveScanCuda.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (out, final_state) if return_final_state else out


def causal_conv1d_cuda_ext(x, weight, bias=None, activation=None, return_final_state=False):
    """causal-conv1d's conv. x: (B, D, L); weight: (D, K); bias: (D,). With `return_final_state` also the final
    state (B, D, K - 1): from no initial state and one document, the last K - 1 inputs, zeros before the first."""
    # a strided x would select causal-conv1d's channels-last kernel, which has its own constraints
    out = causal_conv1d_fn(x if x.stride(-1) == 1 else x.contiguous(), weight, bias, activation=activation)
    if not return_final_state:
        return out
    keep = weight.shape[1] - 1
    return out, F.pad(x[..., -keep:], (max(keep - x.shape[-1], 0), 0)).contiguous()


def causal_conv1d_update_cuda_ext(x, conv_state, weight, bias=None, activation=None):
    """causal-conv1d's decoding step. x: (B, D); conv_state: (B, D, K - 1), updated in place."""
    return causal_conv1d_update(x, conv_state, weight, bias, activation)
