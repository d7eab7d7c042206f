"""HybridLM configuration: one config for Jamba-style hybrids, pure Transformers and pure Mamba models."""

import dataclasses
import difflib
import math
import os

from transformers import GenerationConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .loading_checks import local_folder, read_json_file
from .tensor_parallel_hybrid_lm import CHANNEL_SHARD

LAYER_TYPES = ("attention", "mamba")
# Written into every saved config.json, so trust_remote_code finds each Auto class in the copied code.
AUTO_MAP = {
    "AutoConfig": "configuration_hybrid_lm.HybridLMConfig",
    "AutoModel": "modeling_hybrid_lm.HybridLMModel",
    "AutoModelForCausalLM": "modeling_hybrid_lm.HybridLMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_hybrid_lm.HybridLMForSequenceClassification",
}
KERNEL_BACKENDS = ("auto", "torch", "triton", "cuda")  # the tiers of mamba_kernels.py, and "auto"
# Keys that are not fields but that PreTrainedConfig.__post_init__ consumes, from_pretrained passes, or
# save_pretrained writes (transformers 5.17 to 5.24); generation parameters are added from GenerationConfig.
PRETRAINED_CONFIG_KEYS = frozenset({
    "model_type", "transformers_version", "auto_map", "name_or_path", "_name_or_path", "_commit_hash", "torch_dtype",
    "num_labels", "output_attentions", "attn_implementation", "experts_implementation", "per_layer_config",
    "_attn_implementation_internal", "_experts_implementation_internal", "rope_scaling", "rope_theta",
    "partial_rotary_factor", "quantization_config", "tokenizer_class",
})


class HybridLMConfig(PreTrainedConfig):
    r"""
    Configuration of a [`HybridLMModel`]: a stack of `num_hidden_layers` layers, each a token mixer
    (attention or Mamba) followed by a feed-forward block (dense SwiGLU MLP, mixture of experts, or
    none). Field names follow transformers' `JambaConfig` wherever the meaning is the same, so a
    Jamba `config.json` maps field by field.

    Layer plan (l, a:m, e, n, K):
        attn_layer_period / attn_layer_offset (`int`, defaults to 8 / 4):
            Layer `i` is attention iff `i % attn_layer_period == attn_layer_offset`, Mamba otherwise.
        layers_block_type (`list[str]`, *optional*):
            Explicit mixer per layer (`"attention"` / `"mamba"`); wins over period/offset when given.
            After construction it always holds the resolved plan.
        expert_layer_period / expert_layer_offset (`int`, defaults to 2 / 1):
            Layer `i` has a mixture of experts iff `i % expert_layer_period == expert_layer_offset`.
        num_experts (`int`, defaults to 8) / num_experts_per_tok (`int`, defaults to 2):
            Experts per MoE layer (n) and experts each token is routed to (K).
        layers_num_experts (`list[int]`, *optional*):
            Explicit feed-forward per layer: `0` no feed-forward block (Mamba checkpoints), `1` a dense
            MLP, `num_experts` a mixture of experts. Wins over the expert period/offset when given.

    Attention:
        num_attention_heads (`int`), num_key_value_heads (`int`, GQA; defaults to the number of heads),
        head_dim (`int`, defaults to `hidden_size // num_attention_heads`), attention_bias (`bool`),
        attention_dropout (`float`), sliding_window (`int`, *optional*: each token sees itself and the
        `sliding_window - 1` tokens before it), use_rope (`bool`, default `False`, as in Jamba) with
        `rope_parameters` (transformers' RoPE dict, e.g. `{"rope_type": "default", "rope_theta": 1e4}`).

    Mamba:
        mamba_d_state (N), mamba_d_conv (conv width), mamba_expand (d_inner = expand * hidden_size),
        mamba_dt_rank (`"auto"` = ceil(hidden_size / 16)), mamba_conv_bias, mamba_proj_bias,
        mamba_inner_layernorms (Jamba's RMSNorms on dt, B and C), mamba_dt_min / mamba_dt_max /
        mamba_dt_init_floor (initial step sizes).

    Router:
        router_aux_loss_coef (Switch load-balancing loss weight), router_z_loss_coef (ST-MoE z-loss
        weight), norm_topk_prob (renormalise the top-K weights: Mixtral yes, Jamba no),
        output_router_logits.

    Kernels:
        kernel_backend (`"auto"`, `"torch"`, `"triton"` or `"cuda"`): which kernel tier runs the Mamba ops
        (mamba_kernels.py). `"auto"` picks the fastest one present that passes a self-check. Each mixer binds
        its tier at its first forward on a device; on a built model change it with `model.set_kernel_backend`.
        fused_loss: in training mode, with labels, compute lm_head and the cross-entropy a chunk of tokens at a
        time from the hidden states (`cross_entropy_ops.py`), never holding the full float32 logits; the output's
        `logits` is then None. False returns the logits in training too (at their memory cost).

    Every inconsistent value raises a `ValueError` naming the field, the value and the rule.
    """

    model_type = "hybrid_lm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache output, by its name up to / from 5.24
    attribute_map = {"num_local_experts": "num_experts"}
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun), in transformers' style names; it
    # needs num_key_value_heads, intermediate_size and mamba_d_inner divisible by the number of ranks.
    # - Attention and dense MLP as in Llama: q/k/v and gate/up column-wise, o and down row-wise (one all-reduce each).
    # - Mamba, sharded by channel of d_inner: in_proj's output is [x, z] concatenated, so it is `packed_colwise` (each
    #   rank gets its slice of x and the matching slice of z; a plain column-wise split would give rank 0 all of x).
    #   The per-channel conv1d, dt_proj (weight and bias), A_log and D are sharded alike; the mixer reads the tensors
    #   it uses outside their modules' forwards as this rank's shards (`_local`, `_module_tensors`). x_proj reads every
    #   channel and outputs dt/B/C, so it is row-wise (an all-reduce gives every rank the full dt, B and C); out_proj
    #   is row-wise. conv1d's weight is (d_inner, 1, d_conv), which column-wise would shard on dim 1: its style is
    #   hybrid_lm's own (tensor_parallel_hybrid_lm.py), which shards dim 0. The conv and SSM states in the
    #   cache hold each rank's channels.
    # - Experts stay replicated: they are per-expert nn.Linear modules that run as one grouped product on weights
    #   stacked outside the modules' forwards (feed_forward_hybrid_lm.py), which the per-module column/row-wise hooks
    #   would not reach. The router and norms are replicated; lm_head is column-wise with its output gathered
    #   (HybridLMForCausalLM's `_tp_plan`), the embeddings vocabulary-sharded where transformers adds that.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.feed_forward.gate_proj": "colwise",
        "layers.*.feed_forward.up_proj": "colwise",
        "layers.*.feed_forward.down_proj": "rowwise",
        "layers.*.mamba.in_proj": "packed_colwise",
        "layers.*.mamba.conv1d.weight": CHANNEL_SHARD,
        "layers.*.mamba.conv1d.bias": "colwise",
        "layers.*.mamba.x_proj": "rowwise",
        "layers.*.mamba.dt_proj": "colwise",
        "layers.*.mamba.A_log": "colwise",
        "layers.*.mamba.D": "colwise",
        "layers.*.mamba.out_proj": "rowwise",
    }

    vocab_size: int = 65536
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 8
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    max_position_embeddings: int = 262144

    # layer plan
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    layers_block_type: list[str] | None = None
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    num_experts: int = 8
    num_experts_per_tok: int = 2
    layers_num_experts: list[int] | None = None

    # attention
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    use_rope: bool = False
    rope_parameters: dict | None = None

    # feed-forward
    mlp_bias: bool = False

    # mamba
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_inner_layernorms: bool = True
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4

    # router
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    norm_topk_prob: bool = False
    output_router_logits: bool = False

    kernel_backend: str = "auto"
    fused_loss: bool = True

    def __post_init__(self, **kwargs):
        self._check_known_keys(kwargs)
        self._check_types()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            _require_positive_int("hidden_size", self.hidden_size)
            _require_positive_int("num_attention_heads", self.num_attention_heads)
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}); change one of them or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        self._validate_sizes()
        self.layers_block_type = self._resolve_block_types()
        self.layers_num_experts = self._resolve_num_experts()
        super().__post_init__(**kwargs)
        if self.mamba_proj_bias:
            # packed_colwise shards a 1-D bias in one piece (rank 0 would get x's bias, rank 1 z's): a mixer with an
            # in_proj bias stays replicated. (Instance plans are not written to config.json.)
            self.base_model_tp_plan = {
                name: style for name, style in self.base_model_tp_plan.items() if ".mamba" not in name
            }
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        self._validate_options()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """transformers' reader, with the path and the file checked first (see `loading_checks`), and a
        config.json of another model type (or of none) refused instead of read as a hybrid_lm one."""
        folder = local_folder(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        if folder is not None and os.path.isfile(os.path.join(folder, "config.json")):
            read_json_file(os.path.join(folder, "config.json"))
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is None:
            raise ValueError(
                f"the config.json of {pretrained_model_name_or_path} has no model_type; a hybrid_lm config says "
                f'"model_type": "{cls.model_type}" (add it if this is one), other checkpoints convert with '
                "conversion/convert.py"
            )
        if model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} checkpoint, not {cls.model_type!r}; load it "
                f"with its own class, or convert it: python conversion/convert.py SRC DST"
            )
        return config_dict, kwargs

    # ------------------------------------------------------------------ validation
    def _check_known_keys(self, extra: dict):
        """A key that is neither a field nor one transformers itself passes is a typo: refuse it, never ignore it."""
        fields = [field.name for field in dataclasses.fields(self)]
        known = PRETRAINED_CONFIG_KEYS | set(fields) | set(self.attribute_map)
        known |= set(GenerationConfig._get_default_generation_params())
        for key in extra:
            if key not in known and not isinstance(getattr(type(self), key, None), property):
                if hasattr(GenerationConfig(), key):  # e.g. prefill_chunk_size, whose value generate() checks
                    hint = f"it is a generation parameter: pass it to generate() or set model.generation_config.{key}"
                else:
                    close = difflib.get_close_matches(key, fields, n=1)
                    hint = f"did you mean {close[0]!r}?" if close else "see HybridLMConfig's docstring for the fields"
                raise ValueError(f"{key!r} ({extra[key]!r}) is not a HybridLMConfig field; {hint}")

    def _check_types(self):
        """Booleans must be bools (`"no"` is truthy) and per-layer lists must be lists (a string is iterable)."""
        for name, annotation in type(self).__annotations__.items():
            if annotation is bool and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} ({getattr(self, name)!r}) must be True or False")
        for name in ("layers_block_type", "layers_num_experts"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(
                    f"{name} ({value!r}) must be a list with one entry per layer, or None to use the period/offset"
                )

    def _validate_sizes(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "num_experts", "mamba_d_state", "mamba_d_conv", "mamba_expand"):
            _require_positive_int(name, getattr(self, name))
        _require_positive_int("intermediate_size", self.intermediate_size, allow_zero=True)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention; use a divisor of "
                f"{self.num_attention_heads}"
            )
        if not isinstance(self.mamba_dt_rank, int) or isinstance(self.mamba_dt_rank, bool) or self.mamba_dt_rank < 1:
            raise ValueError(f"mamba_dt_rank ({self.mamba_dt_rank!r}) must be a positive integer or 'auto'")
        for kind in ("attn", "expert"):
            period, offset = getattr(self, f"{kind}_layer_period"), getattr(self, f"{kind}_layer_offset")
            _require_positive_int(f"{kind}_layer_period", period)
            if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < period:
                raise ValueError(
                    f"{kind}_layer_offset ({offset}) must be smaller than {kind}_layer_period ({period}); "
                    f"use 0..{period - 1}"
                )
        _require_positive_int("num_experts_per_tok", self.num_experts_per_tok)
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts}): "
                f"each token picks K of the n experts; use 1..{self.num_experts}"
            )

    def _resolve_block_types(self) -> list[str]:
        n = self.num_hidden_layers
        if self.layers_block_type is None:
            return ["attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba" for i in range(n)]
        types = list(self.layers_block_type)
        if len(types) != n:
            raise ValueError(
                f"layers_block_type has {len(types)} entries but num_hidden_layers is {n}; give one entry per layer"
            )
        for i, kind in enumerate(types):
            if kind not in LAYER_TYPES:
                raise ValueError(
                    f"layers_block_type[{i}] is {kind!r}, an unknown layer type; use one of {list(LAYER_TYPES)}"
                )
        return types

    def _resolve_num_experts(self) -> list[int]:
        n = self.num_hidden_layers
        if self.layers_num_experts is None:
            return [
                self.num_experts if i % self.expert_layer_period == self.expert_layer_offset else 1 for i in range(n)
            ]
        counts = list(self.layers_num_experts)
        if len(counts) != n:
            raise ValueError(
                f"layers_num_experts has {len(counts)} entries but num_hidden_layers is {n}; give one entry per layer"
            )
        allowed = sorted({0, 1, self.num_experts})
        for i, count in enumerate(counts):
            if count not in allowed or isinstance(count, bool):
                raise ValueError(
                    f"layers_num_experts[{i}] is {count!r}; use 0 (no feed-forward), 1 (dense MLP) or "
                    f"num_experts ({self.num_experts}) (mixture of experts)"
                )
        return counts

    def _validate_options(self):
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act ({self.hidden_act!r}) is not a known activation; use e.g. 'silu' or 'gelu'")
        check_kernel_backend(self.kernel_backend)
        if self.sliding_window is not None:
            _require_positive_int("sliding_window", self.sliding_window)
        if self.use_rope and self.head_dim % 2:
            raise ValueError(f"use_rope needs an even head_dim, got {self.head_dim}; change hidden_size or the heads")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be a number >= 0")
        if not isinstance(self.attention_dropout, (int, float)) or not 0 <= self.attention_dropout < 1:
            raise ValueError(f"attention_dropout ({self.attention_dropout!r}) is a probability: use 0 <= p < 1")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope_parameters['rope_type'] ({rope_type!r}) is unknown; use one of "
                f"{['default', *ROPE_INIT_FUNCTIONS]}"
            )
        self._validate_token_ids()
        if self.intermediate_size < 1 and any(count > 0 for count in self.layers_num_experts):
            raise ValueError(
                "intermediate_size (0) must be positive when a layer has a feed-forward block; set it, or set "
                "layers_num_experts to all zeros for a model without feed-forward blocks"
            )
        if not 0 < self.mamba_dt_min <= self.mamba_dt_max:
            raise ValueError(
                f"mamba_dt_min ({self.mamba_dt_min}) and mamba_dt_max ({self.mamba_dt_max}) must satisfy "
                "0 < mamba_dt_min <= mamba_dt_max"
            )

    def _validate_token_ids(self):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            for token_id in ids:
                if token_id is not None and (
                    not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < self.vocab_size
                ):
                    raise ValueError(
                        f"{name} ({value!r}) must be None or an id in the vocabulary, 0..{self.vocab_size - 1} "
                        f"(vocab_size {self.vocab_size}); use the tokenizer's {name}, or None"
                    )

    # ------------------------------------------------------------------ derived views
    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def layer_types(self) -> list[str]:
        """transformers' naming of the mixers, which its caches and masks are built from.

        transformers' caches know how many tokens they have seen only from a key/value layer (`get_seq_length`,
        which generate() calls on every cache), so in a stack without attention the first Mamba layer is a
        `"hybrid"` one: a linear-attention layer with a key/value stream of one-element keys (one per token,
        never attended to) that counts positions.
        """
        attention = "sliding_attention" if self.sliding_window is not None else "full_attention"
        types = [attention if kind == "attention" else "linear_attention" for kind in self.layers_block_type]
        if attention not in types:
            types[0] = "hybrid"
        return types

    def feed_forward_type(self, layer_idx: int) -> str:
        """`"none"`, `"mlp"` or `"moe"` for layer `layer_idx`."""
        count = self.layers_num_experts[layer_idx]
        return "none" if count == 0 else "moe" if count > 1 else "mlp"

    def layer_plan(self) -> str:
        """A printable plan: a summary line, then one line per layer (mixer, feed-forward, experts)."""
        n_attn = self.layers_block_type.count("attention")
        n_moe = sum(count > 1 for count in self.layers_num_experts)
        lines = [
            f"HybridLM: {self.num_hidden_layers} layers, attention:mamba = {n_attn}:{self.num_hidden_layers - n_attn}, "
            f"{n_moe} MoE layers ({self.num_experts} experts, top-{self.num_experts_per_tok}), "
            f"hidden {self.hidden_size}, vocab {self.vocab_size}"
        ]
        width = len(str(self.num_hidden_layers - 1))
        for i, kind in enumerate(self.layers_block_type):
            ff = self.feed_forward_type(i)
            if ff == "moe":
                ff = f"moe   {self.num_experts} experts, top-{self.num_experts_per_tok}"
            lines.append(f"  layer {i:>{width}}: {kind:<9}  {ff}")
        return "\n".join(lines)


def check_kernel_backend(value) -> None:
    """Raises ValueError unless `value` names a kernel tier (`config.kernel_backend`, `set_kernel_backend`)."""
    if value not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend ({value!r}) must be one of {list(KERNEL_BACKENDS)}")


def _require_positive_int(name, value, allow_zero=False):
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} ({value!r}) must be an integer >= {low}")


__all__ = ["HybridLMConfig"]
