"""Feed-forward blocks of HybridLM: the SwiGLU MLP, the top-K softmax router, the sparse mixture of experts and
the router losses.

Shape legend: B = batch, L = tokens, T = B * L, H = hidden size, E = experts, K = experts per token.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_hybrid_lm import HybridLMConfig


class HybridLMMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)). Also one expert of a mixture."""

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


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


class HybridLMSparseMoeBlock(nn.Module):
    """Mixture of SwiGLU experts with top-K routing and no token dropping.

    Each expert is an `HybridLMMLP` (so adapters such as LoRA attach to every expert projection), and
    runs once on the tokens routed to it. Under `torch.compile` the token counts per expert are unknown
    while tracing, so there every expert runs on every token and the routing weights (zero for the
    experts a token was not sent to) select the result: the same function, E/K times the expert FLOPs,
    and no graph break.
    """

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = HybridLMTopKRouter(config)
        self.experts = nn.ModuleList([HybridLMMLP(config) for _ in range(config.num_experts)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L, H). The router logits are recorded from the router (`output_router_logits`)."""
        batch, length, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)  # (T, H)
        _, top_k_weights, top_k_index = self.router(tokens)
        if torch.compiler.is_compiling():
            dense_weights = tokens.new_zeros(tokens.shape[0], self.num_experts).scatter(1, top_k_index, top_k_weights)
            output = sum(expert(tokens) * dense_weights[:, e, None] for e, expert in enumerate(self.experts))
            return output.reshape(batch, length, hidden)
        # sort the (token, slot) assignments by expert so each expert sees one contiguous slice
        flat_expert = top_k_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // top_k_index.shape[1]
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        routed = tokens[token_of]
        weights = top_k_weights.reshape(-1)[order, None]
        output = torch.zeros_like(tokens)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                stop = start + count
                output.index_add_(0, token_of[start:stop], expert(routed[start:stop]) * weights[start:stop])
                start = stop
        return output.reshape(batch, length, hidden)


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
