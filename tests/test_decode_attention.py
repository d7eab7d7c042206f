"""The split-K decode attention kernels (triton_decode_attention.py) against the reference, the reference against
SDPA in float64, and the model's decode steps with and without the kernels.

Without CUDA the kernels run in Triton's interpreter on tiny shapes; its few "multiprocessors" make the keys split
into several slices, so the combine pass is crossed.
"""

import pytest
import torch
import torch.nn.functional as F
from builders import tiny_config
from transformers import DynamicCache

from hybrid_lm import HybridLMForCausalLM, decode_attention_ops, triton_decode_attention
from hybrid_lm.decode_attention_ops import decode_attention_ref, decode_kernel_takes
from hybrid_lm.triton_decode_attention import decode_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# one rounding of the output in the dtype (the interpreter truncates to bfloat16 where the GPU rounds), else float32
OUT_ATOL = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def make_inputs(batch, heads, kv_heads, keys, head_dim, dtype, mask_kind, device=DEVICE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, head_dim, generator=generator).to(device, dtype)
    key = torch.randn(batch, kv_heads, keys, head_dim, generator=generator).to(device, dtype)
    value = torch.randn(batch, kv_heads, keys, head_dim, generator=generator).to(device, dtype)
    if mask_kind is None:
        return query, key, value, None
    if mask_kind == "shared":  # one row of the cache filled up to some length, shared by the batch
        return query, key, value, (torch.arange(keys) < max(1, keys - 3)).view(1, 1, 1, keys).to(device)
    # left padding of a different length per row, and the cache's unfilled tail
    lengths = torch.randint(1, keys + 1, (batch,), generator=generator)
    start = (torch.rand(batch, generator=generator) * (keys - lengths)).long()
    positions = torch.arange(keys)
    mask = (positions >= start[:, None]) & (positions < (start + lengths)[:, None])
    return query, key, value, mask.view(batch, 1, 1, keys).to(device)


def sdpa_float64(query, key, value, mask, scaling):
    """SDPA itself, with K and V repeated per query head as transformers' `repeat_kv` does, in float64."""
    group = query.shape[1] // key.shape[1]
    key, value = (t.double().repeat_interleave(group, dim=1) for t in (key, value))
    out = F.scaled_dot_product_attention(query.double(), key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)  # (B, 1, nh, D)


SHAPES = [  # batch, heads, kv heads, keys, head dim (gqa and mqa: several key slices in the interpreter too)
    pytest.param((1, 4, 4, 1, 8), id="one-key"),
    pytest.param((2, 4, 2, 200, 16), id="gqa-several-slices"),
    pytest.param((3, 6, 2, 37, 24), id="odd-head-dim"),
    pytest.param((2, 8, 1, 130, 32), id="mqa"),
]


@pytest.mark.parametrize("mask_kind", [None, "shared", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_the_reference(shape, dtype, mask_kind):
    query, key, value, mask = make_inputs(*shape, dtype, mask_kind)
    scaling = shape[-1] ** -0.5
    with torch.no_grad():
        assert decode_kernel_takes(query, key, value, mask, "triton", 0.0)
        out = decode_attention_triton(query, key, value, mask, scaling)
    expected = decode_attention_ref(query, key, value, mask, scaling)
    assert out.shape == expected.shape == (shape[0], 1, shape[1], shape[-1]) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=OUT_ATOL[dtype])


def test_any_strides():
    """Views as the model and torch.compile may hand them over: a query slice of a wider tensor, keys and values
    with the head dim outermost in memory."""
    query, key, value, mask = make_inputs(2, 4, 2, 90, 16, torch.float32, "padded")
    query = torch.cat([query, query], dim=-1)[..., 16:]
    key, value = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (key, value))
    with torch.no_grad():
        assert decode_kernel_takes(query, key, value, mask, "triton", 0.0)
        out = decode_attention_triton(query, key, value, mask, 0.25)
    torch.testing.assert_close(out, decode_attention_ref(query, key, value, mask, 0.25), rtol=0,
                               atol=OUT_ATOL[torch.float32])


@pytest.mark.parametrize("dot", [False, True], ids=["sums", "dot"])
def test_a_slice_walked_in_several_key_steps(dot):
    """The online softmax across the steps of one slice: slices of 50 keys walked 16 at a time, scores that grow
    along the keys (the running max rises from step to step), and masks that open a slice with masked steps (row 0)
    or close it with them (row 1)."""
    query, key, value, _ = make_inputs(2, 4, 2, 200, 16, torch.float32, None)
    key = key * (1 + torch.arange(200, device=DEVICE) / 50)[:, None]
    positions = torch.arange(200, device=DEVICE)
    mask = torch.stack([positions >= 70, positions < 121]).view(2, 1, 1, 200)
    tiles = triton_decode_attention.DecodeTiles(min_keys_per_split=64, block_n=16, dot=dot)
    splits, keys_per_split = triton_decode_attention.key_slices(2, 2, 200, query.device, tiles)
    assert splits > 1 and keys_per_split > 2 * tiles.block_n, "the test needs slices of several key steps"
    with torch.no_grad():
        out = decode_attention_triton(query, key, value, mask, 0.25, tiles)
    torch.testing.assert_close(out, decode_attention_ref(query, key, value, mask, 0.25), rtol=0,
                               atol=OUT_ATOL[torch.float32])


def test_the_keys_are_split_and_masked_slices_count_nothing():
    """Several slices per (row, head), one of them without any key, and a row without any key (zeros)."""
    query, key, value, _ = make_inputs(2, 4, 2, 200, 16, torch.float32, None)
    mask = torch.ones(2, 1, 1, 200, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :150] = False  # the first slices of row 0 have no key
    mask[1] = False  # row 1 has none at all
    splits, keys_per_split = triton_decode_attention.key_slices(2, 2, 200, query.device)
    assert splits > 1 and keys_per_split < 150, "the test needs several slices, the first ones without keys"
    with torch.no_grad():
        out = decode_attention_triton(query, key, value, mask, 0.25)
    expected = decode_attention_ref(query, key, value, mask, 0.25)
    torch.testing.assert_close(out, expected, rtol=0, atol=OUT_ATOL[torch.float32])
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_products_on_tl_dot_match_the_reference(shape, dtype):
    """`DecodeTiles(dot=True)`: tiles padded to 16 query heads and 16 dims (every shape here has fewer)."""
    query, key, value, mask = make_inputs(*shape, dtype, "padded")
    scaling = shape[-1] ** -0.5
    with torch.no_grad():
        out = decode_attention_triton(query, key, value, mask, scaling, triton_decode_attention.DecodeTiles(dot=True))
    torch.testing.assert_close(out.float(), decode_attention_ref(query, key, value, mask, scaling).float(), rtol=0,
                               atol=OUT_ATOL[dtype])


@pytest.mark.parametrize("mask_kind", [None, "padded"])
def test_the_combine_takes_the_slices_in_several_loads(mask_kind):
    """Tiles whose combine pass loads fewer slices at once than there are (the last load partly masked), and
    slices of few keys."""
    query, key, value, mask = make_inputs(2, 4, 2, 200, 16, torch.float32, mask_kind)
    tiles = triton_decode_attention.DecodeTiles(programs_per_sm=5, min_keys_per_split=8, block_n=8,
                                                combine_elements=4 * 16)  # 4 slices a load
    splits, _ = triton_decode_attention.key_slices(2, 2, 200, query.device, tiles)
    assert splits > 4 and splits % 4, "the test needs more slices than one load holds, the last load partly masked"
    with torch.no_grad():
        out = decode_attention_triton(query, key, value, mask, 0.25, tiles)
    torch.testing.assert_close(out, decode_attention_ref(query, key, value, mask, 0.25), rtol=0,
                               atol=OUT_ATOL[torch.float32])


@pytest.mark.parametrize("mask_kind", [None, "shared", "padded"])
def test_reference_is_sdpa(mask_kind):
    query, key, value, mask = make_inputs(3, 6, 2, 40, 16, torch.float64, mask_kind, device="cpu")
    torch.testing.assert_close(decode_attention_ref(query, key, value, mask, 0.3),
                               sdpa_float64(query, key, value, mask, 0.3))


def test_which_calls_the_kernels_take():
    query, key, value, mask = make_inputs(2, 4, 2, 20, 16, torch.float32, "padded")
    with torch.no_grad():
        assert decode_kernel_takes(query, key, value, mask, "triton", 0.0)
        assert not decode_kernel_takes(query, key, value, mask, "triton", 0.1)  # dropout
        assert not decode_kernel_takes(query.expand(2, 4, 3, 16), key, value, mask, "triton", 0.0)  # 3 queries
        assert not decode_kernel_takes(query.double(), key.double(), value.double(), mask, "triton", 0.0)
        assert not decode_kernel_takes(query, key, value, mask.float(), "triton", 0.0)  # an additive mask
        assert not decode_kernel_takes(query, key, value, mask[..., :10], "triton", 0.0)
        assert not decode_kernel_takes(query[:, :3], key, value, mask, "triton", 0.0)  # 3 heads over 2
        if DEVICE == "cpu":  # CPU tensors: the interpreter, for the "triton" tier only
            assert not decode_kernel_takes(query, key, value, mask, "auto", 0.0)
        else:
            assert not decode_kernel_takes(query, key, value, mask, "torch", 0.0)
    assert not decode_kernel_takes(query, key, value, mask, "triton", 0.0)  # gradients enabled


def test_dtensors_are_left_to_sdpa():
    """A tensor-parallel plan may hand the attention DTensors; the kernels take plain tensors only."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    query, key, value, mask = make_inputs(2, 4, 2, 20, 16, torch.float32, "padded")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh(DEVICE, (1,))
        with torch.no_grad():
            assert decode_kernel_takes(query, key, value, mask, "triton", 0.0)
            key = DTensor.from_local(key, mesh, [Replicate()], run_check=False)
            assert not decode_kernel_takes(query, key, value, mask, "triton", 0.0)
    finally:
        dist.destroy_process_group()


def test_the_custom_op_is_registered_correctly():
    query, key, value, mask = make_inputs(2, 4, 2, 20, 16, torch.float32, "padded")
    torch.library.opcheck(triton_decode_attention._decode_attention_op,
                          (query[:, :, 0], key, value, mask[:, 0, 0], 0.25))


def decode_logits(model, input_ids, attention_mask, steps):
    """The logits of a left-padded prompt's prefill and `steps` greedy decode steps, through the model's forward."""
    cache = DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=attention_mask, cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


def test_model_decode_steps_take_the_kernels_and_match_sdpa(monkeypatch):
    torch.manual_seed(0)
    model = HybridLMForCausalLM(tiny_config(kernel_backend="triton")).to(DEVICE).eval()
    input_ids = torch.randint(1, 97, (3, 6), device=DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding
    attention_mask[2, :4] = 0
    calls = []
    kernel = decode_attention_ops.decode_attention_triton
    monkeypatch.setattr("hybrid_lm.modeling_hybrid_lm.decode_attention_triton",
                        lambda *args: calls.append(1) or kernel(*args))
    with_kernels = decode_logits(model, input_ids, attention_mask, steps=3)
    assert len(calls) == 3 * 2  # every step of both attention layers
    monkeypatch.setattr("hybrid_lm.modeling_hybrid_lm.decode_kernel_takes", lambda *args: False)
    with_sdpa = decode_logits(model, input_ids, attention_mask, steps=3)
    torch.testing.assert_close(with_kernels, with_sdpa, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dot", [False, True], ids=["sums", "dot"])
@pytest.mark.parametrize("shape", [(1, 16, 4, 8448, 64), (16, 16, 4, 384, 64), (4, 32, 8, 2000, 128),
                                   (64, 8, 8, 300, 80)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_match_the_reference_at_model_shapes(shape, dtype, dot):
    query, key, value, mask = make_inputs(*shape, dtype, "padded")
    with torch.no_grad():
        out = decode_attention_triton(query, key, value, mask, shape[-1] ** -0.5,
                                      triton_decode_attention.DecodeTiles(dot=dot))
    expected = decode_attention_ref(query, key, value, mask, shape[-1] ** -0.5)
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=OUT_ATOL[dtype])
