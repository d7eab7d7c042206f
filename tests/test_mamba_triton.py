"""The Triton kernels against the pure-PyTorch reference (run on float64 copies): outputs and every gradient.

Without CUDA the kernels run in Triton's interpreter on tiny shapes, with tiles small enough (`short_chunks`)
that several chunks and programs are crossed. Tests marked `gpu` cover the lengths, widths, d_state values and dtypes
of real models on a GPU.
"""

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybrid_lm import mamba_conv_triton, mamba_scan_triton
from hybrid_lm.mamba_conv_ref import causal_conv1d_ref, causal_conv1d_update_ref
from hybrid_lm.mamba_conv_triton import (
    ConvTiles,
    causal_conv1d_triton,
    causal_conv1d_update_triton,
)
from hybrid_lm.mamba_scan_ref import selective_scan_ref, selective_state_update_ref
from hybrid_lm.mamba_scan_triton import (
    ScanTiles,
    selective_scan_triton,
    selective_state_update_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


class RecordedOps(TorchDispatchMode):
    """The names of the aten / custom ops called inside the block (a custom op counts as one)."""

    def __enter__(self):
        self.names = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def short_chunks():
    """Tiles for (scan, conv): in the interpreter, chunks of 8 steps so that L <= 40 crosses several of them, and 4
    channels a program so that several programs run; on a GPU the defaults."""
    if DEVICE == "cpu":
        return {"tiles": ScanTiles(chunk=8, block_d=4, block_d_backward=4)}, {"tiles": ConvTiles(block_l=8)}
    return {}, {}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def assert_close(name, actual, expected, dtype):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    assert error < TOLERANCE[dtype], f"{name}: relative error {error:.2e} (NaN fails)"


def documents(batch, length, generator):
    """(B, L) sorted random document ids, several documents per row."""
    ids = torch.randint(0, max(2, length // 5), (batch, length), generator=generator)
    return ids.sort(dim=1).values.to(DEVICE)


def check_scan(batch, channels, length, d_state, dtype, z=True, skip=True, bias=True, init=True, seq=True, seed=0,
               tiles=None):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dt)

    inputs = {
        "u": rand(batch, channels, length), "delta": rand(batch, channels, length, scale=0.5),
        "A": (-torch.rand(channels, d_state, generator=generator) - 0.2).to(DEVICE),
        "B": rand(batch, d_state, length), "C": rand(batch, d_state, length),
        "D": rand(channels, dt=torch.float32) if skip else None, "z": rand(batch, channels, length) if z else None,
        "delta_bias": rand(channels, scale=0.3, dt=torch.float32) if bias else None,
        "initial_state": rand(batch, channels, d_state, dt=torch.float32) if init else None,
    }
    seq_idx = documents(batch, length, generator) if seq else None
    grad_out, grad_final = rand(batch, channels, length), rand(batch, channels, d_state, dt=torch.float32)

    def run(fn, cast):
        leaves = {k: (cast(v).requires_grad_() if v is not None else None) for k, v in inputs.items()}
        out, final = fn(**leaves, delta_softplus=bias, seq_idx=seq_idx, return_final_state=True)
        (out.double() * grad_out.double()).sum().add((final.double() * grad_final.double()).sum()).backward()
        return out, final, leaves

    out, final, leaves = run(functools.partial(selective_scan_triton, tiles=tiles), lambda t: t.detach().clone())
    ref_out, ref_final, ref_leaves = run(selective_scan_ref, lambda t: t.detach().double())
    assert out.dtype == dtype and final.dtype == torch.float32
    assert_close("out", out, ref_out, dtype)
    assert_close("final state", final, ref_final, dtype)
    for name, leaf in leaves.items():
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype, name
            assert_close(f"d{name}", leaf.grad, ref_leaves[name].grad, dtype)


def check_conv(batch, channels, length, width, dtype, bias=True, init=True, seq=True, silu=True, seed=0,
               tiles=None):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    inputs = {"x": rand(batch, channels, length), "weight": rand(channels, width), "bias": rand(channels) if bias else None,
              "initial_state": rand(batch, channels, width - 1) if init else None}
    seq_idx = documents(batch, length, generator) if seq else None
    grad_out, grad_final = rand(batch, channels, length), rand(batch, channels, width - 1)

    def run(fn, cast):
        leaves = {k: (cast(v).requires_grad_() if v is not None else None) for k, v in inputs.items()}
        out, final = fn(**leaves, seq_idx=seq_idx, activation="silu" if silu else None, return_final_state=True)
        (out.double() * grad_out.double()).sum().add((final.double() * grad_final.double()).sum()).backward()
        return out, final, leaves

    out, final, leaves = run(functools.partial(causal_conv1d_triton, tiles=tiles), lambda t: t.detach().clone())
    ref_out, ref_final, ref_leaves = run(causal_conv1d_ref, lambda t: t.detach().double())
    assert_close("out", out, ref_out, dtype)
    if width > 1:
        assert_close("final state", final, ref_final, dtype)
    for name, leaf in leaves.items():
        if leaf is not None and leaf.numel():
            assert_close(f"d{name}", leaf.grad, ref_leaves[name].grad, dtype)


def check_decode(batch, channels, d_state, width, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=generator).to(DEVICE, dt)

    state = rand(batch, channels, d_state, dt=torch.float32)
    step = (rand(batch, channels), rand(batch, channels), (-torch.rand(channels, d_state, generator=generator)).to(DEVICE),
            rand(batch, d_state), rand(batch, d_state), rand(channels, dt=torch.float32), rand(batch, channels),
            rand(channels, dt=torch.float32), True)
    ref_state = state.double()
    ref = selective_state_update_ref(ref_state, *(t.double() if isinstance(t, torch.Tensor) else t for t in step))
    out = selective_state_update_triton(state, *step)
    assert_close("ssm step out", out, ref, dtype)
    assert_close("ssm step state", state, ref_state, torch.float32 if dtype == torch.float32 else dtype)

    x, conv_state, weight, bias = rand(batch, channels), rand(batch, channels, width - 1), rand(channels, width), rand(channels)
    ref_conv_state = conv_state.double()
    ref = causal_conv1d_update_ref(x.double(), ref_conv_state, weight.double(), bias.double(), "silu")
    out = causal_conv1d_update_triton(x, conv_state, weight, bias, "silu")
    assert_close("conv step out", out, ref, dtype)
    assert torch.equal(conv_state.double(), ref_conv_state), "the conv state must be shifted exactly"


# ----------------------------------------------------------------------------- tiny shapes (interpreter in CI)


@pytest.mark.parametrize(
    "batch, channels, length, d_state, dtype, options",
    [
        (2, 5, 19, {"N": 4}, torch.float32, {}),
        (2, 20, 40, {"N": 8}, torch.float32, {"z": False, "skip": False, "bias": False}),
        (1, 7, 1, {"N": 4}, torch.float32, {"seq": False}),
        (2, 9, 17, {"N": 6}, torch.bfloat16, {"init": False}),
        (2, 6, 24, {"N": 4}, torch.float16, {"seq": False, "z": False}),
    ],
    ids=["all-options", "bare", "length-1", "bf16-no-init", "fp16-no-resets"],
)
def test_selective_scan_tiny(short_chunks, batch, channels, length, d_state, dtype, options):
    check_scan(batch, channels, length, d_state["N"], dtype, **options, **short_chunks[0])


@pytest.mark.parametrize(
    "batch, channels, length, width, dtype, options",
    [
        (2, 5, 19, 4, torch.float32, {}),
        (2, 6, 2, 4, torch.float32, {"bias": False}),
        (1, 13, 30, 3, torch.bfloat16, {"init": False, "silu": False}),
        (2, 5, 11, 2, torch.float16, {"seq": False}),
        (2, 4, 9, 1, torch.float32, {"seq": False}),
    ],
    ids=["all-options", "shorter-than-kernel", "bf16-no-init", "fp16-width-2", "width-1"],
)
def test_causal_conv1d_tiny(short_chunks, batch, channels, length, width, dtype, options):
    check_conv(batch, channels, length, width, dtype, **options, **short_chunks[1])


@pytest.mark.parametrize("width", [4, 9])
@pytest.mark.parametrize("block_l, backward_tiles", [(16, 1), (16, 4), (32, 1), (32, 2)])
def test_causal_conv1d_tiles_of_several_groups(block_l, backward_tiles, width):
    """The kernels split each tile into components of 8 positions; tiles of several groups shift values between
    groups inside a tile as well as between tiles (every option on, the widest kernel they take included). A
    backward program walks one tile or several (45 positions: 3 tiles of 16, 2 of 32), the last one partial."""
    check_conv(2, 5, 45, width, torch.float32,
               tiles=ConvTiles(block_d=4, block_l=block_l, backward_tiles=backward_tiles))


def test_causal_conv1d_rejects_what_its_kernels_cannot_take():
    x, weight = torch.randn(1, 4, 8, device=DEVICE), torch.randn(4, mamba_conv_triton.MAX_WIDTH + 1, device=DEVICE)
    with pytest.raises(ValueError, match="widths up to"):
        causal_conv1d_triton(x, weight)
    with pytest.raises(ValueError, match="multiple of 8"):
        causal_conv1d_triton(x, weight[:, :4], tiles=ConvTiles(block_l=12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_reads_the_input_projections_layout(short_chunks, dtype, monkeypatch):
    """The mixer hands the conv x as a (B, D, L) view of the (B, L, 2D) input projection (channel stride 1), and
    its gradient may arrive in that layout too: the kernels read both through their strides, without copies."""
    # through the registered ops, as under torch.compile: each counts as one op (in the interpreter, a direct
    # launch would show the interpreter's own copies)
    monkeypatch.setattr(mamba_conv_triton, "_conv_fwd", mamba_conv_triton._causal_conv1d_fwd)
    monkeypatch.setattr(mamba_conv_triton, "_conv_bwd", mamba_conv_triton._causal_conv1d_bwd)
    generator = torch.Generator().manual_seed(0)
    batch, channels, length, width = 2, 6, 21, 4
    projection = torch.randn(batch, length, 2 * channels, generator=generator).to(DEVICE, dtype)
    weight, bias = (torch.randn(*shape, generator=generator).to(DEVICE, dtype) for shape in ((channels, width), (channels,)))
    grad_out = torch.randn(batch, length, channels, generator=generator).to(DEVICE, dtype).transpose(1, 2)
    seq_idx = documents(batch, length, generator)

    recorded = RecordedOps()

    def run(fn, cast):
        leaf = cast(projection).requires_grad_()
        x = leaf[..., :channels].transpose(1, 2)  # (B, D, L), strides (2DL, 1, 2D)
        weight_, bias_ = cast(weight), cast(bias)
        with recorded:
            out = fn(x, weight_, bias_, seq_idx=seq_idx, activation="silu")
        (out.double() * grad_out.double()).sum().backward()
        return out, leaf.grad

    out, grad = run(functools.partial(causal_conv1d_triton, **short_chunks[1]), lambda t: t.detach().clone())
    assert not {"aten.clone.default", "aten.copy_.default"} & recorded.names, recorded.names  # x was not copied
    ref_out, ref_grad = run(causal_conv1d_ref, lambda t: t.detach().double())
    assert out.is_contiguous()
    assert_close("out", out, ref_out, dtype)
    assert_close("dx", grad[..., :channels], ref_grad[..., :channels], dtype)
    assert not grad[..., channels:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_tiny(dtype):
    check_decode(3, 10, 5, 4, dtype)


def test_custom_ops_pass_opcheck():
    """Schemas and fake implementations agree with the real kernels, forward and backward ops alike (autograd is
    the ops' `torch.autograd.Function`s, tested against the reference elsewhere)."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE)

    u, delta, z = rand(1, 3, 9), rand(1, 3, 9) * 0.5, rand(1, 3, 9)
    A, B, C = -torch.rand(3, 2, generator=generator).to(DEVICE), rand(1, 2, 9), rand(1, 2, 9)
    D, bias, seq_idx = rand(3), rand(3), torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]], device=DEVICE)
    tests = ("test_schema", "test_faketensor")
    scan_args = (u, delta, A, B, C, D, z, bias, rand(1, 3, 2), seq_idx, True, 8, 4)  # two chunks
    torch.library.opcheck(mamba_scan_triton._selective_scan_fwd, scan_args, test_utils=tests)
    _, states = mamba_scan_triton._selective_scan_fwd(*scan_args)
    for grad_final_state in (rand(1, 3, 2), None):
        torch.library.opcheck(mamba_scan_triton._selective_scan_bwd, (
            rand(1, 3, 9), grad_final_state, u, delta, A, B, C, D, z, bias, seq_idx, states, True,
            grad_final_state is not None, 8, 4), test_utils=tests)
    conv = (u, rand(3, 4), rand(3), rand(1, 3, 3), seq_idx, True)
    for with_final_state in (True, False):
        torch.library.opcheck(mamba_conv_triton._causal_conv1d_fwd, (*conv, with_final_state, 16, 8, 4),
                              test_utils=tests)
    conv_tiles = (16, 8, 4, 2)  # block_d, block_l, num_warps, backward_tiles: one backward program walks both tiles
    torch.library.opcheck(mamba_conv_triton._causal_conv1d_bwd, (rand(1, 3, 9), rand(1, 3, 3), *conv, *conv_tiles),
                          test_utils=tests)
    step_args = (rand(2, 3, 2), rand(2, 3), rand(2, 3), A, rand(2, 2), rand(2, 2), rand(3), rand(2, 3), rand(3), True)
    torch.library.opcheck(mamba_scan_triton._selective_state_update, step_args, test_utils=tests)
    torch.library.opcheck(mamba_conv_triton._causal_conv1d_update, (rand(2, 3), rand(2, 3, 3), rand(3, 4), rand(3), True),
                          test_utils=tests)


def test_inputs_are_checked():
    u = torch.zeros(1, 3, 4, device=DEVICE)
    A = torch.zeros(3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan_triton(u, u, A, u, u)
    with pytest.raises(TypeError, match="kernel_backend='torch'"):
        selective_scan_triton(u.double(), u, A, torch.zeros(1, 2, 4, device=DEVICE), torch.zeros(1, 2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_triton(u, torch.zeros(3, 4, device=DEVICE), activation="gelu")


# ----------------------------------------------------------------------------- GPU: real sizes


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, channels, length, d_state, dtype, options",
    [
        (2, 300, 1, 16, torch.float32, {}),
        (3, 100, 7, 64, torch.bfloat16, {"init": False}),
        (8, 96, 64, 128, torch.float16, {"seq": False}),
        (4, 130, 1000, 16, torch.bfloat16, {"z": False}),
        (1, 70, 2048, 64, torch.float32, {"skip": False, "seq": False}),
        (2, 40, 4099, 16, torch.float16, {}),
        (1, 33, 16384, 16, torch.bfloat16, {"bias": False}),
        (5, 257, 300, 128, torch.float32, {"init": False, "seq": False, "z": False}),
        (6, 24, 515, 16, torch.bfloat16, {}),
    ],
)
def test_selective_scan_gpu(batch, channels, length, d_state, dtype, options):
    check_scan(batch, channels, length, d_state, dtype, **options)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, channels, length, width, dtype, options",
    [
        (2, 300, 1, 4, torch.float32, {}),
        (3, 100, 7, 4, torch.bfloat16, {"bias": False}),
        (8, 96, 64, 3, torch.float16, {}),
        (4, 130, 1000, 4, torch.bfloat16, {"init": False}),
        (1, 70, 4099, 4, torch.float32, {"seq": False}),
        (1, 33, 16384, 4, torch.bfloat16, {}),
        (5, 257, 2048, 2, torch.float16, {"silu": False}),
    ],
)
def test_causal_conv1d_gpu(batch, channels, length, width, dtype, options):
    check_conv(batch, channels, length, width, dtype, **options)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch, channels, d_state, dtype", [(1, 300, 16, torch.float32), (8, 2050, 64, torch.bfloat16),
                                                              (5, 100, 128, torch.float16)])
def test_decode_steps_gpu(batch, channels, d_state, dtype):
    check_decode(batch, channels, d_state, 4, dtype)
