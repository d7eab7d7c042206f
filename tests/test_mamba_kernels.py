"""Kernel tier selection in mamba_kernels, binding tiers on a model, and the whole model on the Triton tier against
the torch one."""

import importlib
import logging
import os
import sys
import types

import pytest
import torch
from transformers import DynamicCache
from transformers.dynamic_module_utils import get_imports

import hybrid_lm
from hybrid_lm import HybridLMConfig, HybridLMForCausalLM, mamba_kernels
from hybrid_lm.mamba_conv_ref import causal_conv1d_ref
from hybrid_lm.mamba_kernels import CudaKernels, MambaKernels, TritonKernels
from hybrid_lm.mamba_scan_ref import selective_scan_ref
from hybrid_lm.mamba_scan_triton import ScanTiles
from hybrid_lm.modeling_hybrid_lm import HybridLMRMSNorm

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PACKAGE = os.path.dirname(mamba_kernels.__file__)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# In the interpreter, chunks of 8 steps and 4 channels a program, so that tiny models cross several of each
SHORT_CHUNKS = ScanTiles(chunk=8, block_d=4, block_d_backward=4)


def tiny_config(backend, experts=True, **overrides):
    values = dict(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, attn_layer_period=2,
        attn_layer_offset=1, num_attention_heads=2, num_key_value_heads=1, mamba_d_state=4, mamba_expand=2,
        kernel_backend=backend,
    )
    if experts:
        values.update(expert_layer_period=2, expert_layer_offset=1, num_experts=2, num_experts_per_tok=1)
    else:
        values.update(layers_num_experts=[1, 1], num_experts=1, num_experts_per_tok=1)
    values.update(overrides)
    return HybridLMConfig(**values)


INSTALL_COMMAND = (r"pip install '(mamba-ssm>=2\.2|causal-conv1d>=1\.4)' \(or pip install -e '\.\[cuda\]' in a "
                   r"hybrid_lm checkout; hybrid-lm is not on PyPI\)")
cuda_installed = pytest.mark.skipif(CudaKernels.import_error() is None, reason="mamba-ssm is installed here")


def test_auto_on_cpu_is_torch():
    assert type(mamba_kernels.select_kernels("auto", torch.device("cpu"))) is MambaKernels


@cuda_installed
def test_missing_cuda_backend_says_how_to_install():
    with pytest.raises(ImportError, match=INSTALL_COMMAND):
        mamba_kernels.select_kernels("cuda", torch.device("cpu"))


def test_triton_backend_needs_cuda_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        mamba_kernels.select_kernels("triton", torch.device("cpu"))


def test_failing_self_check_falls_back_with_a_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(mamba_kernels, "_self_check", broken)
    monkeypatch.setattr(mamba_kernels, "_SELF_CHECKED", {})  # neither reuse an earlier result nor keep this one
    with caplog.at_level(logging.WARNING, logger="hybrid_lm"):
        assert not mamba_kernels._passes_self_check(TritonKernels(), DEVICE)
    assert "planted failure" in caplog.text


def test_self_check_result_is_kept_per_tier_and_device(monkeypatch):
    calls = []
    monkeypatch.setattr(mamba_kernels, "_self_check", lambda kernels, device: calls.append((kernels.name, device)))
    monkeypatch.setattr(mamba_kernels, "_SELF_CHECKED", {})
    for _ in range(3):
        assert mamba_kernels._passes_self_check(TritonKernels(), DEVICE)
    assert calls == [("triton", DEVICE)]


def test_triton_self_check_passes():
    mamba_kernels._self_check(TritonKernels(), DEVICE)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_self_check_passes_when_the_first_call_comes_from_generate(context, monkeypatch):
    """generate() runs under no_grad: the self-check (which runs backward passes) must still pass there,
    or every generation would silently fall back to the slow tier."""
    monkeypatch.setattr(mamba_kernels, "_SELF_CHECKED", {})  # run the check here, not an earlier test's
    with context():
        assert mamba_kernels._passes_self_check(TritonKernels(), DEVICE)


@pytest.mark.parametrize("name", ["mamba_kernels.py", "mamba_scan_triton.py", "mamba_conv_triton.py", "mamba_cuda.py",
                                  "custom_ops.py"])
def test_optional_imports_are_invisible_to_remote_code_checks(name):
    """transformers refuses a checkpoint whose code imports an uninstalled package outside try blocks."""
    optional = {"triton", "mamba_ssm", "causal_conv1d", "selective_scan_cuda"}
    assert not optional & set(get_imports(os.path.join(PACKAGE, name)))


def test_model_on_triton_matches_torch():
    """Packed documents (position_ids restart), forward and backward, then cached greedy decoding."""
    device = DEVICE
    torch.manual_seed(0)
    reference = HybridLMForCausalLM(tiny_config("torch")).to(device)
    fast = HybridLMForCausalLM(tiny_config("triton")).to(device)
    fast.load_state_dict(reference.state_dict())
    if device.type == "cpu":
        fast.set_kernel_backend(TritonKernels(scan_tiles=SHORT_CHUNKS))
    ids = torch.randint(0, 64, (2, 13), device=device)
    position_ids = torch.tensor([list(range(6)) + list(range(7)), list(range(13))], device=device)
    for model in (reference, fast):
        model(ids, labels=ids, position_ids=position_ids).loss.backward()
    logits = [m(ids, position_ids=position_ids).logits for m in (reference, fast)]
    assert (logits[0] - logits[1]).norm() / logits[0].norm() < 1e-5
    for (name, expected), actual in zip(reference.named_parameters(), fast.parameters()):
        if expected.grad is not None:
            assert (actual.grad - expected.grad).norm() <= 1e-4 * expected.grad.norm() + 1e-12, name
    generated = [m.generate(ids[:, :5], max_new_tokens=4, do_sample=False) for m in (reference, fast)]
    assert torch.equal(*generated)


@gpu
@pytest.mark.gpu
def test_model_on_triton_matches_torch_at_real_size():
    torch.manual_seed(0)
    config = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, mamba_d_state=16, num_hidden_layers=4,
                  attn_layer_period=4, attn_layer_offset=2)
    reference = HybridLMForCausalLM(tiny_config("torch", **config)).cuda()
    fast = HybridLMForCausalLM(tiny_config("triton", **config)).cuda()
    fast.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 64, (4, 1000), device="cuda")
    for model in (reference, fast):
        model(ids, labels=ids).loss.backward()
    logits = [m(ids).logits for m in (reference, fast)]
    assert (logits[0] - logits[1]).norm() / logits[0].norm() < 1e-4
    for (name, expected), actual in zip(reference.named_parameters(), fast.parameters()):
        if expected.grad is not None:
            assert (actual.grad - expected.grad).norm() <= 1e-3 * expected.grad.norm() + 1e-12, name


@gpu
@pytest.mark.gpu
def test_compiled_train_and_decode_steps_have_no_graph_break():
    """fullgraph=True fails on any graph break; experts and packed position_ids included."""
    torch.manual_seed(0)
    model = HybridLMForCausalLM(tiny_config("triton")).cuda()
    ids = torch.randint(0, 64, (2, 40), device="cuda")
    positions = torch.arange(40, device="cuda").remainder(17)[None].expand(2, -1)  # three packed documents
    model(ids)  # eager first: binding the kernel tier and its self-check stay out of the graph
    expected = model(ids, labels=ids, position_ids=positions).loss
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(ids, labels=ids, position_ids=positions).loss
    loss.backward()
    assert torch.allclose(loss, expected, rtol=1e-4)
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache, use_cache=True)
    step = torch.compile(lambda tok, cache: model(tok, cache=cache, use_cache=True).logits, fullgraph=True)
    with torch.no_grad():
        assert torch.isfinite(step(ids[:, :1], cache)).all()


def test_triton_tier_traces_as_one_graph():
    """The Triton ops are custom ops on every call: torch.compile(fullgraph=True) takes a training step (autograd
    through the ops) and a decoding step (the ops that update the cache in place). On CPU with the aot_eager backend,
    which runs the interpreted kernels; the GPU test below compiles them with inductor."""
    torch.manual_seed(0)
    model = HybridLMForCausalLM(tiny_config("triton", experts=False)).to(DEVICE).train()
    ids = torch.randint(0, 64, (2, 12), device=DEVICE)
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    expected = model(ids, labels=ids).loss  # eager first: binding the kernel tier stays out of the graph
    loss = torch.compile(lambda ids: model(ids, labels=ids).loss, backend=backend, fullgraph=True)(ids)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    model.eval()
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache, use_cache=True)
    step = torch.compile(lambda token: model(token, cache=cache, use_cache=True).logits, backend=backend,
                         fullgraph=True)
    with torch.no_grad():
        assert torch.isfinite(step(ids[:, :1])).all()


def unreachable(*args, **kwargs):
    raise AssertionError("the extension must not be called for this input")


def cuda_tier_with_stand_ins(monkeypatch, causal_conv1d_fn=unreachable):
    """hybrid_lm.mamba_cuda imported over stand-ins for mamba-ssm and causal-conv1d (`causal_conv1d_fn` the
    conv's), and wired into mamba_kernels for this test only. Returns the module."""
    conv_package = types.ModuleType("causal_conv1d")
    conv_package.causal_conv1d_fn, conv_package.causal_conv1d_update = causal_conv1d_fn, unreachable
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    monkeypatch.setitem(sys.modules, "causal_conv1d", conv_package)
    monkeypatch.delitem(sys.modules, "hybrid_lm.mamba_cuda", raising=False)
    mamba_cuda = importlib.import_module("hybrid_lm.mamba_cuda")
    # leave no trace of the stand-ins for later tests: the originals (or their absence) come back after
    monkeypatch.setitem(sys.modules, "hybrid_lm.mamba_cuda", mamba_cuda)
    monkeypatch.setattr(hybrid_lm, "mamba_cuda", mamba_cuda, raising=False)
    for name in ("scan_supports", "conv_supports", "selective_scan_cuda_ext", "causal_conv1d_cuda_ext",
                 "causal_conv1d_update_cuda_ext"):  # what mamba_kernels imports from mamba_cuda
        monkeypatch.setattr(mamba_kernels, name, getattr(mamba_cuda, name), raising=False)
    monkeypatch.setattr(mamba_kernels, "_CUDA_ERROR", None)
    return mamba_cuda


def test_cuda_backend_sends_what_the_extensions_lack_to_triton(monkeypatch):
    """With stand-ins for the compiled packages: calls they cannot compute (here: CPU tensors, an initial
    state, seq_idx) run on the Triton kernels, and the results match the reference."""
    cuda_tier_with_stand_ins(monkeypatch)
    cuda = CudaKernels()
    device = DEVICE
    u, delta = torch.randn(1, 3, 6, device=device), torch.rand(1, 3, 6, device=device)
    A, B, C = -torch.rand(3, 2, device=device), torch.randn(1, 2, 6, device=device), torch.randn(1, 2, 6, device=device)
    h0, seq_idx = torch.randn(1, 3, 2, device=device), torch.tensor([[0, 0, 0, 1, 1, 1]], device=device)
    expected = selective_scan_ref(u, delta, A, B, C, initial_state=h0, seq_idx=seq_idx)
    actual = cuda.selective_scan(u, delta, A, B, C, initial_state=h0, seq_idx=seq_idx)
    assert torch.allclose(actual, expected, atol=1e-5)
    weight, conv_init = torch.randn(3, 4, device=device), torch.randn(1, 3, 3, device=device)
    expected = causal_conv1d_ref(u, weight, initial_state=conv_init, seq_idx=seq_idx, activation="silu")
    actual = cuda.causal_conv1d(u, weight, initial_state=conv_init, seq_idx=seq_idx, activation="silu")
    assert torch.allclose(actual, expected, atol=1e-5)


def test_triton_tier_sends_wider_convs_than_its_kernels_take_to_the_reference():
    """The Triton conv takes widths up to MAX_WIDTH; a model with a wider `mamba_d_conv` still runs on the tier."""
    from hybrid_lm.mamba_conv_triton import MAX_WIDTH

    x, weight = torch.randn(1, 3, 12, device=DEVICE), torch.randn(3, MAX_WIDTH + 2, device=DEVICE)
    expected = causal_conv1d_ref(x, weight, activation="silu")
    assert torch.allclose(TritonKernels().causal_conv1d(x, weight, activation="silu"), expected, atol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 3, 9], ids=lambda n: f"L{n}")
def test_cuda_conv_takes_the_final_state_from_its_input(monkeypatch, length):
    """causal-conv1d returns no final state: from no initial state and one document it is the last K - 1
    inputs (zeros before the first), as the reference computes it; gradients through it reach x. causal-conv1d
    is the reference here (a stand-in), so what is tested is the final state around it."""
    mamba_cuda = cuda_tier_with_stand_ins(
        monkeypatch, lambda x, weight, bias, activation: causal_conv1d_ref(x, weight, bias, activation=activation))
    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, 3, length, generator=g, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    out, final_state = mamba_cuda.causal_conv1d_cuda_ext(x, weight, bias, "silu", return_final_state=True)
    expected_out, expected_state = causal_conv1d_ref(x, weight, bias, activation="silu", return_final_state=True)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(final_state, expected_state, rtol=0, atol=0)
    grad_state = torch.randn(final_state.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out.sum(), final_state), x, (None, grad_state))
    expected = torch.autograd.grad((expected_out.sum(), expected_state), x, (None, grad_state))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(CudaKernels.import_error() is not None, reason="needs mamba-ssm and causal-conv1d")
def test_cuda_tier_matches_the_reference_on_the_gpu():
    """The real extensions: scan and conv with their gradients, and the conv's final state (a prefill into a
    cache), against the references in float32."""
    cuda = CudaKernels()
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).cuda().requires_grad_()

    u, delta, z = rand(2, 64, 300), rand(2, 64, 300, scale=0.5), rand(2, 64, 300)
    A = (-torch.rand(64, 16, generator=g) - 0.5).cuda().requires_grad_()
    B, C, D, bias = rand(2, 16, 300), rand(2, 16, 300), rand(64), rand(64, scale=0.3)
    leaves = (u, delta, A, B, C, D, z, bias)

    def out_and_grads(scan):
        out = scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
        return (out, *torch.autograd.grad(out.square().sum(), leaves))

    for actual, expected in zip(out_and_grads(cuda.selective_scan), out_and_grads(selective_scan_ref)):
        assert ((actual - expected).norm() / expected.norm()).item() < 1e-4
    weight, conv_bias = rand(64, 4), rand(64)
    for length in (2, 300):
        x = u[..., :length]
        out, state = cuda.causal_conv1d(x, weight, conv_bias, activation="silu", return_final_state=True)
        expected_out, expected_state = causal_conv1d_ref(x, weight, conv_bias, activation="silu",
                                                         return_final_state=True)
        torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state, expected_state, rtol=0, atol=0)


def test_op_namespace_differs_for_a_remote_code_copy():
    from hybrid_lm.custom_ops import op_namespace

    assert op_namespace("hybrid_lm.mamba_scan_triton") == "hybrid_lm"
    assert op_namespace("transformers_modules.my_model.mamba_scan_triton") == "hybrid_lm_transformers_modules_my_model"


# ----------------------------------------------------------------------------- set_kernel_backend


def mixers(model):
    return [layer.mamba for layer in model.model.layers if hasattr(layer, "mamba")]


def norm_backends(model):
    return {module.kernel_backend for module in model.modules() if isinstance(module, HybridLMRMSNorm)}


def test_set_kernel_backend_switches_torch_and_triton():
    """Each switch rebinds every mixer, every norm and the config; the logits agree across the switches."""
    torch.manual_seed(0)
    model = HybridLMForCausalLM(tiny_config("torch")).to(DEVICE).eval()
    ids = torch.randint(0, 64, (2, 13), device=DEVICE)
    expected = model(ids).logits
    assert all(type(mixer.kernels) is MambaKernels for mixer in mixers(model))
    model.set_kernel_backend("triton")
    assert model.config.kernel_backend == "triton"
    assert all(type(mixer.kernels) is TritonKernels for mixer in mixers(model))
    assert norm_backends(model) == {"triton"}
    triton_logits = model(ids).logits
    assert (triton_logits - expected).norm() / expected.norm() < 1e-5
    model.set_kernel_backend("torch")
    assert model.config.kernel_backend == "torch"
    assert all(type(mixer.kernels) is MambaKernels for mixer in mixers(model))
    assert norm_backends(model) == {"torch"}
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_set_kernel_backend_rejects_a_bad_name_and_changes_nothing():
    model = HybridLMForCausalLM(tiny_config("torch")).eval()
    model(torch.randint(0, 64, (1, 5)))
    bound = [mixer.kernels for mixer in mixers(model)]
    with pytest.raises(ValueError, match=r"kernel_backend \('fast'\) must be one of \['auto', 'torch', 'triton', 'cuda'\]"):
        model.set_kernel_backend("fast")
    assert model.config.kernel_backend == "torch"
    assert [mixer.kernels for mixer in mixers(model)] == bound


@cuda_installed
def test_set_kernel_backend_cuda_without_mamba_ssm_says_how_to_install():
    model = HybridLMForCausalLM(tiny_config("auto"))
    with pytest.raises(ImportError, match=INSTALL_COMMAND):
        model.set_kernel_backend("cuda")
    assert model.config.kernel_backend == "auto"


def test_mixers_choose_their_tier_once_per_device(monkeypatch):
    """The tier is chosen at the first forward on a device and kept on the mixer; another device chooses again."""
    model = HybridLMForCausalLM(tiny_config("auto")).eval()
    chosen = []
    select = mamba_kernels.select_kernels
    monkeypatch.setattr(hybrid_lm.modeling_hybrid_lm, "select_kernels",
                        lambda backend, device: chosen.append(device) or select(backend, device))
    ids = torch.randint(0, 64, (1, 5))
    model(ids)
    model(ids)
    assert chosen == [torch.device("cpu")] * len(mixers(model))
    meta = torch.device("meta")  # another device (a real one needs a GPU)
    for mixer in mixers(model):
        mixer.kernels_for(meta)
        assert mixer.kernels_device == meta
    assert chosen[len(mixers(model)):] == [meta] * len(mixers(model))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bound_tier_survives_save_and_load(tmp_path, backend):
    torch.manual_seed(0)
    model = HybridLMForCausalLM(tiny_config("auto", experts=False)).to(DEVICE).eval()
    model.set_kernel_backend(backend)
    model.save_pretrained(tmp_path)
    loaded = HybridLMForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    assert loaded.config.kernel_backend == backend
    ids = torch.randint(0, 64, (1, 6), device=DEVICE)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert all(mixer.kernels.name == backend for mixer in mixers(loaded))
