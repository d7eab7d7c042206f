"""The Mamba mixer's projections, written straight into and read straight out of the kernels' (B, D, L) layout.

Shape legend: B = batch, L = length, I = input features, O = output features.

The scan and conv kernels take channels-first tensors (B, D, L); the mixer's projections are token-first Linears
(B, L, *). `F.linear` on a transposed view first copies it into a contiguous tensor, its output needs another copy
to become channels-first, and the backward repeats both: on the bench config these copies took about 6 ms of a
52 ms training step (benchmarks/RESULTS.md). A batched product over the batch dimension reads and writes either
layout directly:

    linear_to_channels_first(x (B, L, I), weight (O, I), bias, chunks)  ==  F.linear(x, weight, bias)
                                                                             .transpose(1, 2).chunk(chunks, dim=1)
    linear_from_channels_first(x (B, I, L), weight (O, I), bias)        ==  F.linear(x.transpose(1, 2), weight, bias)

Every output is contiguous, and every input gradient comes back contiguous in its input's layout. The references
are the right-hand sides. The weight gradient sums B per-sample products, each rounded to the weight's dtype (the
reference rounds the one product over all B * L tokens): equal in float32, within rounding in bfloat16.
Under autocast both cast their inputs as `F.linear` does.
"""

import torch


def _autocast(*tensors):
    """`tensors` in the autocast dtype where autocast is on for their device (as autocast treats `F.linear`)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _to_channels_first(x, weight, bias, chunks: int) -> tuple[torch.Tensor, ...]:
    batch = x.shape[0]
    biases = bias.chunk(chunks) if bias is not None else (None,) * chunks
    outputs = []
    for w, b in zip(weight.chunk(chunks), biases):  # (B, O_i, L) = W_i (O_i, I) @ x^T (B, I, L), each chunk apart
        w = w.expand(batch, -1, -1)
        if b is None:
            outputs.append(torch.bmm(w, x.mT))
        else:
            outputs.append(torch.baddbmm(b[None, :, None].expand(batch, -1, x.shape[1]), w, x.mT))
    return tuple(outputs)


def _from_channels_first(x, weight, bias) -> torch.Tensor:
    batch, _, length = x.shape
    w = weight.mT.expand(batch, -1, -1)  # (B, I, O)
    if bias is None:  # (B, L, O) = x^T (B, L, I) @ W^T (I, O)
        return torch.bmm(x.mT, w)
    return torch.baddbmm(bias.expand(batch, length, -1), x.mT, w)


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _LinearToChannelsFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, chunks: int):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.chunks = chunks
        return _to_channels_first(x, weight, bias, chunks)

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        batch = x.shape[0]
        weights = weight.chunk(ctx.chunks)
        grads = [g if g is not None else x.new_zeros(batch, w.shape[0], x.shape[1]) for g, w in zip(grads, weights)]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (B, L, I) = sum_i g_i^T (B, L, O_i) @ W_i (O_i, I)
            for g, w in zip(grads, weights):
                w = w.expand(batch, -1, -1)
                grad_x = torch.bmm(g.mT, w) if grad_x is None else torch.baddbmm(grad_x, g.mT, w)
        if ctx.needs_input_grad[1]:  # (O_i, I) = sum_b g_i[b] (O_i, L) @ x[b] (L, I)
            grad_weight = torch.cat([torch.bmm(g, x).sum(0) for g in grads])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = torch.cat([g.sum((0, 2)) for g in grads])
        return grad_x, grad_weight, grad_bias, None


class _LinearFromChannelsFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _from_channels_first(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (B, I, L) = W^T (I, O) @ g^T (B, O, L)
            grad_x = torch.bmm(weight.mT.expand(x.shape[0], -1, -1), grad.mT)
        if ctx.needs_input_grad[1]:  # (O, I) = sum_b g[b]^T (O, L) @ x[b]^T (L, I)
            grad_weight = torch.bmm(grad.mT, x.mT).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 1))
        return grad_x, grad_weight, grad_bias


def _check(x: torch.Tensor, weight: torch.Tensor, bias, features_dim: int, what: str) -> None:
    if x.dim() != 3 or weight.dim() != 2 or x.shape[features_dim] != weight.shape[1]:
        raise ValueError(f"{what}: x must be 3-D with {weight.shape[1] if weight.dim() == 2 else '?'} features in "
                         f"dimension {features_dim} for a 2-D (O, I) weight; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{what}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_to_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                             chunks: int = 1) -> tuple[torch.Tensor, ...]:
    """`F.linear(x, weight, bias).transpose(1, 2).chunk(chunks, dim=1)`, each chunk a contiguous tensor.

    Args: x (B, L, I); weight (O, I) with O divisible by `chunks`; bias (O,) or None.
    Returns: `chunks` tensors (B, O / chunks, L)."""
    _check(x, weight, bias, 2, "linear_to_channels_first")
    if weight.shape[0] % chunks:
        raise ValueError(f"linear_to_channels_first: {weight.shape[0]} output features do not split into "
                         f"{chunks} equal chunks")
    x, weight, bias = _autocast(x, weight, bias)
    if not _needs_autograd(x, weight, bias):  # inference: the products without autograd.Function's host cost
        return _to_channels_first(x, weight, bias, chunks)
    return _LinearToChannelsFirst.apply(x, weight, bias, chunks)


def linear_from_channels_first(x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x.transpose(1, 2), weight, bias)`, contiguous.

    Args: x (B, I, L); weight (O, I); bias (O,) or None.
    Returns: (B, L, O)."""
    _check(x, weight, bias, 1, "linear_from_channels_first")
    x, weight, bias = _autocast(x, weight, bias)
    if not _needs_autograd(x, weight, bias):
        return _from_channels_first(x, weight, bias)
    return _LinearFromChannelsFirst.apply(x, weight, bias)
