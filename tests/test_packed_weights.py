"""Packed inference weights (packed_weights.py): the MLP's gate and up and attention's q, k and v run as one product
over one storage when no gradient is needed; the values stay the unpacked layers', training and moves still work.
The experts' packing has its own tests in test_experts.py; the whole model's save and load in test_modeling.py."""

import copy

import peft
import pytest
import torch

from builders import tiny_config, tiny_model
from oracles import assert_close_to
from hybrid_lm.feed_forward_hybrid_lm import HybridLMMLP
from hybrid_lm.modeling_hybrid_lm import HybridLMAttention, HybridLMRotaryEmbedding

GROUPS = {"mlp": ("gate_proj", "up_proj"), "attention": ("q_proj", "k_proj", "v_proj")}


def make_module(kind: str, dtype=torch.float32, bias=False):
    torch.manual_seed(0)
    config = tiny_config(mlp_bias=bias, attention_bias=bias)
    module = HybridLMMLP(config) if kind == "mlp" else HybridLMAttention(config, layer_idx=1)
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return module.to(dtype)


def run(module, x):
    """The module's output for x (B, L, H); attention with RoPE positions 0..L-1 and causal masking."""
    if isinstance(module, HybridLMMLP):
        return module(x)
    rotary = HybridLMRotaryEmbedding(tiny_config()).to(x.device)
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    cos, sin = rotary(x, positions)
    return module(x, attention_mask=None, position_embeddings=(cos.to(x.dtype), sin.to(x.dtype)))[0]


def unpacked_output(module, x, dtype=torch.float64):
    """The reference: a copy in `dtype` run with gradients enabled, layer by layer."""
    reference = copy.deepcopy(module).to(dtype)
    return run(reference, x.to(dtype)).detach()


def storages(module, kind):
    return {getattr(module, name).weight.untyped_storage().data_ptr() for name in GROUPS[kind]}


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_inference_runs_the_group_as_one_product_with_the_layers_values(kind, dtype, bias):
    module = make_module(kind, dtype, bias)
    params = list(module.parameters())
    x = torch.randn(2, 5, 32, dtype=dtype)
    with torch.no_grad():
        packed = run(module, x)
    assert len(storages(module, kind)) == 1, "the group's weights were not packed into one storage"
    assert [a is b for a, b in zip(module.parameters(), params)] == [True] * len(params)
    baseline = unpacked_output(module, x, dtype)  # the layers themselves in `dtype`
    assert_close_to(packed, unpacked_output(module, x), dtype, "packed", baseline)

    calls = []
    for name in GROUPS[kind]:  # the packed forward does not call the layers
        getattr(module, name).register_forward_hook(lambda *args: calls.append(args))
    with torch.no_grad():
        again = run(module, x)
    assert calls == []
    torch.testing.assert_close(again, packed, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_packing_follows_training_moves_replacement_and_copies(kind):
    module = make_module(kind)
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():  # tensors made here could not be trained: the packing must not make any
        run(module, x)
    loss = run(module, x).square().mean()  # gradients enabled: the layers themselves
    loss.backward()
    assert all(getattr(module, name).weight.grad is not None for name in GROUPS[kind])
    torch.optim.SGD(module.parameters(), lr=0.5).step()
    with torch.no_grad():  # the step wrote through the views
        assert_close_to(run(module, x), unpacked_output(module, x), torch.float32, "after the step")

    module.double()
    x = x.double()
    with torch.no_grad():
        torch.testing.assert_close(run(module, x), unpacked_output(module, x))
    assert len(storages(module, kind)) == 1

    first, second = GROUPS[kind][:2]
    getattr(module, second).weight = torch.nn.Parameter(torch.randn_like(getattr(module, second).weight))
    with torch.no_grad():
        torch.testing.assert_close(run(module, x), unpacked_output(module, x))
    layer = getattr(module, first)
    layer.weight.data = layer.weight.data.clone() * 2  # moved by hand, same parameter
    with torch.no_grad():
        torch.testing.assert_close(run(module, x), unpacked_output(module, x))

    duplicate = copy.deepcopy(module)
    with torch.no_grad():
        getattr(duplicate, first).weight.mul_(3)
        torch.testing.assert_close(run(duplicate, x), unpacked_output(duplicate, x))
        torch.testing.assert_close(run(module, x), unpacked_output(module, x))  # the original is untouched


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_views_into_a_managed_buffer_are_left_alone(kind):
    """Parameters that are views into one larger buffer (as FSDP's flat parameters and DeepSpeed's gathered
    partitions are) are not copied out of it: the group runs unpacked, on the buffer's current values."""
    module = make_module(kind)
    params = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    start = 0
    for param in params:
        param.data = flat[start:start + param.numel()].view(param.shape)
        start += param.numel()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        flat.mul_(0.5)  # whoever manages the buffer updates it
        out = run(module, x)
    assert {p.untyped_storage().data_ptr() for p in module.parameters()} == {flat.untyped_storage().data_ptr()}
    assert_close_to(out, unpacked_output(module, x), torch.float32, "unpacked")


def test_compiled_inference_forgets_the_packing_when_the_weights_move():
    """Compiled code checks the packing by parameter identity only, so a move (`.to()`) must drop it."""
    model = tiny_model()
    input_ids = torch.randint(1, 97, (2, 7))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # the packed path has no graph break
    with torch.no_grad():
        model(input_ids)  # eager: packs
        torch.testing.assert_close(compiled(input_ids).logits, model(input_ids).logits)
        model.double()
        expected = copy.deepcopy(model)(input_ids).logits  # the copy packs its own weights
        torch.testing.assert_close(compiled(input_ids).logits, expected)


def test_lora_adapters_are_not_bypassed():
    """A LoRA layer on one projection of a group (peft wraps it, after the group was packed) keeps the group
    unpacked: the adapters' output counts, as peft's own forward with gradients computes it."""
    model = tiny_model()
    input_ids = torch.randint(1, 97, (2, 7))
    with torch.no_grad():
        base = model(input_ids).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["up_proj", "k_proj"],
                                                      init_lora_weights=False))
    expected = lora(input_ids).logits.detach()  # with gradients: module by module
    with torch.no_grad():
        adapted = lora(input_ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(adapted, expected)
