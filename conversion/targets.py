"""What convert.py writes: one `TargetFormat` entry each, hybrid_lm (the default) and Jamba.

A target format builds its config.json from the HybridLMConfig (refusing what it cannot express), says
whether hybrid_lm's code goes along, and which class loads the result for verification. Tensor names need
no mapping: hybrid_lm's names are Jamba's on-disk (one tensor per expert) names.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from checkpoint_io import ConversionError, ConversionWarning
from hybrid_lm import HybridLMConfig
from sources import from_pretrained_loader, picked



def _period_rule(flags: list[bool], preferred: tuple[int, int]) -> tuple[int, int] | None:
    """(period, offset) with `flags[i] == (i % period == offset)` for every layer, the preferred pair first;
    None if no pair fits. A period past the last layer expresses "no layer"."""
    candidates = [preferred] + [(p, o) for p in range(1, len(flags) + 2) for o in range(p)]
    for period, offset in candidates:
        if 0 <= offset < period and all((i % period == offset) == flag for i, flag in enumerate(flags)):
            return period, offset
    return None


def _layers(indices: list[int]) -> str:
    """`layer [3]` or `layers [0, 2]`, for messages."""
    return f"layer{'s' if len(indices) > 1 else ''} {indices}"


def jamba_export_config(config: HybridLMConfig) -> transformers.PreTrainedConfig:
    """The JambaConfig of a hybrid_lm model, or a ConversionError listing every feature Jamba lacks.

    Only settings that change what the model computes are refused; the router z-loss (training only) is
    dropped with a warning.
    """
    kinds = config.layers_block_type
    attention = [i for i, kind in enumerate(kinds) if kind == "attention"]
    has_mamba = len(attention) < len(kinds)
    counts = config.layers_num_experts
    moe = [i for i, count in enumerate(counts) if count > 1]
    problems = []
    if attention:
        if config.use_rope:
            problems.append("RoPE (use_rope=True): Jamba's attention has no position encoding")
        if config.sliding_window is not None:
            problems.append(f"sliding-window attention (sliding_window={config.sliding_window})")
        if config.attention_bias:
            problems.append("attention biases (attention_bias=True)")
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            problems.append(
                f"head_dim {config.head_dim} != hidden_size / num_attention_heads "
                f"({config.hidden_size} / {config.num_attention_heads})"
            )
    if has_mamba and not config.mamba_inner_layernorms:
        problems.append("Mamba layers without the dt/B/C RMSNorms (mamba_inner_layernorms=False)")
    if has_mamba and config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (Jamba applies it in the Mamba conv too; use 'silu')")
    no_ff = [i for i, count in enumerate(counts) if count == 0]
    if no_ff:
        problems.append(f"layers without a feed-forward block ({_layers(no_ff)})")
    if config.mlp_bias and len(no_ff) < len(counts):
        problems.append("MLP biases (mlp_bias=True)")
    if moe and config.norm_topk_prob:
        problems.append("renormalised top-K router weights (norm_topk_prob=True)")
    attn_rule = _period_rule([kind == "attention" for kind in kinds], (config.attn_layer_period,
                                                                         config.attn_layer_offset))
    if attn_rule is None:
        problems.append(
            f"attention at {_layers(attention)}, which no attn_layer_period / attn_layer_offset rule produces"
        )
    expert_rule = _period_rule([count > 1 for count in counts], (config.expert_layer_period,
                                                                  config.expert_layer_offset))
    if expert_rule is None:
        problems.append(f"experts at {_layers(moe)}, which no expert_layer_period / expert_layer_offset rule produces")
    if problems:
        raise ConversionError(
            "Jamba cannot express this model: " + "; ".join(problems) + ". Keep it in the hybrid_lm format."
        )
    if config.router_z_loss_coef > 0:
        warnings.warn(
            f"router_z_loss_coef ({config.router_z_loss_coef}) is dropped: Jamba has no router z-loss (training only)",
            ConversionWarning,
            stacklevel=2,
        )
    return transformers.JambaConfig(
        **picked(config.to_dict(), (
            "vocab_size", "tie_word_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "hidden_act", "initializer_range", "rms_norm_eps",
            "use_cache", "output_router_logits", "router_aux_loss_coef", "pad_token_id", "bos_token_id",
            "eos_token_id", "max_position_embeddings", "attention_dropout", "num_experts_per_tok", "num_experts",
            "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias", "mamba_proj_bias",
        )),
        attn_layer_period=attn_rule[0],
        attn_layer_offset=attn_rule[1],
        expert_layer_period=expert_rule[0],
        expert_layer_offset=expert_rule[1],
        architectures=["JambaForCausalLM"],
    )


@dataclass(frozen=True)
class TargetFormat:
    """What convert.py writes: its config.json (from the HybridLMConfig) and the class that loads the result."""

    name: str
    sources: tuple[str, ...]  # source formats it accepts
    build_config: Callable[[HybridLMConfig], transformers.PreTrainedConfig]
    load: Callable[[Path], torch.nn.Module]  # DST folder -> float32 model, for verification
    writes_code: bool  # copy hybrid_lm's modeling files (trust_remote_code) next to the weights


def _as_hybrid_lm(config: HybridLMConfig) -> HybridLMConfig:
    config.architectures = ["HybridLMForCausalLM"]
    return config


TARGETS = {
    "hybrid_lm": TargetFormat("hybrid_lm", ("jamba", "mamba", "mamba_ssm", "mixtral", "llama"), _as_hybrid_lm,
                              from_pretrained_loader("HybridLMForCausalLM"), writes_code=True),
    "jamba": TargetFormat("jamba", ("hybrid_lm",), jamba_export_config, from_pretrained_loader("JambaForCausalLM"),
                          writes_code=False),
}
