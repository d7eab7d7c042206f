"""The checkpoint families convert.py reads: one `SourceFormat` entry each (targets.py has what it writes).

A source format says how to recognise its config.json, how that config maps onto `HybridLMConfig` (refusing
what hybrid_lm cannot compute the same way), how its tensor names map onto hybrid_lm's (a declarative
`KeyMap` with `{layer}` / `{expert}` / `{name}` placeholders), and which transformers model is the oracle
for verification.

    source    config.json                    oracle                       refuses
    jamba     JambaConfig                    JambaForCausalLM             hidden_act other than silu
    mamba     MambaConfig                    MambaForCausalLM             hidden_act other than silu
    mamba_ssm state-spaces d_model/n_layer   MambaForCausalLM, same       LayerNorm, Mamba-2, attention layers,
                                             weights                      GatedMLP blocks
    mixtral   MixtralConfig                  MixtralForCausalLM           1 expert, partial/dynamic RoPE
    llama     LlamaConfig                    LlamaForCausalLM             partial/dynamic RoPE
    hybrid_lm HybridLMConfig (--to jamba)    HybridLMForCausalLM          (see targets.jamba_export_config)
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from checkpoint_io import ConversionError, PickleWeights, SafetensorsWeights
from hybrid_lm import HybridLMConfig, HybridLMForCausalLM
from hybrid_lm import source_configs_hybrid_lm as source_configs
from hybrid_lm.source_configs_hybrid_lm import picked  # noqa: F401 (targets.py takes it from here)

Weights = SafetensorsWeights | PickleWeights
TensorPairs = Iterator[tuple[str, torch.Tensor]]


# ----------------------------------------------------------------------------- key maps


class KeyMap:
    """Renames source tensors by rules `{source pattern: target}`, first match wins.

    Patterns are literal key names with placeholders: `{layer}` and `{expert}` match a number, `{name}` any
    dotted remainder; a string target reuses the placeholders. A target of None drops the tensor (buffers
    older checkpoints saved); a callable target gets the placeholder values and the tensor and yields
    (key, tensor) pairs (splitting merged expert tensors).
    """

    PLACEHOLDERS = {"layer": r"(?P<layer>\d+)", "expert": r"(?P<expert>\d+)", "name": r"(?P<name>.+)"}

    def __init__(self, rules: dict[str, str | Callable[[dict, torch.Tensor], TensorPairs] | None]):
        self.rules = [(self._compile(pattern), target) for pattern, target in rules.items()]

    @classmethod
    def _compile(cls, pattern: str) -> re.Pattern:
        parts = re.split(r"\{(\w+)\}", pattern)  # literal, placeholder, literal, ...
        regex = "".join(cls.PLACEHOLDERS[part] if i % 2 else re.escape(part) for i, part in enumerate(parts))
        return re.compile(regex)

    def __call__(self, key: str, tensor: torch.Tensor) -> TensorPairs | None:
        """The renamed (key, tensor) pairs, or None when no rule knows `key`."""
        for pattern, target in self.rules:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if target is None:
                return iter(())
            if callable(target):
                return target(match.groupdict(), tensor)
            return iter([(target.format(**match.groupdict()), tensor)])
        return None


def split_gate_up(target_prefix: str) -> Callable[[dict, torch.Tensor], TensorPairs]:
    """Target for a merged (E, 2I, H) `gate_up_proj`: per expert, rows [0, I) are the gate, [I, 2I) the up
    projection (transformers' merged expert layout for Mixtral and Jamba)."""

    def split(groups: dict, tensor: torch.Tensor) -> TensorPairs:
        prefix = target_prefix.format(**groups)
        for expert, weight in enumerate(tensor):
            gate, up = weight.chunk(2, dim=0)
            yield f"{prefix}.{expert}.gate_proj.weight", gate
            yield f"{prefix}.{expert}.up_proj.weight", up

    return split


def split_down(target_prefix: str) -> Callable[[dict, torch.Tensor], TensorPairs]:
    """Target for a merged (E, H, I) `down_proj`: one (H, I) weight per expert."""

    def split(groups: dict, tensor: torch.Tensor) -> TensorPairs:
        prefix = target_prefix.format(**groups)
        for expert, weight in enumerate(tensor):
            yield f"{prefix}.{expert}.down_proj.weight", weight

    return split


EXPERTS = "model.layers.{layer}.feed_forward.experts"

# hybrid_lm's own names; Jamba's on-disk names are the same, its in-memory layout merges the experts
HYBRID_LM_KEYS = KeyMap({"{name}": "{name}"})
JAMBA_KEYS = KeyMap({
    f"{EXPERTS}.gate_up_proj": split_gate_up(EXPERTS),
    f"{EXPERTS}.down_proj": split_down(EXPERTS),
    "{name}": "{name}",
})

_MAMBA_BLOCKS = {
    "backbone.layers.{layer}.norm.weight": "model.layers.{layer}.input_layernorm.weight",
    "backbone.layers.{layer}.mixer.{name}": "model.layers.{layer}.mamba.{name}",
    "backbone.norm_f.weight": "model.final_layernorm.weight",
    "lm_head.weight": "lm_head.weight",
}
MAMBA_KEYS = KeyMap({"backbone.embeddings.weight": "model.embed_tokens.weight", **_MAMBA_BLOCKS})
MAMBA_SSM_EMBEDDING = "backbone.embedding.weight"
MAMBA_SSM_KEYS = KeyMap({MAMBA_SSM_EMBEDDING: "model.embed_tokens.weight", **_MAMBA_BLOCKS})

_TRANSFORMER_BLOCKS = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.layers.{layer}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{layer}.self_attn.{name}": "model.layers.{layer}.self_attn.{name}",
    "model.layers.{layer}.input_layernorm.weight": "model.layers.{layer}.input_layernorm.weight",
    "model.layers.{layer}.post_attention_layernorm.weight": "model.layers.{layer}.pre_ff_layernorm.weight",
    "model.norm.weight": "model.final_layernorm.weight",
    "lm_head.weight": "lm_head.weight",
}
LLAMA_KEYS = KeyMap({
    **_TRANSFORMER_BLOCKS,
    "model.layers.{layer}.mlp.{name}": "model.layers.{layer}.feed_forward.{name}",
})
MIXTRAL_KEYS = KeyMap({
    **_TRANSFORMER_BLOCKS,
    # on disk (transformers 4 and 5): one tensor per expert, w1 = gate, w3 = up, w2 = down
    "model.layers.{layer}.block_sparse_moe.gate.weight": "model.layers.{layer}.feed_forward.router.weight",
    "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight": EXPERTS + ".{expert}.gate_proj.weight",
    "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight": EXPERTS + ".{expert}.up_proj.weight",
    "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight": EXPERTS + ".{expert}.down_proj.weight",
    # in memory (transformers 5 state_dict): merged experts
    "model.layers.{layer}.mlp.gate.weight": "model.layers.{layer}.feed_forward.router.weight",
    "model.layers.{layer}.mlp.experts.gate_up_proj": split_gate_up(EXPERTS),
    "model.layers.{layer}.mlp.experts.down_proj": split_down(EXPERTS),
})


# ----------------------------------------------------------------------------- configs
# The config.json mappings are pure and live in the package (hybrid_lm/source_configs_hybrid_lm.py), where
# `hybrid-lm memory` reads them too; here they take the weights (which only mamba_ssm needs) and raise
# ConversionError.


def _converting(mapping: Callable[[dict], HybridLMConfig]) -> Callable[[dict, Weights], HybridLMConfig]:
    def build_config(source: dict, weights: Weights) -> HybridLMConfig:
        try:
            return mapping(source)
        except source_configs.UnsupportedSourceConfig as error:
            raise ConversionError(str(error)) from error

    build_config.__name__ = build_config.__qualname__ = mapping.__name__
    build_config.__doc__ = mapping.__doc__
    return build_config


jamba_config = _converting(source_configs.jamba_config)
mamba_config = _converting(source_configs.mamba_config)
llama_config = _converting(source_configs.llama_config)
mixtral_config = _converting(source_configs.mixtral_config)
hybrid_lm_config = _converting(source_configs.hybrid_lm_config)


def mamba_ssm_as_mamba(source: dict, weights: Weights) -> dict:
    """A transformers MambaConfig dict for a state-spaces `MambaLMHeadModel` config.json.

    The vocabulary is the embedding's row count (the checkpoint pads `vocab_size` up to a multiple of
    `pad_vocab_size_multiple`); the norm epsilon is mamba_ssm's fixed 1e-5. Refuses what neither hybrid_lm
    nor the transformers oracle expresses: LayerNorm, Mamba-2 layers, attention layers, and the GatedMLP
    blocks of `d_intermediate > 0` (left unmapped: transformers' Mamba, the verification oracle, has none).
    """
    for name in ("d_model", "n_layer", "vocab_size"):
        if not isinstance(source.get(name), int):
            raise ConversionError(f"config.json has no integer {name!r}; is SRC a state-spaces mamba_ssm folder?")
    ssm = source.get("ssm_cfg") or {}
    if not source.get("rms_norm", True):
        raise ConversionError("rms_norm is false: this Mamba uses LayerNorm, hybrid_lm has RMSNorm only")
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ConversionError(
            f"ssm_cfg.layer is {ssm['layer']!r}: hybrid_lm implements Mamba-1 layers only (Mamba-2 is not supported)"
        )
    if source.get("attn_layer_idx"):
        raise ConversionError(
            f"attn_layer_idx is {source['attn_layer_idx']}: mamba_ssm's attention layers (fused Wqkv, own rotary "
            "settings) are not mapped; only pure Mamba checkpoints convert"
        )
    if (source.get("d_intermediate") or 0) > 0:
        raise ConversionError(
            f"d_intermediate is {source['d_intermediate']}: mamba_ssm's GatedMLP blocks are not mapped (transformers' "
            "Mamba, the verification oracle, has no MLP); only d_intermediate = 0 converts"
        )
    embedding = weights.shape(MAMBA_SSM_EMBEDDING)
    if embedding is None:
        raise ConversionError(f"the weights have no {MAMBA_SSM_EMBEDDING!r}; is SRC a state-spaces mamba_ssm folder?")
    if embedding[0] < source["vocab_size"]:
        raise ConversionError(
            f"{MAMBA_SSM_EMBEDDING} has {embedding[0]} rows but vocab_size is {source['vocab_size']}; "
            "the weights and the config disagree"
        )
    return dict(
        model_type="mamba",
        vocab_size=embedding[0],
        hidden_size=source["d_model"],
        num_hidden_layers=source["n_layer"],
        state_size=ssm.get("d_state", 16),
        conv_kernel=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        time_step_rank=ssm.get("dt_rank", "auto"),
        use_bias=ssm.get("bias", False),
        use_conv_bias=ssm.get("conv_bias", True),
        time_step_min=ssm.get("dt_min", 0.001),
        time_step_max=ssm.get("dt_max", 0.1),
        time_step_floor=ssm.get("dt_init_floor", 1e-4),
        layer_norm_epsilon=1e-5,
        residual_in_fp32=source.get("residual_in_fp32", True),
        tie_word_embeddings=source.get("tie_embeddings", True),
    )


def mamba_ssm_config(source: dict, weights: Weights) -> HybridLMConfig:
    return mamba_config(mamba_ssm_as_mamba(source, weights), weights)


# ----------------------------------------------------------------------------- oracles


def from_pretrained_loader(class_name: str) -> Callable[..., torch.nn.Module]:
    """A loader for verification: `class_name` (transformers', or HybridLMForCausalLM) in float32."""

    def load(folder: Path, source: dict | None = None) -> torch.nn.Module:
        model_class = HybridLMForCausalLM if class_name == "HybridLMForCausalLM" else getattr(transformers, class_name)
        return model_class.from_pretrained(folder, dtype=torch.float32)

    return load


def load_mamba_ssm_as_mamba(folder: Path, source: dict) -> torch.nn.Module:
    """transformers' MambaForCausalLM with the mamba_ssm weights (`backbone.embedding` renamed `embeddings`)."""
    weights = open_weights(folder, reads_pickle=True)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**mamba_ssm_as_mamba(source, weights)))
    state = {key.replace(MAMBA_SSM_EMBEDDING, "backbone.embeddings.weight"): tensor for key, tensor in weights}
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["backbone.embeddings.weight"]
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------- the source table


def _has_model_type(*model_types: str) -> Callable[[dict], bool]:
    return lambda source: source.get("model_type") in model_types


def _is_mamba_ssm(source: dict) -> bool:
    return "model_type" not in source and {"d_model", "n_layer", "vocab_size"} <= set(source)


@dataclass(frozen=True)
class SourceFormat:
    """How one checkpoint family maps onto HybridLMConfig and hybrid_lm tensor names."""

    name: str
    recognises: Callable[[dict], bool]  # config.json -> is it this family?
    build_config: Callable[[dict, Weights], HybridLMConfig]
    keys: KeyMap
    reference: Callable[[Path, dict], torch.nn.Module]  # SRC folder, its config.json -> float32 oracle
    reads_pickle: bool = False  # pytorch_model.bin (mamba_ssm only); everything else is safetensors


SOURCES = {
    fmt.name: fmt
    for fmt in (
        SourceFormat("jamba", _has_model_type("jamba"), jamba_config, JAMBA_KEYS,
                     from_pretrained_loader("JambaForCausalLM")),
        SourceFormat("mamba", _has_model_type("mamba"), mamba_config, MAMBA_KEYS,
                     from_pretrained_loader("MambaForCausalLM")),
        SourceFormat("mamba_ssm", _is_mamba_ssm, mamba_ssm_config, MAMBA_SSM_KEYS, load_mamba_ssm_as_mamba,
                     reads_pickle=True),
        SourceFormat("mixtral", _has_model_type("mixtral"), mixtral_config, MIXTRAL_KEYS,
                     from_pretrained_loader("MixtralForCausalLM")),
        SourceFormat("llama", _has_model_type("llama"), llama_config, LLAMA_KEYS,
                     from_pretrained_loader("LlamaForCausalLM")),
        SourceFormat("hybrid_lm", _has_model_type("hybrid_lm"), hybrid_lm_config, HYBRID_LM_KEYS,
                     from_pretrained_loader("HybridLMForCausalLM")),
    )
}


def detect_source(source: dict) -> str:
    for name, fmt in SOURCES.items():
        if fmt.recognises(source):
            return name
    raise ConversionError(
        f"unsupported model_type {source.get('model_type')!r} in config.json; supported: jamba, mamba, mixtral, "
        "llama, hybrid_lm, and the state-spaces mamba_ssm layout (d_model, n_layer); or pass --from"
    )


def open_weights(folder: Path, reads_pickle: bool) -> Weights:
    """The source tensors: safetensors, or (`reads_pickle`, mamba_ssm only) pytorch_model.bin when there is no
    safetensors file."""
    has_safetensors = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    if not reads_pickle or has_safetensors:
        return SafetensorsWeights(folder)
    if not (folder / "pytorch_model.bin").exists():
        raise ConversionError(f"no weights in {folder} (expected pytorch_model.bin or model.safetensors)")
    return PickleWeights(folder / "pytorch_model.bin")
