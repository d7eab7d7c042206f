"""The pure-PyTorch Mamba ops (mamba_scan_ref.py, mamba_conv_ref.py) against naive sequential float64 oracles: values
and every gradient."""

import pytest
import torch

from hybrid_lm.mamba_conv_ref import causal_conv1d_ref, causal_conv1d_update_ref
from hybrid_lm.mamba_scan_ref import selective_scan_ref, selective_state_update_ref
from oracles import causal_conv1d_sequential, selective_scan_sequential


def scan_inputs(batch=2, channels=6, length=37, d_state=4, dtype=torch.float32, seed=0, with_docs=False):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    inputs = dict(
        u=rand(batch, channels, length), delta=rand(batch, channels, length) * 0.5,
        A=-(torch.rand(channels, d_state, generator=g, dtype=dtype) * 3 + 0.2), B=rand(batch, d_state, length),
        C=rand(batch, d_state, length), D=rand(channels), z=rand(batch, channels, length),
        delta_bias=rand(channels) * 0.2, initial_state=rand(batch, channels, d_state),
    )
    seq_idx = None
    if with_docs:  # row 0: three documents, row 1: one boundary late in the sequence
        seq_idx = torch.zeros(batch, length, dtype=torch.long)
        seq_idx[0, 5:] = 1
        seq_idx[0, 12:] = 2
        seq_idx[-1, length - 3:] = 1
    return inputs, seq_idx


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-12)).item()


OPTIONS = {
    "plain": dict(D=False, z=False, delta_bias=False, softplus=False, initial_state=False, docs=False),
    "mixer": dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=False, docs=False),
    "initial-state": dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True, docs=False),
    "packed": dict(D=True, z=False, delta_bias=True, softplus=True, initial_state=True, docs=True),
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("length, chunk_size", [(1, 64), (7, 4), (37, 8), (67, 64)])
def test_selective_scan_matches_sequential_oracle(option, length, chunk_size):
    opts = OPTIONS[option]
    inputs, seq_idx = scan_inputs(length=length, with_docs=opts["docs"] and length > 12)
    kwargs = {name: inputs[name] if opts.get(name, True) else None
              for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")}
    differentiable = {k: v.requires_grad_() for k, v in kwargs.items() if v is not None}

    out, final = selective_scan_ref(**kwargs, delta_softplus=opts["softplus"], seq_idx=seq_idx,
                                    return_final_state=True, chunk_size=chunk_size)
    ref_out, ref_final = selective_scan_sequential(**kwargs, delta_softplus=opts["softplus"], seq_idx=seq_idx)
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(final, ref_final) < 1e-5

    g = torch.Generator().manual_seed(1)
    grad_out, grad_final = torch.randn(out.shape, generator=g), torch.randn(final.shape, generator=g)
    grads = torch.autograd.grad((out * grad_out).sum() + (final * grad_final).sum(), list(differentiable.values()))
    ref_grads = torch.autograd.grad((ref_out * grad_out.double()).sum() + (ref_final * grad_final.double()).sum(),
                                    list(differentiable.values()))
    for name, grad, ref_grad in zip(differentiable, grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-5, name


def test_selective_scan_gradcheck_float64():
    inputs, seq_idx = scan_inputs(batch=1, channels=2, length=9, d_state=3, dtype=torch.float64, with_docs=False)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2]])
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    tensors = [inputs[n].requires_grad_() for n in names]

    def fn(*args):
        out, final = selective_scan_ref(*args[:8], delta_softplus=True, initial_state=args[8], seq_idx=seq_idx,
                                        return_final_state=True, chunk_size=4)
        return out, final

    assert torch.autograd.gradcheck(fn, tensors)


def test_selective_scan_in_pieces_equals_one_pass():
    """Chunked prefill: scanning x1 then x2 from x1's final state == scanning [x1; x2]."""
    inputs, _ = scan_inputs(length=40)
    common = dict(A=inputs["A"], D=inputs["D"], delta_bias=inputs["delta_bias"], delta_softplus=True)
    split = lambda name, s: inputs[name][..., s]  # noqa: E731
    whole, whole_final = selective_scan_ref(inputs["u"], inputs["delta"], B=inputs["B"], C=inputs["C"],
                                            z=inputs["z"], return_final_state=True, **common)
    first, state = selective_scan_ref(split("u", slice(0, 13)), split("delta", slice(0, 13)), B=split("B", slice(0, 13)),
                                      C=split("C", slice(0, 13)), z=split("z", slice(0, 13)), return_final_state=True,
                                      **common)
    second, final = selective_scan_ref(split("u", slice(13, None)), split("delta", slice(13, None)),
                                       B=split("B", slice(13, None)), C=split("C", slice(13, None)),
                                       z=split("z", slice(13, None)), initial_state=state, return_final_state=True,
                                       **common)
    torch.testing.assert_close(torch.cat([first, second], -1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, whole_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_scan_low_precision_inputs_accumulate_in_float32(dtype):
    inputs, _ = scan_inputs(length=50)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    out, final = selective_scan_ref(**low, delta_softplus=True, return_final_state=True)
    ref_out, _ = selective_scan_sequential(**low, delta_softplus=True)
    assert out.dtype == dtype and final.dtype == torch.float32
    assert relative_error(out, ref_out) < 1e-2


def test_state_update_steps_reproduce_the_scan():
    inputs, _ = scan_inputs(length=12)
    ref_out, ref_final = selective_scan_sequential(**inputs, delta_softplus=True)
    state = inputs["initial_state"].clone()
    steps = []
    for t in range(12):
        steps.append(selective_state_update_ref(
            state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], inputs["B"][..., t],
            inputs["C"][..., t], D=inputs["D"], z=inputs["z"][..., t], dt_bias=inputs["delta_bias"],
            dt_softplus=True,
        ))
    assert relative_error(torch.stack(steps, -1), ref_out) < 1e-5
    assert relative_error(state, ref_final) < 1e-5


def conv_inputs(batch=2, channels=5, length=23, width=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return dict(
        x=torch.randn(batch, channels, length, generator=g, dtype=dtype),
        weight=torch.randn(channels, width, generator=g, dtype=dtype),
        bias=torch.randn(channels, generator=g, dtype=dtype),
        initial_state=torch.randn(batch, channels, width - 1, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_causal_conv1d_matches_sequential_oracle(activation, with_state, packed, width):
    inputs = conv_inputs(width=width)
    if not with_state or width == 1:  # a width-1 conv carries no state
        inputs["initial_state"] = None
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(2, 23, dtype=torch.long)
        seq_idx[0, 3:] = 1
        seq_idx[0, 4:] = 2
        seq_idx[1, 21:] = 1
    tensors = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    out, final = causal_conv1d_ref(**inputs, seq_idx=seq_idx, activation=activation, return_final_state=True)
    ref_out, ref_final = causal_conv1d_sequential(**inputs, seq_idx=seq_idx, activation=activation)
    assert relative_error(out, ref_out) < 1e-6
    assert relative_error(final, ref_final) < 1e-6 or ref_final.abs().max() == final.abs().max() == 0

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad((out * grad_out).sum(), list(tensors.values()))
    ref_grads = torch.autograd.grad((ref_out * grad_out.double()).sum(), list(tensors.values()))
    for name, grad, ref_grad in zip(tensors, grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-6, name


def test_causal_conv1d_gradcheck_float64():
    inputs = conv_inputs(batch=1, channels=2, length=6, width=3, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 1]])
    tensors = [inputs[n].requires_grad_() for n in ("x", "weight", "bias", "initial_state")]
    assert torch.autograd.gradcheck(
        lambda x, w, b, s: causal_conv1d_ref(x, w, b, s, seq_idx=seq_idx, activation="silu"), tensors
    )


def test_conv_update_steps_reproduce_the_full_conv():
    inputs = conv_inputs()
    full, final = causal_conv1d_ref(**inputs, activation="silu", return_final_state=True)
    state = inputs["initial_state"].clone()
    steps = [causal_conv1d_update_ref(inputs["x"][..., t], state, inputs["weight"], inputs["bias"], "silu")
             for t in range(inputs["x"].shape[-1])]
    torch.testing.assert_close(torch.stack(steps, -1), full)
    torch.testing.assert_close(state, final)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_ref(**conv_inputs(), activation="relu")
