"""The mixer's channels-first projections (mamba_projections.py) against `F.linear` with transposes."""

import pytest
import torch
import torch.nn.functional as F
from builders import tiny_model

import hybrid_lm.modeling_hybrid_lm as modeling
from hybrid_lm.mamba_projections import linear_from_channels_first, linear_to_channels_first


def leaves(*shapes, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_() if shape
            else None for shape in shapes]


def values_and_grads(outputs, inputs, seed=1):
    """The outputs and the gradients of `inputs` for a random cotangent of every output."""
    outputs = list(outputs)
    generator = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, [t for t in inputs if t is not None], cotangents)
    return outputs + list(grads)


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_to_channels_first_equals_linear_then_transpose(chunks, with_bias):
    x, weight, bias = leaves((3, 7, 5), (6, 5), (6,) if with_bias else ())
    inputs = (x, weight, bias)
    actual = linear_to_channels_first(*inputs, chunks=chunks)
    expected = F.linear(x, weight, bias).transpose(1, 2).chunk(chunks, dim=1)
    assert all(out.is_contiguous() and out.shape == (3, 6 // chunks, 7) for out in actual)
    for a, e in zip(values_and_grads(actual, inputs), values_and_grads(expected, inputs)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # inference skips the autograd.Function
        for a, e in zip(linear_to_channels_first(*inputs, chunks=chunks), expected):
            assert a.is_contiguous()
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_from_channels_first_equals_transpose_then_linear(with_bias):
    x, weight, bias = leaves((3, 5, 7), (6, 5), (6,) if with_bias else ())
    inputs = (x, weight, bias)
    actual = linear_from_channels_first(*inputs)
    expected = F.linear(x.transpose(1, 2), weight, bias)
    assert actual.is_contiguous() and actual.shape == (3, 7, 6)
    for a, e in zip(values_and_grads([actual], inputs), values_and_grads([expected], inputs)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_from_channels_first(*inputs), expected, rtol=1e-12, atol=1e-12)


def test_input_gradients_come_back_in_the_input_layout():
    x, weight = leaves((2, 9, 4), (8, 4))
    (out,) = linear_to_channels_first(x, weight)
    (grad_x,) = torch.autograd.grad(linear_from_channels_first(out, weight.mT.contiguous()).sum(), [x])
    assert grad_x.is_contiguous()
    y = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    (grad_y,) = torch.autograd.grad(linear_from_channels_first(y, weight).square().sum(), [y])
    assert grad_y.is_contiguous() and grad_y.shape == y.shape


def test_an_unused_chunk_and_a_frozen_weight():
    x, weight = leaves((2, 5, 4), (6, 4))
    weight.requires_grad_(False)
    x_part, _ = linear_to_channels_first(x, weight, chunks=2)
    (grad_x,) = torch.autograd.grad(x_part.sum(), [x])
    (expected,) = torch.autograd.grad(F.linear(x, weight[:3]).sum(), [x])
    torch.testing.assert_close(grad_x, expected, rtol=1e-12, atol=1e-12)


def test_bfloat16_within_rounding_of_float64():
    x, weight, bias = leaves((4, 33, 16), (24, 16), (24,), dtype=torch.bfloat16)
    inputs64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    actual = values_and_grads([linear_from_channels_first(x.mT.contiguous(), weight, bias)], (x, weight, bias))
    expected = values_and_grads([F.linear(*inputs64)], inputs64)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - e).norm() / e.norm()).item() < 1e-2


def test_autocast_casts_as_linear_does():
    x, weight, bias = leaves((2, 6, 4), (8, 4), (8,), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (actual,) = linear_to_channels_first(x, weight, bias)
        expected = F.linear(x, weight, bias).transpose(1, 2)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_bad_shapes_are_refused():
    x, weight = leaves((2, 5, 4), (6, 4))
    with pytest.raises(ValueError, match="features in dimension 2"):
        linear_to_channels_first(x.mT, weight)
    with pytest.raises(ValueError, match="do not split into 4 equal chunks"):
        linear_to_channels_first(x, weight, chunks=4)
    with pytest.raises(ValueError, match=r"bias must be \(6,\)"):
        linear_from_channels_first(x.mT, weight, torch.zeros(5, dtype=torch.float64))


def test_mixer_gives_the_module_path_result(monkeypatch):
    """The mixer's fast path (plain Linears) against the module path, forced by a no-op hook on each projection:
    the loss and every gradient of a training step agree."""
    fast_calls = []

    def counted(function):
        def wrapper(*args, **kwargs):
            fast_calls.append(function.__name__)
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(modeling, "linear_to_channels_first", counted(linear_to_channels_first))
    monkeypatch.setattr(modeling, "linear_from_channels_first", counted(linear_from_channels_first))

    def step(force_module_path):
        model = tiny_model(seed=3).double().train()
        if force_module_path:
            for mixer in (m for m in model.modules() if isinstance(m, modeling.HybridLMMambaMixer)):
                for projection in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj):
                    projection.register_forward_pre_hook(lambda module, args: None)
        input_ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(0))
        fast_calls.clear()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, len(fast_calls)

    fast_loss, fast_grads, fast_count = step(False)
    module_loss, module_grads, module_count = step(True)
    assert fast_count > 0 and module_count == 0
    torch.testing.assert_close(fast_loss, module_loss, rtol=1e-12, atol=1e-12)
    assert fast_grads.keys() == module_grads.keys() and any("x_proj" in name for name in fast_grads)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], module_grads[name], rtol=1e-10, atol=1e-12, msg=name)
