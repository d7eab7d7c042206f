"""config.json of the checkpoint families hybrid_lm converts (Jamba, Mamba, Mixtral, Llama) as a `HybridLMConfig`.

Pure functions of the config dict, no weights: `conversion/sources.py` builds its conversions on them, and
`hybrid-lm memory` reads any of these configs through `config_from_dict` without the conversion scripts.
What hybrid_lm cannot compute the same way is refused with an `UnsupportedSourceConfig` naming the field.

    model_type  transformers class   refuses
    jamba       JambaConfig          hidden_act other than silu
    mamba       MambaConfig          hidden_act other than silu
    mixtral     MixtralConfig        1 expert, partial/dynamic RoPE
    llama       LlamaConfig          partial/dynamic RoPE
    hybrid_lm   HybridLMConfig       (its own validation)
"""

import warnings

import transformers

from .configuration_hybrid_lm import HybridLMConfig


class UnsupportedSourceConfig(ValueError):
    """A source config.json that hybrid_lm cannot express exactly; the message says which field and why."""


class DroppedSettingWarning(UserWarning):
    """A source setting that does not change inference but that hybrid_lm has no field for."""


def normalised(config_class: type, source: dict) -> dict:
    """`source` completed by transformers' own config class: defaults for absent fields, legacy RoPE keys
    (`rope_theta`, `rope_scaling`) folded into `rope_parameters`, `head_dim` resolved."""
    try:
        return config_class.from_dict(dict(source)).to_dict()
    except (TypeError, ValueError) as error:
        raise UnsupportedSourceConfig(f"config.json is not a valid {config_class.__name__}: {error}") from error


def picked(source: dict, names: tuple[str, ...]) -> dict:
    """The fields `names` of `source` that it has."""
    return {name: source[name] for name in names if name in source}


def _require_silu(source: dict, family: str) -> None:
    if source.get("hidden_act", "silu") != "silu":
        raise UnsupportedSourceConfig(
            f"hidden_act is {source['hidden_act']!r}: {family} applies it in the Mamba conv, hybrid_lm always uses "
            "silu there; only hidden_act='silu' converts exactly"
        )


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_fields(source: dict) -> dict:
    """use_rope + rope_parameters for hybrid_lm; refuses RoPE variants hybrid_lm would compute differently."""
    rope = dict(source.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedSourceConfig(
            f"rope_type {rope_type!r} is not supported (hybrid_lm computes {list(SUPPORTED_ROPE_TYPES)} exactly; "
            "'dynamic' and 'longrope' rescale with the sequence length at run time)"
        )
    partial = rope.get("partial_rotary_factor", source.get("partial_rotary_factor")) or 1.0
    if partial != 1.0:
        raise UnsupportedSourceConfig(
            f"partial_rotary_factor is {partial}: hybrid_lm rotates the whole head (partial RoPE is not supported)"
        )
    if "rope_theta" not in rope:
        raise UnsupportedSourceConfig("the RoPE settings have no rope_theta; add it to rope_parameters in config.json")
    return {"use_rope": True, "rope_parameters": rope}


_SKIPPED_FIELDS = {"model_type", "architectures", "transformers_version", "auto_map", "dtype", "torch_dtype",
                   "layers_block_type", "layers_num_experts"}


def _shared_fields(source: dict) -> dict:
    """Fields of the source config that HybridLMConfig has too, with the same name and meaning."""
    known = set(HybridLMConfig.__dataclass_fields__) - _SKIPPED_FIELDS
    return {k: v for k, v in source.items() if k in known}


def jamba_config(source: dict) -> HybridLMConfig:
    jamba = normalised(transformers.JambaConfig, source)
    _require_silu(jamba, "Jamba")
    return HybridLMConfig(**_shared_fields(jamba), mamba_inner_layernorms=True, use_rope=False, norm_topk_prob=False)


_PURE_MAMBA = dict(num_experts=1, num_experts_per_tok=1, intermediate_size=0, num_attention_heads=1,
                   num_key_value_heads=1, mamba_inner_layernorms=False)


def mamba_config(source: dict) -> HybridLMConfig:
    """All layers Mamba without feed-forward blocks or Jamba's inner norms. MambaConfig's residual_in_fp32 is
    dropped: it only changes low-precision runs (hybrid_lm keeps the residual in the model dtype)."""
    mamba = normalised(transformers.MambaConfig, source)
    _require_silu(mamba, "Mamba")
    layers = mamba["num_hidden_layers"]
    return HybridLMConfig(
        **_PURE_MAMBA,
        **picked(mamba, ("vocab_size", "hidden_size", "num_hidden_layers", "initializer_range", "use_cache",
                          "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")),
        layers_block_type=["mamba"] * layers,
        layers_num_experts=[0] * layers,
        rms_norm_eps=mamba["layer_norm_epsilon"],
        mamba_d_state=mamba["state_size"],
        mamba_d_conv=mamba["conv_kernel"],
        mamba_expand=mamba["expand"],
        mamba_dt_rank=mamba["time_step_rank"],
        mamba_conv_bias=mamba["use_conv_bias"],
        mamba_proj_bias=mamba["use_bias"],
        mamba_dt_min=mamba["time_step_min"],
        mamba_dt_max=mamba["time_step_max"],
        mamba_dt_init_floor=mamba["time_step_floor"],
    )


TRANSFORMER_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
                      "initializer_range", "attention_dropout", "use_cache", "tie_word_embeddings", "pad_token_id",
                      "bos_token_id", "eos_token_id")


def llama_config(source: dict) -> HybridLMConfig:
    """All layers attention + dense SwiGLU MLP, with the source's RoPE; Llama has no sliding window."""
    llama = normalised(transformers.LlamaConfig, source)
    layers = llama["num_hidden_layers"]
    return HybridLMConfig(
        **picked(llama, TRANSFORMER_FIELDS + ("attention_bias", "mlp_bias")),
        **_rope_fields(llama),
        layers_block_type=["attention"] * layers,
        layers_num_experts=[1] * layers,
        num_experts=1,
        num_experts_per_tok=1,
    )


def mixtral_config(source: dict) -> HybridLMConfig:
    """All layers attention + mixture of experts with renormalised top-K weights, the source's RoPE and sliding
    window. router_jitter_noise only acts in training: it is dropped with a warning."""
    mixtral = normalised(transformers.MixtralConfig, source)
    if mixtral["num_local_experts"] < 2:
        raise UnsupportedSourceConfig(
            f"num_local_experts is {mixtral['num_local_experts']}: hybrid_lm stores a one-expert layer as a dense "
            "MLP without router; convert it as a Llama-style model instead"
        )
    if mixtral.get("router_jitter_noise"):
        warnings.warn(
            f"router_jitter_noise ({mixtral['router_jitter_noise']}) is dropped: it only perturbs routing in training, "
            "and hybrid_lm has no such option",
            DroppedSettingWarning,
            stacklevel=2,
        )
    return HybridLMConfig(
        **picked(mixtral, TRANSFORMER_FIELDS + ("sliding_window", "num_experts_per_tok", "router_aux_loss_coef",
                                                 "output_router_logits")),
        **_rope_fields(mixtral),
        layers_block_type=["attention"] * mixtral["num_hidden_layers"],
        num_experts=mixtral["num_local_experts"],
        expert_layer_period=1,
        expert_layer_offset=0,
        norm_topk_prob=True,
    )


def hybrid_lm_config(source: dict) -> HybridLMConfig:
    try:
        return HybridLMConfig.from_dict(dict(source))
    except (TypeError, ValueError) as error:
        raise UnsupportedSourceConfig(f"config.json is not a valid HybridLMConfig: {error}") from error


# model_type -> mapping; conversion/sources.py adds the state-spaces mamba_ssm layout, which needs the weights
CONFIG_MAPPINGS = {
    "jamba": jamba_config,
    "mamba": mamba_config,
    "mixtral": mixtral_config,
    "llama": llama_config,
    "hybrid_lm": hybrid_lm_config,
}


def config_from_dict(source: dict) -> HybridLMConfig:
    """The HybridLMConfig for a config.json of any family in `CONFIG_MAPPINGS`, chosen by its `model_type`."""
    model_type = source.get("model_type")
    if model_type not in CONFIG_MAPPINGS:
        raise UnsupportedSourceConfig(
            f"model_type {model_type!r} is not one hybrid_lm reads; supported: {', '.join(CONFIG_MAPPINGS)}"
        )
    return CONFIG_MAPPINGS[model_type](source)


__all__ = ["CONFIG_MAPPINGS", "DroppedSettingWarning", "UnsupportedSourceConfig", "config_from_dict"]
