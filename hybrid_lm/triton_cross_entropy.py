"""The per-row step of `cross_entropy_ops.linear_cross_entropy` as one Triton kernel: each row's loss and, written
over the logits, its gradient.

Shape legend: C = rows of a chunk, V = vocabulary.
Same contract as `cross_entropy_ops.cross_entropy_rows_ref`: for a row x with target y,

    loss = logsumexp(x) - x[y]          d loss / d x = softmax(x) - onehot(y)

both 0 on a row whose target is `ignore_index`. Arithmetic is float32 whatever the logits' dtype; the gradient is
rounded to that dtype, as the reference rounds it before the matrix products.

One program per row reads it twice (a running max and sum of exponentials per lane, then the gradient) and writes
it once: three passes over C x V where the PyTorch reference makes about ten (an upcast copy, logsumexp's
reductions, the subtraction, the exponential, the scatter, the mask and the downcast), in one launch instead of
about fifteen. Rows are independent: no atomics, deterministic.
"""

import torch

try:  # transformers' remote-code loader skips imports inside try blocks; cross_entropy_ops falls back to the reference
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton kernels need triton: pip install triton") from error

from .custom_ops import require_triton_dtypes

# Vocabulary entries a program handles per step of its loops.
BLOCK_V = 4096


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, labels_ptr, loss_ptr, vocab, stride_row, ignore_index,
                               BLOCK_V: tl.constexpr):
    """logits: (C, V) with unit column stride, overwritten by the gradient; labels: (C,) int; loss: (C,) float32."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    kept = label != ignore_index
    offs = tl.arange(0, BLOCK_V)
    # a finite start: a lane that only ever sees masked (-inf) entries keeps exp(start - start) = 1 times 0
    running_max = tl.full([BLOCK_V], -3.0e38, dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(x - new_max)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    log_z = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
    target = tl.where(kept, label, 0)
    picked = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(kept, log_z - picked, 0.0))
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - log_z) - tl.where(cols == target, 1.0, 0.0)
        grad = tl.where(kept, grad, 0.0)
        tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_triton(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                              loss: torch.Tensor) -> torch.Tensor:
    """`cross_entropy_rows_ref` in place: writes each row's loss into `loss` (C,) float32 and the gradient over
    `logits` (C, V), which must have unit column stride. Returns `logits`, now the gradient."""
    require_triton_dtypes("cross_entropy_rows_triton", logits=logits)
    if logits.dim() != 2 or logits.stride(1) != 1 or labels.shape != logits.shape[:1] or loss.shape != labels.shape:
        raise ValueError(f"cross_entropy_rows_triton takes logits (C, V) with unit column stride, labels (C,) and "
                         f"loss (C,), got {tuple(logits.shape)} (strides {logits.stride()}), {tuple(labels.shape)} "
                         f"and {tuple(loss.shape)}")
    if loss.dtype != torch.float32 or not loss.is_contiguous():
        raise ValueError(f"loss must be a contiguous float32 tensor, got {loss.dtype}")
    rows, vocab = logits.shape
    if rows:
        _cross_entropy_rows_kernel[(rows,)](logits, labels, loss, vocab, logits.stride(0), ignore_index,
                                            BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8)
    return logits
