"""The language-modelling loss straight from the hidden states: lm_head and cross-entropy, a chunk of rows at a time.

Shape legend: N = token rows, H = hidden size, V = vocabulary, C = rows per chunk.

    loss = sum_i [logsumexp(h_i W^T) - (h_i W^T)[y_i]] / divisor        (rows with y_i == ignore_index left out)

The plain path materialises the (N, V) logits in float32 (and the same again for their gradient): at 4 x 2048 tokens
and V = 32000 that is 1 GiB each. Here a chunk of C rows is projected, its loss summed and its gradients with respect
to the hidden states and to W computed at once (they are known in the forward: d loss / d logits = softmax - onehot),
so only (C, V) float32 exists at a time; the backward only scales the stored gradients by the incoming one. The
same trick as Liger-Kernel's fused linear cross-entropy. The matrix products run on the usual kernels; the step
between them (each row's loss and gradient from its logits, `cross_entropy_rows_ref`) is one Triton kernel in eager
CUDA calls (triton_cross_entropy.py: three passes over the chunk's logits instead of about ten, one launch instead
of about fifteen, no float32 copy), and PyTorch ops elsewhere: on CPU, and under torch.compile, whose Inductor fuses
them into kernels of its own.
"""

import torch

from .custom_ops import has_triton_dtypes, triton_runs_on

try:  # transformers' remote-code loader skips imports inside try blocks; without triton the reference runs
    from .triton_cross_entropy import cross_entropy_rows_triton
except ImportError:
    cross_entropy_rows_triton = None

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


def cross_entropy_rows_ref(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Each row's loss and its gradient with respect to the row's logits.

    Args:
        logits: (C, V).  labels: (C,) targets, `ignore_index` = no target.
    Returns:
        loss (C,) float32 (at least): logsumexp(x) - x[y], 0 on ignored rows; and the gradient (C, V) in the
        logits' dtype: softmax(x) - onehot(y), 0 on ignored rows.
    """
    logits = _upcast(logits)
    kept = labels != ignore_index
    target = torch.where(kept, labels, 0)
    log_z = torch.logsumexp(logits, dim=-1)  # (C,)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    grad = torch.exp(logits - log_z[:, None])
    grad.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
    grad *= kept[:, None]
    return torch.where(kept, log_z - picked, 0.0), grad


def _rows_kernel_takes(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `cross_entropy_rows_triton` computes the chunks by default: in eager calls on CUDA (Inductor fuses the
    reference's ops itself when compiling), with Triton installed and tensors of a dtype it takes."""
    return (cross_entropy_rows_triton is not None and hidden.device.type == "cuda"
            and not torch.compiler.is_compiling() and has_triton_dtypes(hidden, weight))


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(hidden, weight, labels, divisor, ignore_index, chunk_rows, use_kernel):
        needs_hidden_grad, needs_weight_grad = hidden.requires_grad, weight.requires_grad
        loss_dtype = _upcast(hidden).dtype
        row_losses = hidden.new_empty(hidden.shape[0], dtype=loss_dtype)
        grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=_upcast(weight).dtype) if needs_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h, y = hidden[start:start + chunk_rows], labels[start:start + chunk_rows]
            logits = h @ weight.T  # (C, V)
            if use_kernel:  # the gradient overwrites the logits
                grad_logits = cross_entropy_rows_triton(logits, y, ignore_index, row_losses[start:start + chunk_rows])
            else:
                row_losses[start:start + chunk_rows], grad_logits = cross_entropy_rows_ref(logits, y, ignore_index)
                grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start:start + chunk_rows])
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h
        if divisor is None:
            divisor = (labels != ignore_index).sum()
        scale = 1.0 / torch.as_tensor(divisor, dtype=loss_dtype, device=hidden.device)
        return row_losses.sum() * scale, grad_hidden, grad_weight, scale

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
            None, None, None, None, None,
        )


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         divisor: torch.Tensor | float | None = None, ignore_index: int = -100,
                         chunk_rows: int | None = None, use_kernel: bool | None = None) -> torch.Tensor:
    """`linear_cross_entropy_ref` without the full logits: the same loss and gradients, C rows at a time.

    Args as for the reference; chunk_rows: C (default: as many rows as keep C x V float32 within 128 MiB);
    use_kernel: compute each chunk's row losses and gradients with `cross_entropy_rows_triton` (True), with
    `cross_entropy_rows_ref` (False), or the kernel where it runs (None: eager CUDA calls, see `_rows_kernel_takes`).
    Gradients flow to `hidden` and `weight` (the reference's float32 accumulation for W, cast to its dtype).
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(f"linear_cross_entropy takes hidden (N, H), weight (V, H) and labels (N,), got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(labels.shape)}")
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # as autocast runs F.linear: the product in the autocast dtype; the Function then runs outside autocast
        # (its preallocated gradients take its inputs' dtype), and autograd casts the gradients back
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels, divisor, ignore_index,
                                        chunk_rows, use_kernel)
    if use_kernel is None:
        use_kernel = _rows_kernel_takes(hidden, weight)
    elif use_kernel and (cross_entropy_rows_triton is None or not triton_runs_on(hidden.device)
                         or not has_triton_dtypes(hidden, weight)):
        raise ValueError("use_kernel=True needs triton and float32 / bfloat16 / float16 tensors on a CUDA device "
                         "(or on CPU in Triton's interpreter, TRITON_INTERPRET=1); pass use_kernel=None")
    return _LinearCrossEntropyFn.apply(hidden, weight, labels, divisor, ignore_index, chunk_rows, use_kernel)[0]
