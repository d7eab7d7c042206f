"""Feed-forward blocks of HybridLM: the SwiGLU MLP, the top-K softmax router, the sparse mixture of experts and
the router losses.

Shape legend: B = batch, L = tokens, T = B * L, H = hidden size, E = experts, K = experts per token.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_hybrid_lm import HybridLMConfig
from .experts_ops import expert_offsets, grouped_linear
from .packed_weights import PackedWeights, PacksWeights, is_plain_linear, packed_linear


class HybridLMMLP(PacksWeights):
    """SwiGLU: down(act(gate(x)) * up(x)). Also one expert of a mixture. Without gradients, gate and up run as one
    product over their packed weights (packed_weights.py)."""

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self._gate_up_weight = PackedWeights("the MLP's gate and up weights")
        self._gate_up_bias = PackedWeights("the MLP's gate and up biases")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H)"""
        gate_up = packed_linear([self.gate_proj, self.up_proj], self._gate_up_weight, self._gate_up_bias)
        if gate_up is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, *gate_up).chunk(2, dim=-1)  # (..., I) each
        hidden = self.act_fn(gate).mul_(up)  # in place (no gradient here): as much memory as the layers take
        del gate, up
        return self.down_proj(hidden)


class HybridLMTopKRouter(nn.Module):
    """Softmax router. Returns router logits (T, E), top-K weights (T, K) and expert indices (T, K)."""

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor):
        router_logits = F.linear(hidden_states, self.weight)  # (T, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index


class HybridLMSparseMoeBlock(PacksWeights):
    """Mixture of SwiGLU experts with top-K routing and no token dropping.

    Each expert is an `HybridLMMLP`: its nn.Linear modules are where the parameters live, so checkpoints keep
    Jamba's per-expert keys (`experts.{e}.gate_proj.weight`), LoRA attaches to every expert projection and
    bitsandbytes quantizes them. When every expert projection is a plain nn.Linear, or a plain peft LoRA layer
    over one, the experts run as grouped matrix products over all experts (`experts_ops.grouped_mm`; gate and up
    in one product, each LoRA adapter as two more) on weights stacked per forward (without gradients: packed once,
    packed_weights.py), the same in eager and compiled mode, with no host sync where `torch._grouped_mm` has its
    kernel. Differs from transformers' Jamba, which stores 3-D expert parameters (`gate_up_proj`, `down_proj`) and
    converts the keys on load.

    Other experts (bitsandbytes layers, DoRA or other LoRA variants, merged or disabled adapters, accelerate
    hooks on a projection) run module by module on the tokens routed to them (eager; the per-expert counts are
    read on the host) or, under torch.compile, every expert on every token, the routing weights (zero for
    unchosen experts) selecting the result.
    """

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = HybridLMTopKRouter(config)
        self.experts = nn.ModuleList([HybridLMMLP(config) for _ in range(config.num_experts)])
        self._packed_gate_up = PackedWeights("the experts' weights")
        self._packed_down = PackedWeights("the experts' weights")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L, H). The router logits are recorded from the router (`output_router_logits`)."""
        batch, length, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)  # (T, H)
        _, top_k_weights, top_k_index = self.router(tokens)
        projections = self._grouped_projections()  # inspected once a forward
        if projections is not None:
            output = self._grouped_forward(tokens, top_k_weights, top_k_index, projections)
        elif torch.compiler.is_compiling():
            output = self._dense_forward(tokens, top_k_weights, top_k_index)
        else:
            output = self._module_loop_forward(tokens, top_k_weights, top_k_index)
        return output.reshape(batch, length, hidden)

    def experts_are_grouped(self) -> bool:
        """Whether the experts run as grouped products (see the class docstring)."""
        return self._grouped_projections() is not None

    def _grouped_projections(self):
        """{"gate_proj" | "up_proj" | "down_proj": (base nn.Linear per expert, LoRA adapters)}, or None when some
        expert cannot run grouped. An adapter is (A weights, B weights, scalings, dropout), one entry per expert."""
        if not all(type(expert) is HybridLMMLP for expert in self.experts):
            return None
        projections = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            layers = [getattr(expert, name) for expert in self.experts]
            if all(is_plain_linear(layer) for layer in layers):
                projections[name] = (layers, [])
                continue
            adapters = _vanilla_lora_adapters(layers)
            if adapters is None:
                return None
            projections[name] = ([layer.base_layer for layer in layers], adapters)
        return projections

    def _grouped_forward(self, tokens, top_k_weights, top_k_index, projections=None):
        """projections: what `_grouped_projections` returns (looked up when not given)."""
        num_tokens, top_k = top_k_index.shape
        projections = projections if projections is not None else self._grouped_projections()
        (gate_layers, gate_adapters), (up_layers, up_adapters), (down_layers, down_adapters) = (
            projections["gate_proj"], projections["up_proj"], projections["down_proj"])
        # 1. sort the (token, slot) pairs by expert; offsets per expert stay on the device
        sorted_expert, order = torch.sort(top_k_index.reshape(-1), stable=True)  # (S,), S = T * K
        offs = expert_offsets(sorted_expert, self.num_experts)  # (E,) int32
        # 2. the weights stacked across experts, nn.Linear layout; gate and up concatenated per expert.
        # autocast does not reach torch._grouped_mm: everything is cast to the dtype nn.Linear would compute in
        device_type = tokens.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else down_layers[0].weight.dtype)
        gate_up_weight, down_weight = self._stacked_weights(gate_layers, up_layers, down_layers, dtype)
        gate_up_bias = down_bias = None
        if gate_layers[0].bias is not None:
            gate_up_bias = _stack([b for g, u in zip(gate_layers, up_layers) for b in (g.bias, u.bias)], dtype)
            gate_up_bias = gate_up_bias.view(self.num_experts, -1)  # (E, 2I)
            down_bias = _stack([layer.bias for layer in down_layers], dtype)  # (E, H)
        # 3. gate/up product, SwiGLU, down product, all experts at once; LoRA adds its low-rank products
        routed = tokens.to(dtype)[order // top_k]  # (S, H)
        gate, up = grouped_linear(routed, gate_up_weight, gate_up_bias, offs, sorted_expert).chunk(2, dim=-1)
        gate = _with_lora(gate, routed, gate_adapters, offs, sorted_expert, dtype)
        up = _with_lora(up, routed, up_adapters, offs, sorted_expert, dtype)
        hidden = self.experts[0].act_fn(gate) * up  # (S, I)
        del gate, up  # in inference the (S, 2I) product is freed before the next one
        expert_out = grouped_linear(hidden, down_weight, down_bias, offs, sorted_expert)
        expert_out = _with_lora(expert_out, hidden, down_adapters, offs, sorted_expert, dtype)  # (S, H)
        # 4. back to (token, slot) order, weighted sum over the K slots (deterministic, no atomics)
        expert_out = torch.empty_like(expert_out).index_copy_(0, order, expert_out)  # (S, H)
        output = (expert_out.view(num_tokens, top_k, -1) * top_k_weights[..., None].to(dtype)).sum(1)
        return output.to(tokens.dtype)

    def _stacked_weights(self, gate_layers, up_layers, down_layers, dtype):
        """The experts' weights in `dtype`: gate and up concatenated per expert (E, 2I, H), down (E, H, I). Stacked
        from the nn.Linear weights (differentiable), or, where no gradient is needed, read in place from the packed
        storage the weights live in (see `_packed_weights`)."""
        weights = [w for g, u in zip(gate_layers, up_layers) for w in (g.weight, u.weight)]
        down = [layer.weight for layer in down_layers]
        packed = self._packed_weights(weights, down, dtype)
        if packed is not None:
            return packed
        gate_up_weight = _stack(weights, dtype)
        return gate_up_weight.view(self.num_experts, -1, gate_up_weight.shape[-1]), _stack(down, dtype)

    def _packed_weights(self, gate_up: list, down: list, dtype):
        """(E, 2I, H) and (E, H, I) tensors whose slices *are* the experts' weights, for forwards that need no
        gradient in the weights' own dtype (inference); None otherwise (packed_weights.py). Stacking them instead
        copied every expert's weights in every forward: a third of a decode step on the bench config
        (benchmarks/RESULTS.md, "Generation")."""
        if dtype != down[0].dtype:
            return None
        packed_gate_up = self._packed_gate_up.get(gate_up)
        packed_down = self._packed_down.get(down) if packed_gate_up is not None else None
        if packed_down is None:
            return None
        hidden = down[0].shape[0]
        return packed_gate_up.view(self.num_experts, -1, hidden), packed_down.view(self.num_experts, hidden, -1)

    def _module_loop_forward(self, tokens, top_k_weights, top_k_index):
        # sort the (token, slot) assignments by expert so each expert sees one contiguous slice
        flat_expert = top_k_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // top_k_index.shape[1]
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()  # host sync
        routed = tokens[token_of]
        weights = top_k_weights.reshape(-1)[order, None]
        output = torch.zeros_like(tokens)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                stop = start + count
                output.index_add_(0, token_of[start:stop], expert(routed[start:stop]) * weights[start:stop])
                start = stop
        return output

    def _dense_forward(self, tokens, top_k_weights, top_k_index):
        dense_weights = tokens.new_zeros(tokens.shape[0], self.num_experts).scatter(1, top_k_index, top_k_weights)
        return sum(expert(tokens) * dense_weights[:, e, None] for e, expert in enumerate(self.experts))


def _vanilla_lora_adapters(layers: list[nn.Module]):
    """The active adapters of per-expert peft LoRA layers, as [(A weights, B weights, scalings, dropout)], when
    every layer is a plain LoRA (no variant such as DoRA, no LoRA bias, not merged, not disabled) over a plain
    nn.Linear with the same active adapters; otherwise None. Duck-typed: hybrid_lm does not import peft."""
    first = layers[0]
    if not all(hasattr(layer, attr) for layer in layers for attr in ("base_layer", "lora_A", "lora_B", "scaling")):
        return None
    names = [name for name in first.active_adapters if name in first.lora_A]
    for layer in layers:
        if (layer.merged or layer.disable_adapters or not is_plain_linear(layer.base_layer)
                or [name for name in layer.active_adapters if name in layer.lora_A] != names):
            return None
        for name in names:
            if (name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(name, False)
                    or not is_plain_linear(layer.lora_A[name]) or not is_plain_linear(layer.lora_B[name])
                    or layer.lora_A[name].weight.shape != first.lora_A[name].weight.shape
                    or repr(layer.lora_dropout[name]) != repr(first.lora_dropout[name])):
                return None
    return [([layer.lora_A[name].weight for layer in layers], [layer.lora_B[name].weight for layer in layers],
             [layer.scaling[name] for layer in layers], first.lora_dropout[name]) for name in names]


def _stack(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.stack(tensors).to(dtype)


def _with_lora(y, x, adapters, offs, expert_ids, dtype):
    """y (S, Dout) plus, per adapter, scaling * B(A(dropout(x))) per expert, as two grouped products from x
    (S, Din); y itself without adapters (no copy). Computed in `dtype` (peft computes in the adapter's dtype, often
    float32)."""
    for a_weights, b_weights, scalings, dropout in adapters:
        low_rank = grouped_linear(dropout(x), _stack(a_weights, dtype), None, offs, expert_ids)  # (S, r)
        delta = grouped_linear(low_rank, _stack(b_weights, dtype), None, offs, expert_ids)  # (S, Dout)
        if len(set(scalings)) == 1:
            y = y + delta * scalings[0]
        else:
            y = y + delta * torch.tensor(scalings, device=x.device, dtype=dtype)[expert_ids, None]
    return y


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        token_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch Transformer load-balancing loss over all MoE layers, padding excluded.

    router_logits: one (T, E) tensor per MoE layer, T = B * L; token_mask: (B, L), 1 = token.
    Returns num_experts * sum_e (fraction of assignments to e) * (mean router probability of e),
    both averaged over the real tokens of all layers.
    """
    device = router_logits[0].device
    weight = token_mask.reshape(-1).to(device, torch.float32) if token_mask is not None else None
    assigned = torch.zeros(num_experts, device=device)
    probability = torch.zeros(num_experts, device=device)
    total = 0.0
    for logits in router_logits:
        probs = F.softmax(logits.to(device).float(), dim=-1)  # (T, E)
        chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).sum(1).float()  # (T, E)
        if weight is not None:
            probs, chosen = probs * weight[:, None], chosen * weight[:, None]
            total = total + weight.sum()
        else:
            total = total + probs.shape[0]
        assigned = assigned + chosen.sum(0)
        probability = probability + probs.sum(0)
    return num_experts * torch.sum((assigned / total) * (probability / total))


def router_z_loss(router_logits: tuple[torch.Tensor, ...], token_mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE z-loss: mean over real tokens and MoE layers of logsumexp(router logits)^2."""
    device = router_logits[0].device
    weight = token_mask.reshape(-1).to(device, torch.float32) if token_mask is not None else None
    losses = []
    for logits in router_logits:
        z = torch.logsumexp(logits.to(device).float(), dim=-1) ** 2  # (T,)
        losses.append((z * weight).sum() / weight.sum() if weight is not None else z.mean())
    return torch.stack(losses).mean()
