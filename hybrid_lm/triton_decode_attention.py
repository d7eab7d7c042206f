"""Attention of one query per row over a key/value cache (a decode step): the Triton tier, split over the keys.

Shape legend: B = batch, nkv = key/value heads, G = query heads per key/value head (nh = nkv * G), S = keys,
D = head dim, P = key splits; BG, BN, BD = a program's tile (G, keys, D, each rounded up to a power of two, G and D
to at least 16 with `dot`).
Same semantics and signature as `decode_attention_ops.decode_attention_ref` (see there for the formula).

SDPA's kernels give a one-query step one program per (row, head) that walks every key: 16 programs on a GPU of 132
multiprocessors at batch 1, and under torch.compile transformers also copies K and V once per query head of a group
(`repeat_kv`) before them. Here (the flash-decoding scheme) the keys are split into P slices:

    pass 1, one program per (row, key/value head, slice): the G query heads of the group against the slice's keys,
        read once for the whole group; an online softmax gives the slice's running max m, sum l and weighted
        value sum acc (float32 partials)
    pass 2, one program per (row, query head), all slices loaded at once where they fit:
        out = sum_p acc_p e^(m_p - M) / sum_p l_p e^(m_p - M), M = max_p m_p

`DecodeTiles` sets how many slices (about two programs per multiprocessor, each over at least 32 keys). On an
H100, a batch-1 step of mamba-ssm's dense config after an 8192-token prompt took 0.49 ms against SDPA's 0.90
(benchmarks/RESULTS.md, "Generation"). Arithmetic is float32; by default the products are element-wise multiplies
and sums (no `tl.dot`, whose bfloat16 result Triton's CPU interpreter gets wrong). On the H100 that first pass reads
K and V at only 0.44 TB/s at batch 16, and SDPA with `enable_gqa` was several times faster there (RESULTS.md, ninth
session); `DecodeTiles(dot=True)` is the candidate on `tl.dot`, still to be timed.
"""

import functools
from typing import NamedTuple

import torch

try:  # transformers' remote-code loader skips imports inside try blocks; decode_attention_ops falls back
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton kernels need triton: pip install triton") from error

from .custom_ops import eager_or_op, op_namespace, triton_runs_on

_NS = op_namespace(__name__)

_SMS_OFF_GPU = 8  # the interpreter's "multiprocessors": enough that tiny tests cross several slices


class DecodeTiles(NamedTuple):
    """How the kernels split the work. Pass 1 gives each multiprocessor about `programs_per_sm` programs, each over a
    slice of at least `min_keys_per_split` keys, walked `block_n` keys at a time (None: 64 with `dot`, else sized so
    that a tile of BG x BN x BD products holds about 8192 elements) by `num_warps` warps. Pass 2 loads up to
    `combine_elements` / BD slices at once (rounded down to a power of two). `dot` runs pass 1's two products on
    `tl.dot` (tiles padded to 16 query heads and 16 dims; tf32 for bfloat16 / float16 inputs, whose values it holds
    exactly, while the softmax weights are rounded to its 10-bit mantissa) instead of element-wise products and
    sums. The defaults were timed on an H100 (benchmarks/RESULTS.md, "Generation"); `dot` is not yet timed (`python
    benchmarks/decode_attention.py --sweep`)."""

    programs_per_sm: int = 2
    min_keys_per_split: int = 32
    block_n: int | None = None
    num_warps: int = 4
    combine_elements: int = 4096
    dot: bool = False


@triton.jit
def _decode_attention_partial_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, max_ptr, sum_ptr,
    keys, keys_per_split, scaling,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
    stride_vd, stride_mb, stride_mn,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """q: (B, nh, D); k, v: (B, nkv, S, D); mask: (B, S) bool (stride 0 for a mask shared by the rows); any
    strides. Writes acc (B * nkv, P, G, BD), max and sum (B * nkv, P, G), contiguous. DOT: the two products on
    `tl.dot` (BG >= 16, BD >= 16) in float32 at PRECISION, else as element-wise products and sums."""
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = row_head // NUM_KV_HEADS
    kv_head = row_head % NUM_KV_HEADS
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_rows, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BG, BD)

    k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, keys)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        valid = n_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b.to(tl.int64) * stride_mb + n * stride_mn, mask=n_ok, other=0) != 0)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * stride_kn + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        k = k.to(tl.float32)  # (BN, BD)
        if DOT:
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling  # (BG, BN)
        else:
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scaling  # (BG, BN)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no key yet: keep exp(-inf - shift) = 0
        p = tl.exp(scores - shift[:, None])  # (BG, BN)
        rescale = tl.exp(running_max - shift)
        running_sum = running_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * stride_vn + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        v = v.to(tl.float32)  # (BN, BD)
        if DOT:
            acc = acc * rescale[:, None] + tl.dot(p, v, input_precision=PRECISION)
        else:
            acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max

    partial = row_head.to(tl.int64) * splits + split
    tl.store(acc_ptr + (partial * GROUP + g)[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(max_ptr + partial * GROUP + g, running_max, mask=g_ok)
    tl.store(sum_ptr + partial * GROUP + g, running_sum, mask=g_ok)


@triton.jit
def _decode_attention_combine_kernel(
    acc_ptr, max_ptr, sum_ptr, out_ptr, splits, stride_ob, stride_oh,
    HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The partials of one (row, query head) into out (B, nh, D) strided, unit last stride. BLOCK_P slices are
    loaded at once (all of them, where they fit), so the program waits on memory once, not once per slice."""
    row_head = tl.program_id(0)
    b = row_head // HEADS
    head = row_head % HEADS
    g = head % GROUP
    first = (b * (HEADS // GROUP) + head // GROUP).to(tl.int64) * splits  # the (row, key/value head)'s first slice
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    slice_max = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    for p0 in range(0, splits, BLOCK_P):
        partial = first + p0 + p
        slice_max = tl.maximum(slice_max, tl.load(max_ptr + partial * GROUP + g, mask=p0 + p < splits,
                                                  other=float("-inf")))
    overall_max = tl.max(slice_max, axis=0)
    shift = tl.where(overall_max == float("-inf"), 0.0, overall_max)
    total = tl.zeros((BLOCK_P,), tl.float32)
    acc = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for p0 in range(0, splits, BLOCK_P):
        partial = first + p0 + p
        ok = p0 + p < splits
        weight = tl.exp(tl.load(max_ptr + partial * GROUP + g, mask=ok, other=float("-inf")) - shift)  # 0: no keys
        total += tl.load(sum_ptr + partial * GROUP + g, mask=ok, other=0.0) * weight
        acc += tl.load(acc_ptr + (partial * GROUP + g)[:, None] * BLOCK_D + d[None, :], mask=ok[:, None],
                       other=0.0) * weight[:, None]
    total_sum = tl.sum(total, axis=0)
    out = tl.sum(acc, axis=0) / tl.where(total_sum == 0.0, 1.0, total_sum)  # a row without any key attends to nothing
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return _SMS_OFF_GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def key_slices(batch: int, kv_heads: int, keys: int, device: torch.device,
               tiles: DecodeTiles = DecodeTiles()) -> tuple[int, int]:
    """(P, keys per slice): about `tiles.programs_per_sm` pass-1 programs per multiprocessor, each over at least
    `tiles.min_keys_per_split` keys, and no empty slice."""
    wanted = max(1, tiles.programs_per_sm * _multiprocessors(device) // (batch * kv_heads))
    keys_per_split = triton.cdiv(keys, max(1, min(wanted, triton.cdiv(keys, tiles.min_keys_per_split))))
    return triton.cdiv(keys, keys_per_split), keys_per_split


def _launch(query, key, value, mask, scaling: float, tiles: DecodeTiles = DecodeTiles()) -> torch.Tensor:
    """query (B, nh, D), key / value (B, nkv, S, D), mask (B, S) bool or None -> (B, nh, D) in query's dtype."""
    batch, heads, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    block_g, block_d = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    if tiles.dot:  # tl.dot takes tiles of at least 16 x 16
        block_g, block_d = max(16, block_g), max(16, block_d)
    block_n = tiles.block_n
    if block_n is None:  # element-wise products hold a BG x BN x BD tile in registers; `tl.dot` holds none that size
        block_n = 64 if tiles.dot else max(16, min(128, triton.next_power_of_2(8192 // (block_g * block_d))))
    splits, keys_per_split = key_slices(batch, kv_heads, keys, query.device, tiles)
    partials = batch * kv_heads * splits
    acc = torch.empty(partials, group, block_d, device=query.device, dtype=torch.float32)
    running_max = torch.empty(partials, group, device=query.device, dtype=torch.float32)
    running_sum = torch.empty(partials, group, device=query.device, dtype=torch.float32)
    out = torch.empty(batch, heads, head_dim, device=query.device, dtype=query.dtype)
    mask_strides = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    _decode_attention_partial_kernel[(batch * kv_heads, splits)](
        query, key, value, mask, acc, running_max, running_sum,
        keys, keys_per_split, scaling,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides,
        NUM_KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, HAS_MASK=mask is not None,
        # bfloat16 and float16 values are exact in tf32; float32 inputs get full precision
        DOT=tiles.dot, PRECISION="ieee" if key.dtype == torch.float32 else "tf32",
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=tiles.num_warps,
    )
    block_p = min(triton.next_power_of_2(splits), 1 << max(0, (tiles.combine_elements // block_d).bit_length() - 1))
    _decode_attention_combine_kernel[(batch * heads,)](
        acc, running_max, running_sum, out, splits, out.stride(0), out.stride(1),
        HEADS=heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=block_p,
    )
    return out


@torch.library.custom_op(f"{_NS}::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scaling: float) -> torch.Tensor:
    return _launch(query, key, value, mask, scaling)


@_decode_attention_op.register_fake
def _(query, key, value, mask, scaling):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


_decode_attention = eager_or_op(_launch, _decode_attention_op)


def decode_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                            scaling: float, tiles: DecodeTiles | None = None) -> torch.Tensor:
    """`decode_attention_ref`'s contract (decode_attention_ops.py) on the Triton kernels: query (B, nh, 1, D), key /
    value (B, nkv, S, D), mask (B or 1, 1, 1, S) bool or None -> (B, 1, nh, D). No gradient (inference only).
    `tiles`: None takes `DecodeTiles()` (and is what torch.compile sees); others launch directly, for sweeps."""
    if not triton_runs_on(query.device):
        raise ValueError(f"decode_attention_triton: tensors on {query.device}; the kernels run on CUDA (or on CPU "
                         "with TRITON_INTERPRET=1)")
    batch = query.shape[0]
    if mask is not None:
        mask = mask[:, 0, 0, :].expand(batch, -1)  # (B, S); stride 0 over rows for a shared mask
    if tiles is None:
        out = _decode_attention(query[:, :, 0], key, value, mask, float(scaling))  # (B, nh, D)
    else:
        out = _launch(query[:, :, 0], key, value, mask, float(scaling), tiles)
    return out[:, None]
