"""How much accelerator memory a hybrid_lm model needs for a prefill: weights, caches, states, activations.

`estimate_memory(config, context)` works from the config alone (nothing is loaded: the model is built on
the meta device, so parameter counts and dtypes are the model's own, exactly). `hybrid-lm memory CONFIG`
prints it. `load_source_config` reads a hybrid_lm folder or config.json, or the config.json of any family
the converter reads (Jamba, Mixtral, Llama, Mamba; see source_configs_hybrid_lm.py).

Legend: B = batch, L = tokens in one forward (the context, or the prefill chunk), S = context, H = hidden,
D = d_inner = expand * H, N = d_state, R = dt_rank, I = intermediate, E = experts, K = experts per token,
nh / nkv / hd = heads / key-value heads / head dim, V = vocab, b = bytes of the compute dtype (bf16: 2).

Weights (`weights_bytes`), per parameter, with the model's own dtypes (`model.to(bfloat16)` keeps A_log, D
and the dt bias in float32, 4 bytes; everything else 2 bytes). With `int8`, `nf4` or `fp4` the weight of
every layer bitsandbytes converts (an `nn.Linear` itself, its name matched by none of `QUANTIZATION_SKIP_MODULES`,
as transformers matches them) is replaced by bitsandbytes' layout; everything else (embeddings, lm_head, the
Mamba mixers whole, routers, norms, Linear biases) stays as in bf16; with `quantize_mamba` the Mamba mixers'
in_proj, x_proj and out_proj are quantized too (dt_proj, a subclass of nn.Linear, conv1d, A_log, D stay):
    int8 (LLM.int8, `bnb.nn.Int8Params`): int8 CB (out, in) + float32 SCB per output row
         = out * in + 4 * out bytes
    nf4 / fp4 (`bnb.nn.Params4bit`, `bnb.functional.quantize_4bit`, blocksize 64): two 4-bit codes per byte
         + a float32 absmax per block of 64 + the 16-entry float32 code
         = ceil(n / 2) + 4 * ceil(n / 64) + 64 bytes, n = out * in
    with double quantization (`bnb_4bit_use_double_quant=True`): the absmax is itself quantized to uint8 in
         blocks of 256, with a float32 absmax per 256 blocks, a float32 offset and a 256-entry float32 code
         = ceil(n / 2) + nb + 4 * ceil(nb / 256) + 4 + 1024 + 64 bytes, nb = ceil(n / 64)

KV cache (`kv_cache_bytes`), per attention layer: 2 (K and V) * B * nkv * hd * S' * b, S' = S, or with a
sliding window min(S, sliding_window - 1) (what transformers' sliding cache layer keeps).
A stack without attention layers keeps one-element keys and values per token in its first layer (how
transformers' caches count positions): 2 * B * S * b.

Mamba states (`mamba_state_bytes`), per Mamba layer: conv state B * D * (d_conv - 1) * b + SSM state
B * D * N * 4 (float32).

Peak prefill activations (`activation_bytes`): the largest live set of one inference forward (no grad, no
padding mask, `logits_to_keep=1` as generate() asks, the GPU kernels: SDPA / flash attention without an
L x L matrix, the Triton or CUDA scan) on B * L tokens, L = min(S, prefill_chunk). Layers run one after
another and free their intermediates, so it is the residual stream plus the largest single layer:
    residual stream: the residual and its normalised copy, 2 * H * b per token
    Mamba layer, during the scan: in_proj output (x and z) 2D, conv output D, dt D, the contiguous dt and
        z the scan takes 2D, scan output D, x_proj output R + 2N: (7D + R + 2N) * b per token, plus the
        scan's float32 chunk states B * (ceil(L / 256) + 1) * N * D * 4
    attention layer: q, the attention output and its contiguous copy (3 * nh * hd * b per token; K and V
        are the cache), plus GQA's repeated K and V (2 * nh * hd * b) when nkv < nh; at least the copy of the
        q, k, v weights its first inference forward packs into one tensor ((nh + 2 nkv) * hd * H * b,
        `packed_weights.py`)
    dense MLP: gate and up (one product) and the activation, multiplied in place: 3 * I * b per token; at
        least the copy of the gate and up weights its first inference forward packs, 2 * I * H * b
    MoE, router logits and softmax 2 * E * 4 and three int64 index vectors 3 * K * 8 per token, and
      - experts in bf16 (grouped products over all experts, `feed_forward_hybrid_lm.py`), the larger of
        the block's first inference forward packing the experts' gate and up weights into one tensor
        (`packed_weights.py`: the new copy 2 * E * I * H * b while the old weights are freed) and, over the
        S = B * L * K routed (token, slot) pairs at once, their copy H, the gate/up product 2I, the activation I
        and its product with up I: S * (H + 4I) * b
      - quantized experts (bitsandbytes layers, run one expert at a time): the routed copies of the tokens
        K * H * b and the output H * b per token, and one expert's gate/act, up, product and down on its share
        of the tokens, balanced routing: ceil(B * L * K / E) * (3I + H) * b
    final norm: float32 copy and normalised float32, 2 * H * 4 per token; logits B * logits_to_keep * V * b
  A chunked prefill (L < S) attends over the cache: transformers builds SDPA a boolean mask B * L * S' bytes
  (S' = the tokens kept, as for the KV cache) that lives through the whole forward; in an attention layer
  SDPA converts it to an additive mask in the query's dtype (B * L * S' * b more; torch's
  `convert_boolean_attn_mask`, for the memory-efficient and math kernels that take masks), and the cache's
  concatenation holds the layer's old and new K, V at once (one more layer's KV cache). The masks grow with
  L * S: chunks of 8K at 1M tokens cost 8 + 16 GiB of masks, chunks of 128K 128 + 256 GiB.

`total_bytes` is the sum of the four. Sizes are bytes; the CLI prints them in GiB (2**30 bytes) and GB (1e9).
What the estimate leaves out: the CUDA context and the kernels' code (outside torch's allocator, ~0.5 GiB
that `torch.cuda.max_memory_allocated` does not see either), allocator rounding and fragmentation.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from .configuration_hybrid_lm import HybridLMConfig
from .hub_hybrid_lm import parameter_counts
from .modeling_hybrid_lm import HybridLMForCausalLM
from .source_configs_hybrid_lm import UnsupportedSourceConfig, config_from_dict

WEIGHT_FORMATS = ("bf16", "int8", "nf4", "fp4")
# Modules bitsandbytes leaves in high precision, as the model declares them (the default `llm_int8_skip_modules` of
# `from_pretrained`): the Mamba mixers whole and the output heads.
QUANTIZATION_SKIP_MODULES = HybridLMForCausalLM._quantization_skip_modules
COMPUTE_BYTES = 2  # bf16
BNB_4BIT_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
SCAN_CHUNK = 256  # tokens per float32 state the Triton scan keeps (max_chunk of mamba_scan_triton.scan_tiles)

JSON_KEYS = ("total_params", "active_params", "weights_bytes", "kv_cache_bytes", "mamba_state_bytes",
             "activation_bytes", "total_bytes")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes and parameter counts for one (config, context, batch, weight format); see the module docstring."""

    total_params: int
    active_params: int
    weights_bytes: int
    kv_cache_bytes: int
    mamba_state_bytes: int
    activation_bytes: int
    total_bytes: int
    context: int
    batch: int
    weights: str
    prefill_chunk: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def meta_model(config: HybridLMConfig) -> HybridLMForCausalLM:
    """The model on the meta device in bfloat16 (A_log, D and the dt bias stay float32, as the model keeps them)."""
    with torch.device("meta"):
        model = HybridLMForCausalLM(config)
    return model.to(torch.bfloat16)


def quantization_skip_modules(quantize_mamba: bool = False) -> list[str]:
    """`llm_int8_skip_modules` for bitsandbytes: QUANTIZATION_SKIP_MODULES, or only the heads with `quantize_mamba`
    (the Mamba mixers' projections quantized too; conv1d, A_log, D and the dt bias are no Linear and stay)."""
    mamba = HybridLMForCausalLM._quantization_skip_mamba
    return [name for name in QUANTIZATION_SKIP_MODULES if not (quantize_mamba and name == mamba)]


def quantized_linear_names(model: nn.Module, quantize_mamba: bool = False) -> set[str]:
    """Names of the layers bitsandbytes replaces, by transformers' rule (`replace_with_bnb_linear`): each
    nn.Linear itself (not a subclass) whose name no entry of `quantization_skip_modules` matches."""
    skipped = quantization_skip_modules(quantize_mamba)
    return {
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skipped)
    }


def quantized_weight_bytes(out_features: int, in_features: int, weights: str, double_quant: bool = False) -> int:
    """Bytes of one Linear weight in bitsandbytes' layout (see the module docstring for the formulas)."""
    n = out_features * in_features
    if weights == "bf16":
        return n * COMPUTE_BYTES
    if weights == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / BNB_4BIT_BLOCKSIZE)
    code = 16 * 4
    if not double_quant:
        return math.ceil(n / 2) + 4 * blocks + code
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + 4 + 256 * 4 + code


def weights_bytes(model: nn.Module, weights: str = "bf16", double_quant: bool = False,
                  quantize_mamba: bool = False) -> int:
    """Bytes of `model`'s parameters (a meta model from `meta_model`) once loaded with `weights`."""
    _check_weights(weights)
    quantized = quantized_linear_names(model, quantize_mamba) if weights != "bf16" else set()
    total = 0
    for name, param in model.named_parameters():  # tied parameters once
        module_name, _, param_name = name.rpartition(".")
        if module_name in quantized and param_name == "weight":
            total += quantized_weight_bytes(*param.shape, weights, double_quant)
        else:
            total += param.numel() * param.element_size()
    return total


def kept_tokens(config: HybridLMConfig, context: int) -> int:
    """Tokens an attention layer's cache holds after `context` tokens: a sliding window keeps the last
    `sliding_window - 1` (the next query sees those and itself)."""
    return context if config.sliding_window is None else min(context, config.sliding_window - 1)


def kv_cache_bytes(config: HybridLMConfig, context: int, batch: int = 1) -> int:
    kinds = config.layers_block_type
    if "attention" not in kinds:
        return 2 * batch * context * COMPUTE_BYTES  # the position-counting keys of the first layer
    kept = kept_tokens(config, context)
    per_layer = 2 * batch * config.num_key_value_heads * config.head_dim * kept * COMPUTE_BYTES
    return kinds.count("attention") * per_layer


def mamba_state_bytes(config: HybridLMConfig, batch: int = 1) -> int:
    d_inner = config.mamba_d_inner
    per_layer = batch * d_inner * (config.mamba_d_conv - 1) * COMPUTE_BYTES + batch * d_inner * config.mamba_d_state * 4
    return config.layers_block_type.count("mamba") * per_layer


def activation_bytes(config: HybridLMConfig, context: int, batch: int = 1, prefill_chunk: int | None = None,
                     logits_to_keep: int = 1, grouped_experts: bool = True) -> int:
    """Peak live intermediates of one prefill forward of `batch` x `context` tokens (module docstring);
    `grouped_experts`: the experts run as grouped products (bf16 weights), else one at a time (quantized)."""
    b = COMPUTE_BYTES
    length = min(context, prefill_chunk) if prefill_chunk else context
    tokens = batch * length
    H, D, N, R = config.hidden_size, config.mamba_d_inner, config.mamba_d_state, config.mamba_dt_rank
    I = config.intermediate_size
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    residual = tokens * 2 * H * b
    chunked = "attention" in config.layers_block_type and length < context
    kept = kept_tokens(config, context)
    if chunked:  # SDPA's boolean mask (B, 1, L, S'), built once per forward and alive through every layer
        residual += batch * length * kept
    layers = [tokens * 2 * H * 4 + batch * min(logits_to_keep or length, length) * config.vocab_size * b]  # final
    kinds = config.layers_block_type
    if "mamba" in kinds:
        states = batch * (math.ceil(length / SCAN_CHUNK) + 1) * N * D * 4
        layers.append(tokens * (7 * D + R + 2 * N) * b + states)
    if "attention" in kinds:
        per_token = 3 * nh * hd * b + (2 * nh * hd * b if nkv < nh else 0)
        # torch.cat holds the old and the new K, V; SDPA turns the boolean mask into an additive one in q's dtype
        growing = 2 * batch * nkv * hd * kept * b + batch * length * kept * b if chunked else 0
        layers.append(max(tokens * per_token + growing, (nh + 2 * nkv) * hd * H * b))
    feed_forward = {config.feed_forward_type(i) for i in range(config.num_hidden_layers)}
    if "mlp" in feed_forward:
        layers.append(max(tokens * 3 * I * b, 2 * I * H * b))
    if "moe" in feed_forward:
        layers.append(moe_activation_bytes(config, tokens, grouped_experts))
    return residual + max(layers)


def moe_activation_bytes(config: HybridLMConfig, tokens: int, grouped_experts: bool = True) -> int:
    """Peak live intermediates of one MoE block's inference forward on `tokens` tokens (module docstring)."""
    b, H, I = COMPUTE_BYTES, config.hidden_size, config.intermediate_size
    E, K = config.num_experts, config.num_experts_per_tok
    routing = tokens * (2 * E * 4 + 3 * K * 8)
    if grouped_experts:
        return routing + max(2 * E * I * H * b, tokens * K * (H + 4 * I) * b)
    return routing + tokens * (K + 1) * H * b + math.ceil(tokens * K / E) * (3 * I + H) * b


def estimate_memory(config: HybridLMConfig, context: int, batch: int = 1, weights: str = "bf16",
                    prefill_chunk: int | None = None, double_quant: bool = False,
                    quantize_mamba: bool = False) -> MemoryEstimate:
    """Parameters and bytes to load `config` with `weights` and prefill `batch` x `context` tokens (in chunks of
    `prefill_chunk` tokens if given). `double_quant`: bnb_4bit_use_double_quant; `quantize_mamba`: the Mamba
    mixers' Linear layers quantized too (by default they stay bf16). Nothing is allocated: the model is built on
    the meta device."""
    for name, value in (("context", context), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive number of tokens / sequences")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk ({prefill_chunk!r}) must be a positive number of tokens, or None")
    _check_weights(weights)
    model = meta_model(config)
    total, active = parameter_counts(model)
    parts = dict(
        weights_bytes=weights_bytes(model, weights, double_quant, quantize_mamba),
        kv_cache_bytes=kv_cache_bytes(config, context, batch),
        mamba_state_bytes=mamba_state_bytes(config, batch),
        activation_bytes=activation_bytes(config, context, batch, prefill_chunk, grouped_experts=weights == "bf16"),
    )
    return MemoryEstimate(total_params=total, active_params=active, **parts, total_bytes=sum(parts.values()),
                          context=context, batch=batch, weights=weights, prefill_chunk=prefill_chunk)


def load_source_config(path) -> HybridLMConfig:
    """A HybridLMConfig from a folder holding config.json, or a config.json file: hybrid_lm's, or any family
    the converter reads (chosen by `model_type`). Raises ValueError (or OSError) with the path and the fix."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise ValueError(f"{path} does not exist; give a model folder or its config.json")
    if not file.is_file():
        raise ValueError(f"{path} has no config.json; give a model folder or its config.json")
    try:
        source = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not a JSON config ({error})") from None
    if not isinstance(source, dict):
        raise ValueError(f"{file} must hold a JSON object, found {type(source).__name__}")
    try:
        return config_from_dict(source)
    except UnsupportedSourceConfig as error:
        raise ValueError(f"{file}: {error}") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file} cannot be expressed as a HybridLMConfig: {error}") from None


def format_estimate(estimate: MemoryEstimate, config: HybridLMConfig) -> str:
    """The human-readable report `hybrid-lm memory` prints."""

    def size(n: int) -> str:
        return f"{n / 2**30:10.2f} GiB {n / 1e9:10.2f} GB"

    chunk = f", prefill in chunks of {estimate.prefill_chunk}" if estimate.prefill_chunk else ""
    lines = [
        config.layer_plan().splitlines()[0],
        f"parameters: {estimate.total_params:,} total ({estimate.total_params / 1e9:.2f}B), "
        f"{estimate.active_params:,} active per token ({estimate.active_params / 1e9:.2f}B)",
        f"context {estimate.context:,} tokens, batch {estimate.batch}, {estimate.weights} weights{chunk}",
        f"  weights            {size(estimate.weights_bytes)}",
        f"  KV cache           {size(estimate.kv_cache_bytes)}",
        f"  Mamba conv + SSM   {size(estimate.mamba_state_bytes)}",
        f"  prefill activations{size(estimate.activation_bytes)}",
        f"  total              {size(estimate.total_bytes)}",
    ]
    return "\n".join(lines)


def _check_weights(weights: str) -> None:
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights ({weights!r}) must be one of {list(WEIGHT_FORMATS)}")


__all__ = ["JSON_KEYS", "MemoryEstimate", "QUANTIZATION_SKIP_MODULES", "WEIGHT_FORMATS", "estimate_memory",
           "load_source_config", "quantization_skip_modules"]
