"""The fused (chunked) lm_head + cross-entropy against full float64 logits and `F.cross_entropy`; the model's
training loss through it against the plain head."""

import pytest
import torch
import torch.nn.functional as F

from hybrid_lm import cross_entropy_ops
from hybrid_lm.cross_entropy_ops import cross_entropy_rows_ref, linear_cross_entropy
from builders import tiny_model


def oracle(hidden, weight, labels, divisor=None):
    """float64 logits, then F.cross_entropy summed over the rows with a target."""
    logits = hidden.double() @ weight.double().T
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total / ((labels != -100).sum() if divisor is None else divisor)


def inputs(rows=37, hidden=16, vocab=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::5] = -100
    return h, w, labels


@pytest.mark.parametrize("divisor", [None, 13.0, torch.tensor(11)], ids=["mean", "float", "tensor"])
@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp64", "fp32", "bf16"])
def test_loss_and_gradients_equal_full_logits(dtype, tol, chunk_rows, divisor):
    h, w, labels = inputs(dtype=dtype)
    loss = linear_cross_entropy(h, w, labels, divisor, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss * 1.7, (h, w))  # a non-unit incoming gradient
    ref_h, ref_w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = oracle(ref_h, ref_w, labels, divisor)
    expected_grads = torch.autograd.grad(expected * 1.7, (ref_h, ref_w))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), expected, rtol=tol, atol=tol)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


triton_kernel = pytest.mark.skipif(cross_entropy_ops.cross_entropy_rows_triton is None, reason="needs triton")


@triton_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_kernel_equals_the_reference(dtype, monkeypatch):
    """The Triton row kernel (in Triton's interpreter on CPU) against the reference computed in float64 from the
    same logits: ignored rows, -inf logits, a vocabulary spread over several blocks with a ragged last one."""
    from hybrid_lm import triton_cross_entropy

    monkeypatch.setattr(triton_cross_entropy, "BLOCK_V", 16)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 50, generator=g) * 4).to(dtype)
    logits[2, 7] = logits[3, :20] = float("-inf")
    labels = torch.randint(0, 50, (9,), generator=g)
    labels[[1, 5]] = -100
    labels[3] = 30  # a row whose first 20 logits are -inf
    loss = torch.full((9,), float("nan"))
    grad = triton_cross_entropy.cross_entropy_rows_triton(logits.clone(), labels, -100, loss)
    want_loss, want_grad = cross_entropy_rows_ref(logits.double(), labels, -100)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # the gradient is rounded to the logits' dtype
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol)
    assert grad[[1, 5]].abs().max() == 0 and loss[[1, 5]].abs().max() == 0


@triton_kernel
@pytest.mark.parametrize("chunk_rows", [8, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_loss_and_gradients_through_the_rows_kernel_equal_full_logits(dtype, tol, chunk_rows):
    h, w, labels = inputs(dtype=dtype)
    loss = linear_cross_entropy(h, w, labels, torch.tensor(11), chunk_rows=chunk_rows, use_kernel=True)
    grads = torch.autograd.grad(loss * 1.7, (h, w))
    ref_h, ref_w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = oracle(ref_h, ref_w, labels, torch.tensor(11))
    expected_grads = torch.autograd.grad(expected * 1.7, (ref_h, ref_w))
    torch.testing.assert_close(loss.double(), expected, rtol=tol, atol=tol)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_the_rows_kernel_is_refused_for_float64():
    h, w, labels = inputs(dtype=torch.float64)
    with pytest.raises(ValueError, match="use_kernel=True needs triton and float32"):
        linear_cross_entropy(h, w, labels, use_kernel=True)


def test_ignored_rows_get_no_gradient_and_frozen_weight_none():
    h, w, labels = inputs()
    w.requires_grad_(False)
    labels[:10] = -100
    loss = linear_cross_entropy(h, w, labels, chunk_rows=4)
    (grad,) = torch.autograd.grad(loss, (h,))
    ignored = labels == -100
    assert grad[ignored].abs().max() == 0 and grad[~ignored].abs().amax(1).min() > 0


def test_bad_shapes_are_refused():
    h, w, labels = inputs()
    with pytest.raises(ValueError, match=r"hidden \(N, H\), weight \(V, H\) and labels \(N,\)"):
        linear_cross_entropy(h, w[:, :8], labels)


def model_loss(model, input_ids, **kwargs):
    out = model(input_ids, labels=input_ids, **kwargs)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return out, grads


@pytest.mark.parametrize("extra", ["plain", "num_items", "shift_labels"])
def test_training_loss_through_the_fused_head_equals_the_plain_head(extra):
    input_ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    kwargs = {"plain": {}, "num_items": {"num_items_in_batch": torch.tensor(7)},
              "shift_labels": {"shift_labels": torch.where(input_ids > 50, input_ids, -100)}}[extra]
    fused, fused_grads = model_loss(tiny_model().train(), input_ids, **kwargs)
    plain, plain_grads = model_loss(tiny_model(fused_loss=False).train(), input_ids, **kwargs)
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss)
    for got, want in zip(fused_grads, plain_grads):
        if want is not None:
            torch.testing.assert_close(got, want)


on_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=on_cuda)])
def test_under_autocast_the_loss_is_the_autocast_heads(device):
    """Mixed precision as Trainer's bf16=True runs it: float32 hidden states and weight under autocast. The product
    runs in bfloat16 as autocast runs F.linear, and the gradients come back in float32."""
    h, w, labels = (t.detach().to(device) for t in inputs(rows=64, hidden=32, vocab=300))
    h.requires_grad_(), w.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels, chunk_rows=24)
        logits = F.linear(h, w)
    assert logits.dtype == torch.bfloat16
    expected = F.cross_entropy(logits.float(), labels, ignore_index=-100)
    grads = torch.autograd.grad(loss, (h, w))
    expected_grads = torch.autograd.grad(expected, (h, w))
    assert loss.dtype == torch.float32 and [g.dtype for g in grads] == [torch.float32, torch.float32]
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, expected_grads):
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_training_loss_under_autocast_through_the_fused_head_equals_the_plain_head():
    input_ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, fused_grads = model_loss(tiny_model().train(), input_ids)
        plain, plain_grads = model_loss(tiny_model(fused_loss=False).train(), input_ids)
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-3, atol=1e-3)
    for got, want in zip(fused_grads, plain_grads):
        if want is not None:
            assert got.dtype == want.dtype == torch.float32
            assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_a_wrapped_head_keeps_the_plain_path():
    """LoRA on lm_head must not be bypassed by the fused loss, which reads the bare weight."""
    peft = pytest.importorskip("peft")
    model = tiny_model().train()
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["lm_head"], r=2, init_lora_weights=False))
    input_ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits is not None
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(out.loss, lora))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_loss_on_the_gpu_equals_full_logits(compiled):
    h, w, labels = (t.detach().cuda() for t in inputs(rows=4096, hidden=256, vocab=32000, dtype=torch.bfloat16))
    h.requires_grad_(), w.requires_grad_()
    fn = torch.compile(linear_cross_entropy) if compiled else linear_cross_entropy
    loss = fn(h, w, labels, None, chunk_rows=1024)
    grads = torch.autograd.grad(loss, (h, w))
    ref_h, ref_w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = oracle(ref_h, ref_w, labels)
    expected_grads = torch.autograd.grad(expected, (ref_h, ref_w))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, expected_grads):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
