"""The matrix product of a few rows by a weight (a decode step of 2-16 rows), split along K: the Triton kernel and
its reference.

Shape legend: M = rows (at most BLOCK_M = 16), K = the reduced dimension, N = output columns, S = slices of K.

    partials[s] = a[:, K_s] @ b[K_s, :]   (float32)        a @ b = partials.sum(0)

cuBLAS tiles such a product along N only: for out_proj (2048 -> 1024) at 16 rows that is 16 programs on a GPU of
132 streaming multiprocessors, which reads the weight at a fraction of the memory bandwidth (4.8 us on an H100
against a 0.9 us floor; benchmarks/RESULTS.md, "Generation"). Here each of the cdiv(N, BLOCK_N) column blocks is
also split into S slices of K, so that about two programs per multiprocessor share the read. The S float32 partial
products are returned unsummed: under torch.compile the sum fuses into the kernel that consumes the product (the
residual add, the activation), where a separate reduction would cost a launch of its own.
"""

import torch

try:  # transformers' remote-code loader skips imports inside try blocks; decoding_hybrid_lm then keeps cuBLAS
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton kernels need triton: pip install triton") from error

from .custom_ops import op_namespace, triton_runs_on

_NS = op_namespace(__name__)

BLOCK_M = 16  # the rows one program holds: the smallest tile `tl.dot` takes
BLOCK_K = 64
MAX_SPLITS = 8
_PROGRAMS_PER_SM = 2
_SMS_OFF_GPU = 8  # the interpreter's multiprocessor count: small, so that the tests cover several splits


@triton.jit
def _split_k_matmul_kernel(a_ptr, b_ptr, partials_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                           k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT_IN_FLOAT32: tl.constexpr):
    """a: (M, K); b: (K, N), any strides; partials: (S, M, N) float32 contiguous. Program (n, s) computes the
    columns n * BLOCK_N + [0, BLOCK_N) of partials[s], over K in [s * k_per_split, (s + 1) * k_per_split)."""
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + ks
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (k[None, :] < k_end), other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(b_ptr + k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(k[:, None] < k_end) & (cols[None, :] < N), other=0.0)  # (BLOCK_K, BLOCK_N)
        if DOT_IN_FLOAT32:  # exact: the products of half-precision values are exact in float32
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    out = partials_ptr + split * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def split_k_tiles(n: int, k: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, S, K per slice) for an (M, K) @ (K, N) product on `device`: 64 columns a program (16 for a
    narrow N), then the most slices (a power of two, at most MAX_SPLITS) that keep the programs within about two
    per streaming multiprocessor. Decided from shapes and the device only, so the fake and the kernel agree."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _SMS_OFF_GPU
    block_n = 64 if n >= 512 else 16
    programs = triton.cdiv(n, block_n)
    splits = 1
    while splits < MAX_SPLITS and programs * splits * 2 <= _PROGRAMS_PER_SM * sms:
        splits *= 2
    k_per_split = triton.cdiv(triton.cdiv(k, splits), BLOCK_K) * BLOCK_K
    return block_n, triton.cdiv(k, k_per_split), k_per_split


def split_k_matmul_ref(a: torch.Tensor, b: torch.Tensor, k_per_split: int) -> torch.Tensor:
    """Reference: a (M, K) @ b (K, N) over slices of `k_per_split` columns of K, float32 partials (S, M, N)."""
    return torch.stack([a[:, k0:k0 + k_per_split].float() @ b[k0:k0 + k_per_split].float()
                        for k0 in range(0, a.shape[1], k_per_split)])


@torch.library.custom_op(f"{_NS}::split_k_matmul", mutates_args=())
def split_k_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) as float32 partial products (S, M, N) over slices of K (sum them for the product);
    M <= 16, a and b bfloat16 or float16, on a device Triton runs on. The slices are `split_k_tiles`'."""
    m, k = a.shape
    n = b.shape[1]
    if m > BLOCK_M or b.shape[0] != k or a.dtype != b.dtype or a.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"split_k_matmul takes a (M <= {BLOCK_M}, K) and b (K, N) of one half-precision dtype; "
                         f"got {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")
    if not triton_runs_on(a.device):
        raise ValueError(f"split_k_matmul runs where Triton does (CUDA, or CPU with TRITON_INTERPRET=1), "
                         f"not on {a.device}")
    block_n, splits, k_per_split = split_k_tiles(n, k, a.device)
    partials = torch.empty(splits, m, n, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), splits)
    _split_k_matmul_kernel[grid](a, b, partials, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                 k_per_split, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
                                 # Triton's interpreter (3.9) gives wrong values for a bfloat16 tl.dot
                                 DOT_IN_FLOAT32=a.device.type == "cpu", num_warps=4, num_stages=4)
    return partials


@split_k_matmul.register_fake
def _(a, b):
    _, splits, _ = split_k_tiles(b.shape[1], a.shape[1], a.device)
    return a.new_empty(splits, a.shape[0], b.shape[1], dtype=torch.float32)
