"""The language-modelling loss straight from the hidden states: lm_head and cross-entropy, a chunk of rows at a time.

Shape legend: N = token rows, H = hidden size, V = vocabulary, C = rows per chunk.

    loss = sum_i [logsumexp(h_i W^T) - (h_i W^T)[y_i]] / divisor        (rows with y_i == ignore_index left out)

The plain path materialises the (N, V) logits in float32 (and the same again for their gradient): at 4 x 2048 tokens
and V = 32000 that is 1 GiB each. Here a chunk of C rows is projected, its loss summed and its gradients with respect
to the hidden states and to W computed at once (they are known in the forward: d loss / d logits = softmax - onehot),
so only (C, V) float32 exists at a time; the backward only scales the stored gradients by the incoming one. The
same trick as Liger-Kernel's fused linear cross-entropy, written in plain PyTorch ops: the matrix products dominate
and run on the usual kernels.
"""

import torch

# Rows per chunk: C x V float32 logits of at most this many elements (128 MiB).
CHUNK_ELEMENTS = 2**25


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             divisor: torch.Tensor | float | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Reference: full float32 logits, then `F.cross_entropy` (what transformers' causal-LM loss does).

    Args:
        hidden: (N, H).  weight: (V, H), lm_head's.  labels: (N,) targets, `ignore_index` = no target.
        divisor: what the summed loss is divided by (transformers' `num_items_in_batch`); None = the number of
            rows with a target (the mean).
    Returns:
        the 0-dim float32 loss.
    """
    logits = _upcast(hidden @ weight.T)
    total = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / ((labels != ignore_index).sum() if divisor is None else divisor)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (the loss is always computed in at least float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(hidden, weight, labels, divisor, ignore_index, chunk_rows):
        needs_hidden_grad, needs_weight_grad = hidden.requires_grad, weight.requires_grad
        total = hidden.new_zeros((), dtype=_upcast(hidden).dtype)
        grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=_upcast(weight).dtype) if needs_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h, y = hidden[start:start + chunk_rows], labels[start:start + chunk_rows]
            logits = _upcast(h @ weight.T)  # (C, V)
            kept = y != ignore_index
            target = torch.where(kept, y, 0)
            log_z = torch.logsumexp(logits, dim=-1)  # (C,)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(kept, log_z - picked, 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of row losses) / d logits = softmax - onehot on kept rows, 0 on ignored ones
            grad_logits = torch.exp(logits - log_z[:, None])
            grad_logits.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
            grad_logits *= kept[:, None]
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h
        if divisor is None:
            divisor = (labels != ignore_index).sum()
        scale = 1.0 / torch.as_tensor(divisor, dtype=total.dtype, device=hidden.device)
        return total * scale, grad_hidden, grad_weight, scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_hidden, grad_weight, scale = output
        ctx.weight_dtype = inputs[1].dtype
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        ctx.mark_non_differentiable(*(t for t in (grad_hidden, grad_weight, scale) if t is not None))

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_loss * scale
        return (
            None if grad_hidden is None else grad_hidden * factor.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * factor).to(ctx.weight_dtype),
            None, None, None, None,
        )


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         divisor: torch.Tensor | float | None = None, ignore_index: int = -100,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """`linear_cross_entropy_ref` without the full logits: the same loss and gradients, C rows at a time.

    Args as for the reference; chunk_rows: C (default: as many rows as keep C x V float32 within 128 MiB).
    Gradients flow to `hidden` and `weight` (the reference's float32 accumulation for W, cast to its dtype).
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(f"linear_cross_entropy takes hidden (N, H), weight (V, H) and labels (N,), got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(labels.shape)}")
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropyFn.apply(hidden, weight, labels, divisor, ignore_index, chunk_rows)[0]
