"""Grouped experts (`experts_ops`, `HybridLMSparseMoeBlock`) against an independent per-expert reference.

The reference below shares no code with the block: it takes the block's routing (expert indices), recomputes the
routing weights from the router in float64, and runs every expert as plain float64 matrix products on the tokens
sent to it, one (token, slot) at a time.
"""

import copy

import peft
import pytest
import torch
import torch.nn.functional as F

from builders import tiny_config
from oracles import TOLERANCE, assert_close_to
from hybrid_lm.experts_ops import (
    _grouped_mm_loop_op,
    _grouped_mm_masked,
    grouped_mm,
    grouped_mm_backend,
    grouped_mm_ref,
)
from hybrid_lm.feed_forward_hybrid_lm import HybridLMSparseMoeBlock

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def reference_moe(block, tokens, top_k_index):
    """float64 per-(token, slot) loop. tokens (T, H), top_k_index (T, K) -> (T, H); differentiable in tokens and
    every parameter of `block` (a float64 copy)."""
    probs = F.softmax(tokens @ block.router.weight.T, dim=-1)  # (T, E)
    weights = probs.gather(1, top_k_index)  # (T, K)
    if block.router.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    rows = []
    for t in range(tokens.shape[0]):
        row = torch.zeros_like(tokens[t])
        for k in range(top_k_index.shape[1]):
            expert = block.experts[int(top_k_index[t, k])]
            x = tokens[t]
            gate = x @ expert.gate_proj.weight.T + (expert.gate_proj.bias if expert.gate_proj.bias is not None else 0)
            up = x @ expert.up_proj.weight.T + (expert.up_proj.bias if expert.up_proj.bias is not None else 0)
            hidden = F.silu(gate) * up
            out = hidden @ expert.down_proj.weight.T + (expert.down_proj.bias if expert.down_proj.bias is not None else 0)
            row = row + weights[t, k] * out
        rows.append(row)
    return torch.stack(rows)


def make_block(seed=0, dtype=torch.float32, **overrides):
    config = tiny_config(**{"hidden_size": 32, "intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2,
                            **overrides})
    torch.manual_seed(seed)
    block = HybridLMSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.2)
    return block.to(dtype)


def check_against_reference(block, x, dtype, forward=None):
    """Values and the gradients of input, router and every expert weight, block (dtype) vs float64 reference.
    `forward` (default: the block) computes the output, e.g. the compiled block."""
    x = x.clone().requires_grad_()
    out = (block if forward is None else forward)(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    with torch.no_grad():
        _, _, top_k_index = block.router(x.reshape(-1, x.shape[-1]))
    reference = copy.deepcopy(block).double()
    reference.zero_grad()
    x64 = x.detach().double().requires_grad_()
    expected = reference_moe(reference, x64.reshape(-1, x.shape[-1]), top_k_index).reshape(x.shape)
    expected.backward(grad.double())
    # the same per-expert reference in the block's dtype: how close that dtype can get at all
    low = copy.deepcopy(block)
    low.zero_grad()
    x_low = x.detach().clone().requires_grad_()
    low_out = reference_moe(low, x_low.reshape(-1, x.shape[-1]), top_k_index).reshape(x.shape)
    low_out.backward(grad)
    assert_close_to(out, expected, dtype, "output", low_out)
    assert_close_to(x.grad, x64.grad, dtype, "input gradient", x_low.grad)
    params = zip(block.named_parameters(), reference.parameters(), low.parameters())
    for (name, param), expected_param, low_param in params:
        assert param.grad is not None, name
        if expected_param.grad is None:  # an expert no token was routed to
            assert param.grad.abs().sum() == 0, name
        else:
            assert_close_to(param.grad, expected_param.grad, dtype, name, low_param.grad)
    return top_k_index


# ---- the op ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [1, 0, 0, 0]], ids=["mixed", "one-group", "one-row"])
@pytest.mark.parametrize("op", ["grouped_mm", "loop", "masked"])
def test_grouped_mm_matches_reference(dtype, counts, op):
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 24, 16, dtype=dtype, requires_grad=True)  # nn.Linear layout (E, Dout, Din)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    fn = {"grouped_mm": grouped_mm, "masked": _grouped_mm_masked,
          "loop": lambda a, w, o: _grouped_mm_loop_op(a, w.contiguous(), o)}[op]
    out = fn(x, weight.transpose(-2, -1), offs)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = grouped_mm_ref(x64, w64.transpose(-2, -1), offs)
    expected.backward(grad.double())
    assert_close_to(out, expected, dtype, "output")
    assert_close_to(x.grad, x64.grad, dtype, "x gradient")
    assert_close_to(weight.grad, w64.grad, dtype, "weight gradient")
    assert weight.grad[torch.tensor(counts) == 0].abs().sum() == 0  # a group without rows gets no gradient


def test_backend_rules_on_cpu():
    linear_weights = torch.randn(4, 24, 16)  # (E, Dout, Din)
    assert grouped_mm_backend(torch.randn(5, 16), linear_weights.transpose(-2, -1)) == "grouped_mm"
    assert grouped_mm_backend(torch.randn(5, 24), torch.randn(4, 24, 16)) == "grouped_mm"
    assert grouped_mm_backend(torch.randn(5, 6), torch.randn(4, 6, 16)) == "loop"  # 24-byte rows
    assert grouped_mm_backend(torch.randn(5, 16), torch.randn(4, 16, 6)) == "loop"  # 24-byte gradient rows
    assert grouped_mm_backend(torch.randn(5, 8, dtype=torch.float64), torch.randn(4, 8, 16, dtype=torch.float64)) == "loop"


# ---- the block ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, overrides", [
    pytest.param((2, 5), {}, id="T10-E4-K2"),
    pytest.param((1, 1), {}, id="one-token"),
    pytest.param((3, 4), {"num_experts_per_tok": 1}, id="K1"),
    pytest.param((2, 3), {"num_experts_per_tok": 4}, id="K=E"),
    pytest.param((1, 2), {"num_experts": 8}, id="empty-experts"),
    pytest.param((2, 4), {"mlp_bias": True, "norm_topk_prob": True}, id="bias-normalised"),
    pytest.param((2, 5), {"intermediate_size": 50}, id="unaligned-intermediate"),  # 100-byte bf16 rows
])
def test_grouped_block_matches_per_expert_reference(dtype, shape, overrides):
    block = make_block(dtype=dtype, **overrides)
    assert block.experts_are_grouped()
    x = torch.randn(*shape, 32, dtype=dtype)
    top_k_index = check_against_reference(block, x, dtype)
    if overrides.get("num_experts") == 8:
        assert len(top_k_index.unique()) < 8  # some expert got no token, and its gradients were checked to be zero


def nan_in_unrouted_experts(block, x):
    """Poisons every expert that no token of x is routed to with NaN weights: a path that runs all experts on all
    tokens (and masks with zero routing weights) turns the output NaN, a grouped one does not."""
    with torch.no_grad():
        _, _, top_k_index = block.router(x.reshape(-1, x.shape[-1]))
        unrouted = sorted(set(range(block.num_experts)) - set(top_k_index.unique().tolist()))
        for e in unrouted:
            for param in block.experts[e].parameters():
                param.fill_(float("nan"))
    assert unrouted, "the test needs an expert without tokens"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_block_has_no_graph_break_and_skips_unrouted_experts(dtype):
    block = make_block(dtype=dtype, num_experts=8)
    x = torch.randn(1, 2, 32, dtype=dtype)
    nan_in_unrouted_experts(block, x)
    expected = block(x)
    assert torch.isfinite(expected).all()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    code = "\n".join(graph.code for graph in explanation.graphs)
    # bfloat16 is traced as torch._grouped_mm; float32 (its fake kernel is bf16-only) as the per-expert custom op
    assert ("_grouped_mm(" in code) == (dtype == torch.bfloat16) and ("grouped_mm_loop" in code) == (dtype != torch.bfloat16)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    xg = x.clone().requires_grad_()
    out = compiled(xg)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    out.float().sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert torch.isfinite(block.router.weight.grad).all()


def test_compiled_block_matches_reference_gradients():
    block = make_block(num_experts=8)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    check_against_reference(block, torch.randn(2, 3, 32), torch.float32, forward=compiled)


def test_eager_grouped_block_skips_unrouted_experts():
    block = make_block(num_experts=8)
    x = torch.randn(1, 2, 32)
    nan_in_unrouted_experts(block, x)
    assert torch.isfinite(block(x)).all()


def test_no_host_read_in_the_grouped_path(monkeypatch):
    """The grouped path computes offsets on the device: it calls neither .tolist() nor .item() (bf16 takes
    torch._grouped_mm on CPU, as it does on sm90 GPUs)."""
    block = make_block(dtype=torch.bfloat16)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read in the grouped experts path")

    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    block(x).sum().backward()


# ---- packed weights (inference) ----

def expert_weights(block):
    return [getattr(expert, name).weight for expert in block.experts for name in ("gate_proj", "up_proj", "down_proj")]


def float64_output(block, x):
    with torch.no_grad():
        tokens = x.reshape(-1, x.shape[-1])
        _, _, top_k_index = block.router(tokens)
        return reference_moe(copy.deepcopy(block).double(), tokens.double(), top_k_index).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_reads_the_experts_from_packed_storage_without_copying_them(dtype):
    """Without gradients the first forward moves the weights into packed tensors (each weight becomes a view of
    its slice, no memory added) and later forwards read them in place; values stay the reference's."""
    block = make_block(dtype=dtype, num_experts=4)
    x = torch.randn(2, 5, 32, dtype=dtype)
    params = expert_weights(block)
    with torch.no_grad():
        first = block(x)
    storages = {p.untyped_storage().data_ptr() for p in expert_weights(block)}
    assert len(storages) == 2  # gate/up of all experts in one, down in the other
    assert [a is b for a, b in zip(expert_weights(block), params)] == [True] * len(params)
    baseline = reference_moe(copy.deepcopy(block), x.reshape(-1, 32),
                             block.router(x.reshape(-1, 32))[2]).reshape(x.shape).detach()
    assert_close_to(first, float64_output(block, x), dtype, "first inference", baseline)

    stacks = []
    original_stack = torch.stack
    try:
        torch.stack = lambda tensors, *args, **kwargs: stacks.append(len(tensors)) or original_stack(tensors, *args,
                                                                                                      **kwargs)
        with torch.no_grad():
            again = block(x)
    finally:
        torch.stack = original_stack
    assert stacks == [], "a packed forward stacked the expert weights again"
    torch.testing.assert_close(again, first)


def test_packed_weights_follow_training_moves_and_replacement():
    """Gradients still reach every expert after packing; an optimizer step shows in the next packed forward;
    `.to()` and a replaced parameter end the packing, and the next inference forward packs the new weights."""
    block = make_block(num_experts=4)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        block(x)
    check_against_reference(block, x, torch.float32)  # grad mode: stacked from the (view) parameters
    optimizer = torch.optim.SGD(block.parameters(), lr=0.5)
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(block(x), stacked_output(block, x))  # the step shows in the packed storage

    block.double()
    x = x.double()
    with torch.no_grad():
        torch.testing.assert_close(block(x), stacked_output(block, x))
    assert len({p.untyped_storage().data_ptr() for p in expert_weights(block)}) == 2

    block.experts[2].up_proj.weight = torch.nn.Parameter(torch.randn_like(block.experts[2].up_proj.weight))
    with torch.no_grad():
        torch.testing.assert_close(block(x), stacked_output(block, x))
    block.experts[1].down_proj.weight.data = block.experts[1].down_proj.weight.data.clone() * 2  # moved in place
    with torch.no_grad():
        torch.testing.assert_close(block(x), stacked_output(block, x))


def test_compiled_inference_forgets_the_packing_when_the_weights_move():
    """Compiled code checks the packing by parameter identity only, so a move (`.to()`) must drop it: a compiled
    forward after `.double()` computes with the moved weights."""
    block = make_block(num_experts=4)
    x = torch.randn(2, 5, 32)
    compiled = torch.compile(block, backend="aot_eager")
    with torch.no_grad():
        block(x)  # eager: packs
        torch.testing.assert_close(compiled(x), stacked_output(block, x))
        block.double()
        torch.testing.assert_close(compiled(x.double()), stacked_output(block, x.double()))


def stacked_output(block, x):
    """The block's output through the stacking path (grad mode), detached."""
    with torch.enable_grad():
        return block(x).detach()


# ---- adapters ----

def lora_block(block, **lora_options):
    lora = peft.get_peft_model(copy.deepcopy(block), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False,
        **lora_options))
    model = lora.base_model.model
    wrapped = {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.Linear)}
    assert wrapped == {"gate_proj", "up_proj", "down_proj"}
    return lora, model


def module_loop(block, x):
    """The block's experts called module by module (peft's own LoRA forward): the oracle for adapted experts."""
    tokens = x.reshape(-1, x.shape[-1])
    _, weights, index = block.router(tokens)
    return block._module_loop_forward(tokens, weights, index).reshape(x.shape)


def test_lora_runs_inside_the_grouped_products():
    block = make_block(num_experts=4)
    x = torch.randn(2, 5, 32)
    base = block(x).detach()
    lora, model = lora_block(block)
    assert model.experts_are_grouped()
    adapted = model(x)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapters reach the experts
    expected = module_loop(model, x)
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(adapted.sum(), [p for n, p in model.named_parameters() if "lora_" in n])
    expected_grads = torch.autograd.grad(expected.sum(), [p for n, p in model.named_parameters() if "lora_" in n])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    # compiled: the same grouped path, no graph break
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)
    # merged adapters are plain nn.Linear again
    merged = lora.merge_and_unload()
    assert merged.experts_are_grouped()
    torch.testing.assert_close(merged(x), expected.detach(), atol=1e-5, rtol=1e-5)


def test_lora_variants_fall_back_to_the_module_loop():
    block = make_block(num_experts=4)
    x = torch.randn(2, 5, 32)
    _, model = lora_block(block, use_dora=True)
    assert not model.experts_are_grouped()
    expected = module_loop(model, x)
    torch.testing.assert_close(model(x), expected)
    # (peft's DoRA layer itself does not trace with fullgraph=True in peft 0.21)


# ---- GPU ----

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_block_on_gpu_matches_reference(dtype):
    block = make_block(dtype=dtype, num_experts=8, hidden_size=64, intermediate_size=128).cuda()
    x = torch.randn(4, 33, 64, dtype=dtype, device="cuda")
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] == 9:
        w = torch.empty(8, 64, 128, dtype=dtype, device="cuda")
        assert grouped_mm_backend(x.reshape(-1, 64), w) == "grouped_mm"
    top_k_index = check_against_reference(block, x, dtype)
    assert top_k_index.is_cuda


@gpu
@pytest.mark.gpu
def test_compiled_block_on_gpu_in_a_cuda_graph():
    """bf16 on sm90: no host sync, so the compiled block runs under mode="reduce-overhead" (CUDA graphs)."""
    block = make_block(dtype=torch.bfloat16, num_experts=8, hidden_size=64, intermediate_size=128).cuda()
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16, device="cuda")
    expected = block(x)
    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            out = compiled(x)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.bfloat16])
