"""The fused RMSNorm (+ residual add) kernels against the reference: outputs, the residual sum and every gradient.

Without CUDA the kernels run in Triton's interpreter on tiny shapes, with tiles lowered so that several programs
(and the backward's per-program loop over row blocks) are crossed. Gradients are checked against the reference run
on float64 copies; outputs and the sum against the reference in the same dtype, whose rounding the kernels keep.
"""

import pytest
import torch
from builders import tiny_config

from hybrid_lm import HybridLMForCausalLM, rms_norm_ops, triton_rms_norm
from hybrid_lm.modeling_hybrid_lm import HybridLMRMSNorm
from hybrid_lm.rms_norm_ops import rms_norm, rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
# relative error (norm) of gradients against float64; outputs: one rounding step of the dtype
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
OUT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture
def small_tiles(monkeypatch):
    """In the interpreter, tiles of 64 elements: several programs for H = 16 too, and the backward's G programs
    each walk several row blocks."""
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_rms_norm, "_TILE_ELEMENTS", 64)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def make_input(shape, dtype, strided, generator, scale=1.0):
    """(..., H) random values; `strided`: leading dims transposed and every other column (no unit stride)."""
    if not strided:
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)
    *lead, hidden = shape
    base = torch.randn(*reversed(lead), 2 * hidden, generator=generator) * scale
    t = base.to(DEVICE, dtype)[..., ::2].permute(*reversed(range(len(lead))), len(lead))
    assert t.shape == tuple(shape) and not t.is_contiguous()
    return t


def check_against_reference(shape, dtype, residual, strided, weight_dtype=None, residual_dtype=None, seed=0,
                            norm=triton_rms_norm.rms_norm_triton):
    """`norm` (rms_norm_ref's signature) against the reference: outputs in the same dtype, gradients in float64."""
    generator = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    x = make_input(shape, dtype, strided, generator)
    weight = (1 + 0.5 * torch.randn(hidden, generator=generator)).to(DEVICE, weight_dtype or dtype)
    res = make_input(shape, residual_dtype or dtype, strided, generator, scale=2.0) if residual else None
    inputs = {"x": x, "weight": weight, "residual": res}

    def run(fn, cast):
        leaves = {k: cast(v).requires_grad_() if v is not None else None for k, v in inputs.items()}
        result = fn(leaves["x"], leaves["weight"], EPS, leaves["residual"])
        return (result if residual else (result,)), leaves

    outs, leaves = run(norm, lambda t: t.detach().clone())
    ref_outs, _ = run(rms_norm_ref, lambda t: t.detach().clone())
    # 1. outputs: the reference's dtypes, its value up to the last rounding step, the sum exactly
    for name, out, ref in zip(("out", "sum"), outs, ref_outs):
        assert out.dtype == ref.dtype and out.shape == ref.shape, name
    torch.testing.assert_close(outs[0], ref_outs[0], rtol=OUT_RTOL[outs[0].dtype], atol=1e-6)
    if residual:
        assert torch.equal(outs[1], ref_outs[1]), "the residual sum is one rounding, as in PyTorch"

    # 2. gradients against float64, with an upstream gradient into the sum as well (the residual stream)
    grads = [torch.randn(o.shape, generator=generator).to(DEVICE, o.dtype) for o in outs]
    sum(((o.double() * g.double()).sum() for o, g in zip(outs, grads))).backward()
    exact_outs, exact_leaves = run(rms_norm_ref, lambda t: t.detach().double())
    sum(((o * g.double()).sum() for o, g in zip(exact_outs, grads))).backward()
    tolerance = max(GRAD_TOLERANCE[t.dtype] for t in inputs.values() if t is not None)  # the coarsest input's
    for name, leaf in leaves.items():
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype, name
            error = relative_error(leaf.grad, exact_leaves[name].grad)
            assert error < tolerance, f"d{name}: {error:.2e}"


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "residual+norm"])
@pytest.mark.parametrize("hidden", [16, 100, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_equals_reference(small_tiles, dtype, hidden, residual, strided):
    check_against_reference((3, 5, hidden), dtype, residual, strided)


@pytest.mark.parametrize("x_dtype,weight_dtype,residual_dtype", [
    pytest.param(torch.bfloat16, torch.float32, None, id="fp32-weight"),
    pytest.param(torch.float32, torch.bfloat16, None, id="bf16-weight-fp32-input"),
    pytest.param(torch.bfloat16, torch.float32, torch.float32, id="fp32-residual-stream"),  # as under autocast
    pytest.param(torch.float16, torch.float16, torch.bfloat16, id="fp16+bf16"),
])
def test_mixed_dtypes_follow_type_promotion(small_tiles, x_dtype, weight_dtype, residual_dtype):
    check_against_reference((2, 7, 48), x_dtype, residual_dtype is not None, False, weight_dtype, residual_dtype)


def eager_norm(x, weight, eps, residual):
    """The path `rms_norm` takes in eager mode for tensors of one dtype: torch's fused norm after the residual add."""
    return rms_norm(x, weight, eps, residual, backend="triton")


def spy_on(monkeypatch, module, name):
    """Replaces `module.name` with a wrapper that records each call; returns the list of calls."""
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(args) or original(*args))
    return calls


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "residual+norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_eager_path_equals_reference(monkeypatch, dtype, residual, strided):
    """Eager, the fused tier runs torch's `F.rms_norm` (one rounding step from the reference), and its gradients are
    those of the float64 reference."""
    calls = spy_on(monkeypatch, torch.nn.functional, "rms_norm")
    monkeypatch.setattr(rms_norm_ops, "rms_norm_triton", None)  # would it run, the call would fail
    check_against_reference((3, 5, 100), dtype, residual, strided, norm=eager_norm)
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_path_keeps_the_dtype_under_autocast():
    """CUDA autocast runs torch's rms_norm in float32; the norm still returns the reference's dtype and values."""
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, total = rms_norm(x, weight, EPS, x, backend="auto")
        expected, expected_total = rms_norm_ref(x, weight, EPS, x)
    assert out.dtype == expected.dtype == torch.bfloat16 and torch.equal(total, expected_total)
    torch.testing.assert_close(out, expected, rtol=OUT_RTOL[torch.bfloat16], atol=1e-6)


def test_training_keeps_the_reference_elsewhere(monkeypatch):
    """Recording a gradient, mixed dtypes (the reference's type promotion), backend="torch" and torch.compile's
    tracing keep the reference formula."""
    monkeypatch.setattr(torch.nn.functional, "rms_norm", None)  # would it run, the call would fail
    x = torch.randn(3, 8, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(8, device=DEVICE, requires_grad=True)
    out = rms_norm(x, weight, EPS, backend="triton")
    assert out.dtype == torch.float32 and torch.equal(out, rms_norm_ref(x, weight, EPS))
    same = weight.to(torch.bfloat16)
    assert torch.equal(rms_norm(x, same, EPS, backend="torch"), rms_norm_ref(x, same, EPS))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(rms_norm(x, same, EPS, backend="triton"), rms_norm_ref(x, same, EPS))


def test_one_row_and_leading_shapes(small_tiles):
    check_against_reference((1, 24), torch.float32, True, False)
    check_against_reference((2, 1, 3, 8), torch.bfloat16, True, False)


def test_frozen_weight_gets_no_gradient():
    """With the weight frozen (adapters fine-tuning) the backward skips dweight."""
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    weight = torch.rand(32, device=DEVICE) + 0.5
    triton_rms_norm.rms_norm_triton(x, weight, EPS).sum().backward()
    assert weight.grad is None
    expected = torch.autograd.grad(rms_norm_ref(x, weight, EPS).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_dispatch(monkeypatch):
    """For float CUDA tensors unless backend="torch" (CPU ones in the interpreter for backend="triton" only, as for
    the Mamba ops): torch's fused norm in eager calls, the Triton kernel in inference inside a CUDA graph capture and
    for mixed dtypes; the reference for anything else, with the reference's results."""
    kernel_calls = spy_on(monkeypatch, rms_norm_ops, "rms_norm_triton")
    torch_calls = spy_on(monkeypatch, torch.nn.functional, "rms_norm")
    x, weight = torch.randn(3, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    rms_norm(x, weight, EPS, backend="triton")
    assert (len(torch_calls), len(kernel_calls)) == (1, 0)
    rms_norm(x.bfloat16(), weight, EPS, backend="triton")  # bf16 input, float32 weight
    assert (len(torch_calls), len(kernel_calls)) == (1, 1)
    monkeypatch.setattr(rms_norm_ops, "_in_graph_capture", lambda x: True)
    rms_norm(x, weight, EPS, backend="triton")
    assert (len(torch_calls), len(kernel_calls)) == (1, 2)
    assert torch.equal(rms_norm(x, weight, EPS, backend="torch"), rms_norm_ref(x, weight, EPS))
    rms_norm(x, weight, EPS, backend="auto")
    on_gpu = 1 if DEVICE == "cuda" else 0  # on CPU, 'auto' means the reference (the interpreter is slow)
    assert (len(torch_calls), len(kernel_calls)) == (1, 2 + on_gpu)
    kernel_calls.clear()
    torch_calls.clear()
    for args in [
        (x.double(), weight.double()),  # float64
        (x.to("meta"), weight.to("meta")),  # meta device (accelerate's offload, init_empty_weights)
        (x, weight, x[:1]),  # a broadcast residual
        (torch.randn(2, 3, device=DEVICE), torch.ones(1, 3, device=DEVICE)),  # a weight that is not (H,)
    ]:
        result = rms_norm(x=args[0], weight=args[1], eps=EPS, residual=args[2] if len(args) > 2 else None,
                          backend="triton")
        expected = rms_norm_ref(args[0], args[1], EPS, args[2] if len(args) > 2 else None)
        for out, ref in zip(*[(r,) if isinstance(r, torch.Tensor) else r for r in (result, expected)]):
            assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    assert kernel_calls == [] and torch_calls == []
    with pytest.raises(ValueError, match="residual has shape"):
        triton_rms_norm.rms_norm_triton(x, weight, EPS, x[:1])
    with pytest.raises(TypeError, match="kernel_backend='torch'"):
        triton_rms_norm.rms_norm_triton(x.double(), weight)


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "residual+norm"])
def test_custom_op_passes_opcheck(small_tiles, residual):
    """Schema, fake (meta) implementation and autograd registration agree with the real kernels."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=generator).to(DEVICE).requires_grad_()
    weight = torch.randn(24, generator=generator).to(DEVICE).requires_grad_()
    res = torch.randn(2, 5, 24, generator=generator).to(DEVICE).requires_grad_() if residual else None
    torch.library.opcheck(triton_rms_norm._rms_norm_fwd_op, (x, weight, res, EPS),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    grad_sum = torch.randn(2, 5, 24).to(DEVICE) if residual else None
    rstd = torch.rand(2, 5).to(DEVICE) + 0.5
    torch.library.opcheck(triton_rms_norm._rms_norm_bwd_op, (torch.randn(2, 5, 24).to(DEVICE), grad_sum, x.detach(),
                                                              weight.detach(), rstd, True),
                          test_utils=("test_schema", "test_faketensor"))


class _NormBlock(torch.nn.Module):
    """A residual add and a norm, as in the decoder layer."""

    def __init__(self, kernel_backend):
        super().__init__()
        self.norm = HybridLMRMSNorm(16, eps=EPS, kernel_backend=kernel_backend)
        self.norm.weight.data.uniform_(0.5, 1.5)

    def forward(self, x, residual):
        normed, total = self.norm(x, residual)
        return normed * 2 + total


def graph_recorder(graphs: list):
    """A torch.compile backend that keeps each graph's text and runs it with aot_eager."""

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    return backend


@pytest.mark.parametrize("kernel_backend", ["triton", "torch"])
def test_compiles_with_fullgraph(kernel_backend):
    """torch.compile traces through the norm without a graph break and takes the reference's ops, which Inductor
    fuses with the ops around them, in training and inference alike; forward and backward give the eager values."""
    torch.manual_seed(0)
    block = _NormBlock(kernel_backend).to(DEVICE)
    graphs = []
    x = torch.randn(2, 6, 16, device=DEVICE, requires_grad=True)
    residual = torch.randn(2, 6, 16, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True, backend=graph_recorder(graphs))
    out = compiled(x, residual)
    out.square().sum().backward()
    grads = (x.grad.clone(), block.norm.weight.grad.clone())
    x.grad, block.norm.weight.grad = None, None
    expected = block(x, residual)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, (x.grad, block.norm.weight.grad))
    with torch.no_grad():
        out = compiled(x.detach(), residual)
        torch.testing.assert_close(out, block(x.detach(), residual))
    assert len(graphs) == 2 and not any("rms_norm_fwd" in graph for graph in graphs)


def test_kernel_compiles_with_fullgraph():
    """`rms_norm_triton` called in compiled code is one custom-op node (no graph break), with the eager values."""
    x, residual = torch.randn(2, 6, 16, device=DEVICE), torch.randn(2, 6, 16, device=DEVICE)
    weight = torch.rand(16, device=DEVICE) + 0.5
    graphs = []
    compiled = torch.compile(triton_rms_norm.rms_norm_triton, fullgraph=True, backend=graph_recorder(graphs))
    torch.testing.assert_close(compiled(x, weight, EPS, residual),
                               triton_rms_norm.rms_norm_triton(x, weight, EPS, residual))
    assert len(graphs) == 1 and "rms_norm_fwd" in graphs[0]


# ----------------------------------------------------------------------------- in the model


def model_pair(dtype, **overrides):
    """The same random tiny model with fused norms (kernel_backend="triton") and with kernel_backend="torch"."""
    torch.manual_seed(0)
    fused = HybridLMForCausalLM(tiny_config(kernel_backend="triton", **overrides)).to(DEVICE, dtype)
    plain = HybridLMForCausalLM(tiny_config(kernel_backend="torch", **overrides)).to(DEVICE, dtype)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def loss_and_grads(model, input_ids):
    model.zero_grad()
    model(input_ids, labels=input_ids).loss.backward()  # the fused loss returns no logits
    with torch.no_grad():
        logits = model(input_ids).logits
    return logits, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_with_fused_norms_equals_torch_tier(monkeypatch, dtype):
    """Training eager (torch's fused norm) and inference as in a captured decode step (the kernel), against the
    torch tier, which runs neither."""
    monkeypatch.setattr(rms_norm_ops, "_in_graph_capture", lambda x: True)
    kernel_calls = spy_on(monkeypatch, rms_norm_ops, "rms_norm_triton")
    torch_calls = spy_on(monkeypatch, torch.nn.functional, "rms_norm")
    fused, plain = model_pair(dtype)
    input_ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits, grads = loss_and_grads(fused, input_ids)
    counts = (len(torch_calls), len(kernel_calls))
    expected_logits, expected_grads = loss_and_grads(plain, input_ids)
    assert min(counts) > 0 and (len(torch_calls), len(kernel_calls)) == counts, "fused norms in the fused model only"
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(logits, expected_logits) < tolerance
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) < 10 * tolerance, name


def test_decoder_layer_computes_what_the_unfused_sequence_computes():
    """The fused residual add + norm gives the layer today's values: x + mixer(norm(x)) = h, then h + ff(norm(h))."""
    model = HybridLMForCausalLM(tiny_config(kernel_backend="torch")).to(DEVICE)
    layer = model.model.layers[0]  # a Mamba layer with a dense MLP
    x = torch.randn(2, 5, 32, device=DEVICE)
    with torch.no_grad():
        h = x + layer.mix(layer.input_layernorm(x), None, None, None, None)
        expected = h + layer.feed_forward(rms_norm_ref(h, layer.pre_ff_layernorm.weight, layer.pre_ff_layernorm.variance_epsilon))
        assert torch.equal(layer(x), expected)
