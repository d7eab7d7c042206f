"""Attention of one new token per row over the key/value cache (a decode step): the reference and the dispatch.

Shape legend: B = batch, nh = query heads, nkv = key/value heads (each serves G = nh / nkv query heads, heads
kv * G .. kv * G + G - 1, as transformers' `repeat_kv` orders them), S = keys, D = head dim.

    scores = scaling * q . k_s                      (float32, per query head and key s; float64 inputs: float64)
    p      = softmax over the keys s where mask is True (masked keys weigh 0)
    out    = sum_s p_s v_s                          (rounded to the query's dtype once)

SDPA with a boolean mask computes the same; `decode_attention_ref` keeps the formula. The Triton tier
(triton_decode_attention.py) splits the keys over many programs and reads each key once per group of query heads.
"""

import torch

from .custom_ops import has_triton_dtypes, tier_runs_on

try:  # transformers' remote-code loader skips imports inside try blocks; without triton, SDPA runs
    from .triton_decode_attention import decode_attention_triton
except ImportError:
    decode_attention_triton = None

_MAX_HEAD_DIM = 256


def decode_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scaling: float) -> torch.Tensor:
    """Reference attention of one query per row.

    Args:
        query: (B, nh, 1, D).  key, value: (B, nkv, S, D), nkv dividing nh.
        mask: (B or 1, 1, 1, S) bool, True where the key counts, or None (every key counts).
        scaling: the factor of the scores (usually D ** -0.5).
    Returns:
        (B, 1, nh, D) in query's dtype (the layout transformers' attention functions return). A row whose keys are
        all masked gets zeros.
    """
    batch, heads, _, head_dim = query.shape
    group = heads // key.shape[1]
    compute = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 for float64 inputs
    q = query.to(compute).reshape(batch, key.shape[1], group, head_dim)  # (B, nkv, G, D)
    scores = torch.einsum("bhgd,bhsd->bhgs", q, key.to(compute)) * scaling  # (B, nkv, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, 0, None, :], float("-inf"))  # mask (B, 1, 1, S) over every head
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row without keys: 0 / 0 -> 0
    out = torch.einsum("bhgs,bhsd->bhgd", weights, value.to(compute))  # (B, nkv, G, D)
    return out.reshape(batch, 1, heads, head_dim).to(query.dtype)


def decode_kernel_takes(query, key, value, mask, backend: str, dropout: float) -> bool:
    """Whether the Triton kernels run this call: one query per row, no dropout, tensors the tier runs on
    (`custom_ops.tier_runs_on`: one device, CUDA unless "torch", no DTensors) in float32 / bfloat16 / float16,
    D at most 256, nkv dividing nh, and a boolean mask
    (B or 1, 1, 1, S) or none. Decided from types and shapes only, so the same in eager mode, under torch.compile
    and in CUDA graphs."""
    batch, heads, length, head_dim = query.shape
    return (
        decode_attention_triton is not None
        and tier_runs_on(backend, query, key, value, mask)
        and length == 1 and dropout == 0.0 and not torch.is_grad_enabled()
        and has_triton_dtypes(query, key, value) and key.dtype == value.dtype
        and key.dim() == value.dim() == 4 and key.shape == value.shape and key.shape[0] == batch
        and key.shape[-1] == head_dim <= _MAX_HEAD_DIM and heads % key.shape[1] == 0
        and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4
                              and mask.shape[0] in (1, batch) and mask.shape[1:3] == (1, 1)
                              and mask.shape[-1] == key.shape[2]))
    )

