"""The split-K product of a few rows (the decode step's projections at batch 2-16) against its reference, and the
Inductor pass that puts it into the compiled decode step.

Without CUDA the kernel runs in Triton's interpreter, where `split_k_tiles` counts 8 multiprocessors, so that
narrow products are split into several slices of K (a ragged last one included).
"""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from hybrid_lm.decoding_hybrid_lm import COMPILE_OPTIONS
from hybrid_lm.triton_split_k_matmul import split_k_matmul, split_k_matmul_ref, split_k_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("transposed_weight", [True, False], ids=["weight.T", "contiguous"])
@pytest.mark.parametrize("m, k, n", [
    pytest.param(1, 64, 17, id="one-row-one-slice"),
    pytest.param(3, 700, 96, id="ragged-last-slice"),
    pytest.param(16, 1000, 40, id="ragged-columns"),
    pytest.param(5, 520, 600, id="wide-column-blocks"),
])
def test_partials_match_the_reference_and_sum_to_the_product(m, k, n, transposed_weight, dtype):
    generator = torch.Generator().manual_seed(m * k + n)
    a = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    b = weight.t() if transposed_weight else weight.t().contiguous()  # (K, N): a linear layer's, or row-major
    _, splits, k_per_split = split_k_tiles(n, k, a.device)

    partials = split_k_matmul(a, b)

    assert partials.shape == (splits, m, n) and partials.dtype == torch.float32
    torch.testing.assert_close(partials, split_k_matmul_ref(a, b, k_per_split), rtol=1e-5, atol=1e-4)
    expected = a.double() @ b.double()
    torch.testing.assert_close(partials.sum(0).double(), expected, rtol=1e-5, atol=1e-3)


def test_narrow_products_are_split():
    """The cases above cross several slices (else they would test an unsplit product only)."""
    device = torch.device(DEVICE)
    assert split_k_tiles(96, 700, device)[1] > 1 and split_k_tiles(40, 1000, device)[1] > 1


@pytest.mark.parametrize("a_shape, dtype, message", [
    ((17, 64), torch.bfloat16, "M <= 16"),
    ((4, 64), torch.float32, "half-precision"),
])
def test_bad_input_is_refused(a_shape, dtype, message):
    a = torch.zeros(a_shape, device=DEVICE, dtype=dtype)
    b = torch.zeros(a_shape[1], 8, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        split_k_matmul(a, b)


def compiled_linear(x, weight, residual):
    """What a decode step does around a projection: the product of (B, 1, K) rows, then an element-wise add."""
    return F.linear(x, weight)[:, 0] + residual


@pytest.mark.parametrize("rows, k, dtype, rewritten", [
    pytest.param(3, 600, torch.bfloat16, True, id="bf16-3-rows"),
    pytest.param(16, 512, torch.float16, True, id="fp16-16-rows"),
    pytest.param(17, 600, torch.bfloat16, False, id="17-rows-keep-mm"),
    pytest.param(3, 600, torch.float32, False, id="fp32-keeps-mm"),
    pytest.param(3, 256, torch.bfloat16, False, id="short-k-keeps-mm"),
])
def test_the_decode_step_options_put_small_products_on_the_split_k_kernel(rows, k, dtype, rewritten):
    """Compiled with `COMPILE_OPTIONS`, as the decode step is: a half-precision product of at most 16 rows and
    K >= 512 runs on the split-K kernel (others keep Inductor's matrix product), with the same values."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(rows + k)
    x = torch.randn(rows, 1, k, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(96, k, generator=generator).to(DEVICE, dtype)
    residual = torch.randn(rows, 96, generator=generator).to(DEVICE, dtype)

    out, code = run_and_get_code(torch.compile(compiled_linear, dynamic=False, options=COMPILE_OPTIONS),
                                 x, weight, residual)

    assert ("split_k_matmul" in "\n".join(code)) == rewritten
    expected = x[:, 0].double() @ weight.double().T + residual.double()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # the sum rounded once to the dtype
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
