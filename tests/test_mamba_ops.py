"""Backend selection in mamba_ops, and the whole model on the Triton backend against the torch one."""

import importlib
import os
import sys
import types

import pytest
import torch
from transformers import DynamicCache
from transformers.dynamic_module_utils import get_imports

import hybrid_lm
from hybrid_lm import HybridLMConfig, HybridLMForCausalLM, mamba_ops, triton_conv, triton_ssm  # noqa: F401 (imported under the interpreter setting of conftest)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PACKAGE = os.path.dirname(mamba_ops.__file__)


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


def test_auto_on_cpu_is_torch():
    assert mamba_ops.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.skipif(mamba_ops._load("cuda") is not None, reason="mamba-ssm is installed here")
def test_missing_cuda_backend_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install '(mamba-ssm>=2\.2|causal-conv1d>=1\.4)' \(or pip install -e "
                                          r"'\.\[cuda\]' in a hybrid_lm checkout; hybrid-lm is not on PyPI\)"):
        mamba_ops.resolve_backend("cuda", torch.device("cpu"))


def test_triton_backend_needs_cuda_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(mamba_ops, "_resolved", {})
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        mamba_ops.resolve_backend("triton", torch.device("cpu"))


def test_failing_self_check_falls_back_with_a_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(mamba_ops, "_self_check", broken)
    assert not mamba_ops._passes_self_check("triton", torch.device("cpu"))


def test_triton_self_check_passes():
    mamba_ops._self_check("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_self_check_passes_when_the_first_call_comes_from_generate(context):
    """generate() runs under no_grad: the self-check (which runs backward passes) must still pass there,
    or every generation would silently fall back to the slow tier."""
    with context():
        assert mamba_ops._passes_self_check("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("name", ["mamba_ops.py", "triton_ssm.py", "triton_conv.py", "cuda_ops.py", "custom_ops.py"])
def test_optional_imports_are_invisible_to_remote_code_checks(name):
    """transformers refuses a checkpoint whose code imports an uninstalled package outside try blocks."""
    optional = {"triton", "mamba_ssm", "causal_conv1d", "selective_scan_cuda"}
    assert not optional & set(get_imports(os.path.join(PACKAGE, name)))


def test_model_on_triton_matches_torch(monkeypatch):
    """Packed documents (position_ids restart), forward and backward, then cached greedy decoding."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(triton_ssm, "_MAX_CHUNK", 8)
        monkeypatch.setattr(triton_ssm, "_ELEMENTS_PER_WARP", 32)  # 4 channels a program: several programs
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    reference = HybridLMForCausalLM(tiny_config("torch")).to(device)
    fast = HybridLMForCausalLM(tiny_config("triton")).to(device)
    fast.load_state_dict(reference.state_dict())
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
    model(ids)  # eager first: backend resolution and its self-check stay out of the graph
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


def test_cuda_backend_sends_what_the_extensions_lack_to_triton(monkeypatch):
    """With stand-ins for the compiled packages: calls they cannot compute (here: CPU tensors, an initial
    state, seq_idx) run on the Triton kernels, and the results match the reference."""
    def unreachable(*args, **kwargs):
        raise AssertionError("the extension must not be called for this input")

    conv_package = types.ModuleType("causal_conv1d")
    conv_package.causal_conv1d_fn = conv_package.causal_conv1d_update = unreachable
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    monkeypatch.setitem(sys.modules, "causal_conv1d", conv_package)
    monkeypatch.delitem(sys.modules, "hybrid_lm.cuda_ops", raising=False)
    cuda_ops = importlib.import_module("hybrid_lm.cuda_ops")
    # leave no trace of the stand-ins for later tests
    monkeypatch.setitem(sys.modules, "hybrid_lm.cuda_ops", cuda_ops)
    monkeypatch.setattr(hybrid_lm, "cuda_ops", cuda_ops, raising=False)
    monkeypatch.setattr(mamba_ops, "_modules", {})  # _load imports the stand-in; the originals come back after
    monkeypatch.setattr(mamba_ops, "_import_errors", {})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    u, delta = torch.randn(1, 3, 6, device=device), torch.rand(1, 3, 6, device=device)
    A, B, C = -torch.rand(3, 2, device=device), torch.randn(1, 2, 6, device=device), torch.randn(1, 2, 6, device=device)
    h0, seq_idx = torch.randn(1, 3, 2, device=device), torch.tensor([[0, 0, 0, 1, 1, 1]], device=device)
    expected = mamba_ops.selective_scan_ref(u, delta, A, B, C, initial_state=h0, seq_idx=seq_idx)
    actual = mamba_ops.selective_scan(u, delta, A, B, C, initial_state=h0, seq_idx=seq_idx, backend="cuda")
    assert torch.allclose(actual, expected, atol=1e-5)
    weight, conv_init = torch.randn(3, 4, device=device), torch.randn(1, 3, 3, device=device)
    expected = mamba_ops.causal_conv1d_ref(u, weight, initial_state=conv_init, seq_idx=seq_idx, activation="silu")
    actual = mamba_ops.causal_conv1d(u, weight, initial_state=conv_init, seq_idx=seq_idx, activation="silu",
                                     backend="cuda")
    assert torch.allclose(actual, expected, atol=1e-5)


def test_op_namespace_differs_for_a_remote_code_copy():
    from hybrid_lm.custom_ops import op_namespace

    assert op_namespace("hybrid_lm.triton_ssm") == "hybrid_lm"
    assert op_namespace("transformers_modules.my_model.triton_ssm") == "hybrid_lm_transformers_modules_my_model"
