"""PyTorch HybridLM: Jamba-style stacks of attention and Mamba mixers with dense or mixture-of-experts feed-forward.

Reads top-down: norms and rotary embeddings, attention, the Mamba mixer, decoder layers,
`HybridLMPreTrainedModel`, `HybridLMModel` (with its entry checks), the task heads. The model is on
transformers' protocol: its cache is a `transformers.DynamicCache(config=...)` (key/value layers for attention,
linear-attention layers holding the Mamba conv and SSM states), masks come from `transformers.masking_utils`
by `config.layer_types`, outputs are recorded with `capture_outputs`, and forwards take
`**kwargs: Unpack[TransformersKwargs]`. Ours, because transformers has none: state resets at packed-document
boundaries (`seq_idx`), initial states for chunked prefill, padding zeroed before the conv and the scan. Parameter names follow
transformers' Jamba checkpoints (`self_attn`, `mamba`, `feed_forward.experts.{e}.gate_proj`, ...), so
a saved Jamba folder maps onto this model key for key.

Shape legend: B = batch, L = new tokens, S = cached + new tokens, H = hidden size, D = Mamba d_inner,
N = d_state, R = dt rank, E = experts, K = experts per token, nh / nkv = query / key-value heads,
hd = head dim.
"""

import contextlib
import copy
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BitsAndBytesConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin
from transformers.masking_utils import (
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from . import transformers_compat as compat
from .configuration_hybrid_lm import HybridLMConfig, check_kernel_backend
from .cross_entropy_ops import linear_cross_entropy
from .custom_ops import DTensor  # the parameters of a tensor-parallel model
from .decode_attention_ops import decode_attention_triton, decode_kernel_takes
from .feed_forward_hybrid_lm import (
    HybridLMMLP,
    HybridLMSparseMoeBlock,
    HybridLMTopKRouter,
    load_balancing_loss,
    router_z_loss,
)
from .generation_hybrid_lm import StaticDecodingCaches, static_decoding_kwargs
from .hub_hybrid_lm import push_folder_to_hub
from .loading_checks import check_weight_files
from .mamba_kernels import MambaKernels, select_kernels
from .mamba_projections import linear_from_channels_first, linear_to_channels_first
from .packed_weights import PackedWeights, PacksWeights, packed_linear
from .rms_norm_ops import rms_norm
from .transformers_compat import CACHE_NAME, accepts_cache_alias, cache_output

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------- norms, rotary embeddings


class HybridLMRMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as Llama and Jamba do), optionally of a sum with the
    residual stream. On GPUs a fused norm (`rms_norm_ops.rms_norm`): torch's `F.rms_norm` in eager calls, within one
    rounding step of Llama's eager formula; under torch.compile the formula, which Inductor fuses with its
    neighbours; in mixed-dtype inference the Triton kernel, with the residual add fused in and the formula's values
    exactly.

    kernel_backend: the model's `config.kernel_backend` (kept in step by `set_kernel_backend`); "torch" keeps the
    pure-PyTorch formula on every device, see `rms_norm_ops.rms_norm` for the others.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, kernel_backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.kernel_backend = kernel_backend

    @classmethod
    def from_config(cls, config: HybridLMConfig, hidden_size: int) -> "HybridLMRMSNorm":
        """A norm of `hidden_size` with the config's eps and kernel backend."""
        return cls(hidden_size, eps=config.rms_norm_eps, kernel_backend=config.kernel_backend)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        """(..., H) -> (..., H). With `residual` (..., H): (norm(hidden_states + residual), hidden_states + residual)."""
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, residual, backend=self.kernel_backend)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class HybridLMRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, from transformers' RoPE parameter functions (default, linear, dynamic, llama3, yarn,
    ...); `dynamic_rope_update` recomputes the frequencies of the dynamic types for long inputs."""

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.rope_init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = self.rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HybridLMConfig, *args, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float) / config.head_dim
        return 1.0 / (base**exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq.float().to(x.device)  # (B, L, hd / 2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q: (B, nh, L, hd), k: (B, nkv, L, hd), cos/sin: (B, L, hd)."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------- attention


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, S, hd) -> (B, nkv * n_rep, S, hd)."""
    if n_rep == 1:
        return hidden_states
    batch, heads, length, dim = hidden_states.shape
    return hidden_states[:, :, None].expand(batch, heads, n_rep, length, dim).reshape(batch, heads * n_rep, length, dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention. attention_mask: (B, 1, L, S) additive float mask (transformers' eager mask) or None."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, L, S)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, L, nh, hd)
    return output, weights


# SDPA backends for CUDA tensors, chosen explicitly: flash, then memory-efficient, then math. Not cuDNN's: it
# builds a new execution plan for every new key length, which made each decode step ~47 ms on an H200 (issue 11).
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class HybridLMAttention(PacksWeights):
    """Multi-head attention with grouped key/value heads, optional RoPE and sliding window.

    Runs through transformers' attention interface (`config._attn_implementation`: eager, sdpa, flash_attention_*,
    or any registered one; `model.set_attn_implementation(...)` switches it). Without gradients, q, k and v run as
    one product over their packed weights (packed_weights.py).
    """

    is_causal = True

    def __init__(self, config: HybridLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self._qkv_weight = PackedWeights("attention's q, k and v weights")
        self._qkv_bias = PackedWeights("attention's q, k and v biases")

    @accepts_cache_alias
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        qkv = packed_linear([self.q_proj, self.k_proj, self.v_proj], self._qkv_weight, self._qkv_bias)
        if qkv is None:
            query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        else:
            sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
            query, key, value = F.linear(hidden_states, *qkv).split(sizes, dim=-1)
        query = query.view(shape).transpose(1, 2)  # (B, nh, L, hd)
        key = key.view(shape).transpose(1, 2)  # (B, nkv, L, hd)
        value = value.view(shape).transpose(1, 2)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, nkv, S, hd)

        dropout = self.config.attention_dropout if self.training else 0.0
        if self.config._attn_implementation == "sdpa" and decode_kernel_takes(
                query, key, value, attention_mask, self.config.kernel_backend, dropout):
            # One query per row (a decode step): SDPA would run one program per head over every key, after
            # transformers copied K and V once per query head under torch.compile (decode_attention_ops.py)
            output = decode_attention_triton(query, key, value, attention_mask, self.scaling)  # (B, 1, nh, hd)
            return self.o_proj(output.reshape(batch, length, -1)), None
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        with sdpa_kernel(_SDPA_BACKENDS) if query.is_cuda else contextlib.nullcontext():
            output, weights = attention(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=self.scaling,
                sliding_window=self.sliding_window,
                **kwargs,
            )
        return self.o_proj(output.reshape(batch, length, -1)), weights


# ----------------------------------------------------------------------------- Mamba mixer


class HybridLMTimeStepProjection(nn.Linear):
    """dt_proj: a Linear whose forward leaves out the bias, which the scan adds in float32 before the softplus.

    Being a module call (not a bare `weight @ x`) lets adapters such as LoRA wrap it like any projection.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _module_tensors(module: nn.Module, *names: str) -> list[torch.Tensor]:
    """`module`'s tensors `names`, for a mixer that reads them directly rather than through `module`'s forward
    (conv1d's weight and bias feed the conv kernels; dt_proj's bias goes to the scan). Under tensor parallelism
    (`tp_plan="auto"`) they are DTensors: this rank's shards are returned.

    Under accelerate's CPU or disk offload (`from_pretrained(device_map=...)` with "cpu" or "disk" entries on an
    accelerator, or "disk" on CPU), an offloaded module's tensors are on the meta device except during its own
    forward; `align_module_device` loads them onto the execution device meanwhile, and the tensors returned here
    stay valid after it puts the module back."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        return [_local(getattr(module, name)) for name in names]
    try:
        from accelerate.utils import align_module_device
    except ImportError:
        raise ImportError(
            "this accelerate offloads the Mamba layers but has no accelerate.utils.align_module_device to load their "
            "conv and dt tensors; upgrade it: pip install -U accelerate"
        ) from None
    with align_module_device(module):
        return [getattr(module, name) for name in names]


def _local(tensor):
    """This rank's shard of a tensor-parallel (DTensor) parameter; any other tensor (or None) as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _plain_linear_tensors(module: nn.Module, length: int):
    """(weight, bias) when `module`'s forward is exactly `F.linear(x, weight, bias)` on its own parameters (for
    dt_proj: bias None) and a prefill or training chunk (`length` > 1) is to be projected; else None.

    Then the mixer computes the product itself in the kernels' layout (mamba_projections.py). Any other module
    keeps its own forward: a LoRA or quantized Linear (another class), one with hooks or a replaced forward
    (accelerate's offload), a tensor-parallel one (DTensor weight). A decoding step has nothing to transpose."""
    if (
        length <= 1
        or type(module) not in (nn.Linear, HybridLMTimeStepProjection)
        or module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
        or isinstance(module.weight, DTensor)
    ):
        return None
    return module.weight, None if type(module) is HybridLMTimeStepProjection else module.bias


def _project_to_channels_first(module: nn.Module, x: torch.Tensor, chunks: int = 1) -> tuple[torch.Tensor, ...]:
    """`module(x)` for x (B, L, I), as `chunks` (B, O / chunks, L) tensors (contiguous when the module is plain)."""
    tensors = _plain_linear_tensors(module, x.shape[1])
    if tensors is not None:
        return linear_to_channels_first(x, *tensors, chunks=chunks)
    return module(x).transpose(1, 2).chunk(chunks, dim=1)


def _project_from_channels_first(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x.transpose(1, 2))` for x (B, I, L): (B, L, O)."""
    tensors = _plain_linear_tensors(module, x.shape[-1])
    if tensors is not None:
        return linear_from_channels_first(x, *tensors)
    return module(x.transpose(1, 2))


class HybridLMMambaMixer(nn.Module):
    """The Jamba Mamba-1 mixer: in_proj -> causal conv -> selective scan (gated by silu(z)) -> out_proj.

    dt, B and C come from the conv output through `x_proj`; Jamba's RMSNorms on them are optional
    (`config.mamba_inner_layernorms`, off for plain Mamba checkpoints). A_log, D and the dt bias stay in
    float32 whatever the model dtype. Padded positions (attention_mask == 0) are zeroed before the conv
    and before the scan, so they never reach the states: a left-padded row computes exactly what it
    would alone.

    The four ops run on `self.kernels`, the kernel tier (mamba_kernels.py) bound by `kernels_for` at the first
    forward on a device, or by `HybridLMPreTrainedModel.set_kernel_backend`.
    """

    _fp32_parameters = ("A_log", "D", "dt_proj.bias")

    def __init__(self, config: HybridLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.mamba_d_inner
        self.ssm_state_size = config.mamba_d_state
        self.conv_kernel_size = config.mamba_d_conv
        self.time_step_rank = config.mamba_dt_rank
        d_inner, d_state, rank = self.intermediate_size, self.ssm_state_size, self.time_step_rank

        self.in_proj = nn.Linear(self.hidden_size, 2 * d_inner, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, kernel_size=self.conv_kernel_size, groups=d_inner,
            padding=self.conv_kernel_size - 1, bias=config.mamba_conv_bias,
        )
        self.x_proj = nn.Linear(d_inner, rank + 2 * d_state, bias=False)
        self.dt_proj = HybridLMTimeStepProjection(rank, d_inner, bias=True)
        self.dt_proj.bias = nn.Parameter(torch.zeros(d_inner, dtype=torch.float32))
        # S4D-real initialisation: A = -(1, 2, ..., N) for every channel
        A = torch.arange(1, d_state + 1, dtype=torch.float32).expand(d_inner, -1).contiguous()
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner, dtype=torch.float32))
        self.out_proj = nn.Linear(d_inner, self.hidden_size, bias=config.mamba_proj_bias)
        if config.mamba_inner_layernorms:
            self.dt_layernorm = HybridLMRMSNorm.from_config(config, rank)
            self.b_layernorm = HybridLMRMSNorm.from_config(config, d_state)
            self.c_layernorm = HybridLMRMSNorm.from_config(config, d_state)
        self.kernels: MambaKernels | None = None
        self.kernels_device: torch.device | None = None  # the device `kernels` was chosen for

    def kernels_for(self, device: torch.device) -> MambaKernels:
        """The kernel tier that runs this mixer on `device`: `config.kernel_backend`'s choice for that device
        (`mamba_kernels.select_kernels`), made at the first forward there and kept until the mixer runs on another
        device. A torch.compile trace binds nothing (and runs no self-check): run one eager step first."""
        if self.kernels_device != device:
            kernels = select_kernels(self.config.kernel_backend, device)
            if torch.compiler.is_compiling():
                return kernels
            self.kernels, self.kernels_device = kernels, device
        return self.kernels

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` / `.half()` must not round A_log, D and the dt bias: keep them float32.
        kept = {name: param.data for name, param in self._named_fp32_parameters() if param.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, param in self._named_fp32_parameters():
            if param.dtype != torch.float32:
                source = kept.get(name)
                usable = source is not None and not source.is_meta
                param.data = (source if usable else param.data).to(device=param.device, dtype=torch.float32)
        return self

    def _named_fp32_parameters(self):
        return [(name, self.get_parameter(name)) for name in self._fp32_parameters]

    @accepts_cache_alias
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B, L, H); attention_mask: (B, L), 1 = token, 0 = padding; seq_idx: (B, L) document ids.

        The cache layer holds the conv state (B, D, d_conv - 1), the last conv inputs, and the SSM state
        (B, D, N) in float32. Decoding (one token after a prefill) updates both in place; a prefill (or a chunk
        of one) starts from them and writes back the final states the kernels return. A cache that records its
        past (transformers' assisted decoding, from 5.25 on, which crops rejected draft tokens off) keeps every
        conv input and the SSM states after each of the last tokens it asks for: see `_scan_keeping_states`.
        """
        batch, length, _ = hidden_states.shape
        kernels = self.kernels_for(hidden_states.device)
        has_state = cache is not None and cache.has_previous_state(self.layer_idx)
        conv_state = compat.conv_state(cache, self.layer_idx) if has_state else None
        ssm_state = compat.recurrent_state(cache, self.layer_idx) if has_state else None
        recording = compat.records_past(cache, self.layer_idx)
        if recording and conv_state is not None:  # the layer keeps every conv input so far: the last ones are the state
            conv_state = conv_state[..., -(self.conv_kernel_size - 1) :].contiguous()
        decoding = has_state and length == 1 and not recording
        token_mask = attention_mask[:, None, :].to(hidden_states.dtype) if attention_mask is not None else None

        # 1. input projection: conv input x and gate z, (B, D, L) each
        x, z = _project_to_channels_first(self.in_proj, hidden_states, chunks=2)
        if token_mask is not None:
            x = x * token_mask
        if recording:
            cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size - 1)

        # 2. causal depthwise conv + silu
        conv_weight, conv_bias = _module_tensors(self.conv1d, "weight", "bias")
        conv_weight = conv_weight[:, 0, :]  # (D, d_conv)
        if decoding:
            x = kernels.causal_conv1d_update(x[..., 0], conv_state, conv_weight, conv_bias, "silu")
            x = x[..., None]
        else:
            storing = cache is not None and not recording
            conv_out = kernels.causal_conv1d(
                x, conv_weight, conv_bias, initial_state=conv_state, seq_idx=seq_idx, activation="silu",
                return_final_state=storing,
            )
            x, final_conv_state = conv_out if storing else (conv_out, None)
        if token_mask is not None:
            x = x * token_mask

        # 3. input-dependent step size and B, C
        time_step, B, C = torch.split(
            _project_from_channels_first(self.x_proj, x),
            [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1,
        )  # (B, L, R), (B, L, N), (B, L, N)
        if self.config.mamba_inner_layernorms:
            time_step, B, C = self.dt_layernorm(time_step), self.b_layernorm(B), self.c_layernorm(C)
        (time_step,) = _project_to_channels_first(self.dt_proj, time_step)  # (B, D, L); the bias goes to the scan
        (dt_bias,) = _module_tensors(self.dt_proj, "bias")
        A = -torch.exp(_local(self.A_log).float())  # (D, N)

        # 4. selective scan (or one recurrent step when decoding)
        if decoding:
            y = kernels.selective_state_update(
                ssm_state, x[..., 0], time_step[..., 0], A, B[:, 0], C[:, 0],
                D=_local(self.D), z=z[..., 0], dt_bias=dt_bias, dt_softplus=True,
            )[..., None]
            compat.count_decoded_token(cache, self.layer_idx)
        elif recording:
            keep = min(compat.recurrent_states_to_keep(cache, self.layer_idx), length)
            y, states = self._scan_keeping_states(kernels, x, time_step, A, B, C, z, dt_bias, ssm_state, keep)
            cache.update_recurrent_state(states, self.layer_idx)
        else:
            scan_out = kernels.selective_scan(
                x, time_step, A, B.transpose(1, 2), C.transpose(1, 2), D=_local(self.D), z=z,
                delta_bias=dt_bias, delta_softplus=True, initial_state=ssm_state,
                seq_idx=seq_idx, return_final_state=cache is not None,
            )
            y = scan_out
            if cache is not None:
                y, final_ssm_state = scan_out
                compat.store_mamba_states(cache, self.layer_idx, final_conv_state, final_ssm_state, length)

        # 5. output projection
        return _project_from_channels_first(self.out_proj, y.to(hidden_states.dtype))

    def _scan_keeping_states(self, kernels, x, time_step, A, B, C, z, dt_bias, ssm_state, keep: int):
        """The scan of (B, D, L) inputs (B and C (B, L, N)) from `ssm_state` (None: zeros), with the SSM state
        after each of the last `keep` tokens: the scan kernel up to them, then one recurrent step per token.

        Returns y (B, D, L) and the states to store: a list of `keep` (B, D, N) float32 states (the last one
        the final state), or the final state alone when `keep` is 0."""
        length = x.shape[-1]
        head = length - keep
        outputs, state = [], ssm_state
        if head > 0:
            y_head, state = kernels.selective_scan(
                x[..., :head], time_step[..., :head], A, B[:, :head].transpose(1, 2), C[:, :head].transpose(1, 2),
                D=_local(self.D), z=z[..., :head], delta_bias=dt_bias, delta_softplus=True, initial_state=ssm_state,
                return_final_state=True,
            )
            outputs.append(y_head)
        state = state.clone() if state is not None else x.new_zeros(*x.shape[:2], A.shape[-1], dtype=torch.float32)
        states = []
        for t in range(head, length):  # a few draft tokens: the recurrent step writes `state` in place
            y_t = kernels.selective_state_update(
                state, x[..., t], time_step[..., t], A, B[:, t], C[:, t],
                D=_local(self.D), z=z[..., t], dt_bias=dt_bias, dt_softplus=True,
            )
            outputs.append(y_t[..., None])
            states.append(state.clone())
        return torch.cat(outputs, dim=-1), states or state


# ----------------------------------------------------------------------------- decoder layers


class HybridLMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), then x + feed_forward(norm(x)) when the layer has one.

    The residual add after the mixer runs inside the feed-forward norm's kernel (it returns the sum too)."""

    def __init__(self, config: HybridLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = HybridLMRMSNorm.from_config(config, config.hidden_size)
        feed_forward = config.feed_forward_type(layer_idx)
        if feed_forward != "none":
            self.pre_ff_layernorm = HybridLMRMSNorm.from_config(config, config.hidden_size)
            self.feed_forward = HybridLMSparseMoeBlock(config) if feed_forward == "moe" else HybridLMMLP(config)
        self.is_moe = feed_forward == "moe"

    def mix(self, hidden_states, attention_mask, position_embeddings, cache, seq_idx, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    @accepts_cache_alias
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        seq_idx: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """(B, L, H) -> (B, L, H). attention_mask: the mask of this layer's type (see `HybridLMModel._masks`)."""
        # 1. norm, token mixer
        residual = hidden_states
        hidden_states = self.mix(
            self.input_layernorm(hidden_states), attention_mask, position_embeddings, cache, seq_idx, **kwargs
        )
        if not hasattr(self, "feed_forward"):
            return residual + hidden_states
        # 2. residual add and norm in one call: (norm(mixer_out + residual), mixer_out + residual), then feed-forward
        normed, hidden_states = self.pre_ff_layernorm(hidden_states, residual)
        return hidden_states + self.feed_forward(normed)


class HybridLMAttentionDecoderLayer(HybridLMDecoderLayer):
    def __init__(self, config: HybridLMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = HybridLMAttention(config, layer_idx)

    def mix(self, hidden_states, attention_mask, position_embeddings, cache, seq_idx, **kwargs):
        hidden_states, _ = self.self_attn(
            hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, cache=cache, **kwargs
        )
        return hidden_states


class HybridLMMambaDecoderLayer(HybridLMDecoderLayer):
    def __init__(self, config: HybridLMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mamba = HybridLMMambaMixer(config, layer_idx)
        self.counts_positions = config.layer_types[layer_idx] == "hybrid"  # see HybridLMConfig.layer_types

    def mix(self, hidden_states, attention_mask, position_embeddings, cache, seq_idx, **kwargs):
        if self.counts_positions and cache is not None:
            marks = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)  # (B, 1, L, 1)
            cache.update(marks, marks, self.layer_idx)
        return self.mamba(hidden_states, attention_mask=attention_mask, cache=cache, seq_idx=seq_idx)


DECODER_LAYER_CLASSES = {"attention": HybridLMAttentionDecoderLayer, "mamba": HybridLMMambaDecoderLayer}


# ----------------------------------------------------------------------------- pretrained base


class HybridLMPreTrainedModel(PreTrainedModel):
    config_class = HybridLMConfig
    config: HybridLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridLMAttentionDecoderLayer", "HybridLMMambaDecoderLayer"]
    _keep_in_fp32_modules_strict = ["A_log", "D", "dt_proj.bias"]
    # What bitsandbytes leaves in high precision unless the user's `llm_int8_skip_modules` says otherwise
    # (`from_pretrained` fills it in when it is None): the Mamba mixers whole and the output heads. Entries are matched
    # as transformers matches them, against a layer's full name from its start (a regex) or as its suffix, so a bare
    # "mamba" names the mixer but none of its projections. Routers, norms, embeddings and conv1d are no nn.Linear, and
    # dt_proj only a subclass of one: bitsandbytes converts none of them.
    _quantization_skip_mamba = r".*\.mamba"
    _quantization_skip_modules = [_quantization_skip_mamba, "lm_head", "score"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _is_stateful = True  # a Mamba state cannot be rolled back: no assisted decoding
    _can_record_outputs = {
        "hidden_states": [HybridLMAttentionDecoderLayer, HybridLMMambaDecoderLayer],
        "attentions": HybridLMAttention,
        "router_logits": OutputRecorder(HybridLMTopKRouter, index=0),  # (B * L, E) per MoE layer
    }
    # Every projection an adapter (LoRA) should reach: attention, the Mamba mixer and the MLP / experts.
    # The Mamba mixer calls each of them as a module, so a wrapped projection is never bypassed.
    lora_target_modules = (
        "q_proj", "k_proj", "v_proj", "o_proj",
        "in_proj", "x_proj", "dt_proj", "out_proj",
        "gate_proj", "up_proj", "down_proj",
    )

    # peft attaches its adapter configs as `model.peft_config` once an adapter is injected (get_peft_model,
    # inject_adapter_in_model, and transformers' add_adapter / load_adapter through it): the moment to say that
    # Llama-style targets (q_proj, v_proj) leave every Mamba mixer frozen.
    @property
    def peft_config(self) -> dict:
        try:
            return self.__dict__["peft_config"]
        except KeyError:
            raise AttributeError("peft_config") from None

    @peft_config.setter
    def peft_config(self, value: dict) -> None:
        self.__dict__["peft_config"] = value
        _report_frozen_mamba_mixers(self)

    @peft_config.deleter
    def peft_config(self) -> None:
        del self.__dict__["peft_config"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, HybridLMRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, HybridLMTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, HybridLMRotaryEmbedding):
            inv_freq, _ = module.rope_init_fn(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        if isinstance(module, HybridLMMambaMixer):
            self._init_mamba(module)

    def _init_mamba(self, module: HybridLMMambaMixer):
        """Mamba's initialisation: S4D-real A, unit D, dt_proj scaled by dt_rank, and a dt bias whose softplus
        is log-uniform in [mamba_dt_min, mamba_dt_max]."""
        config = self.config
        d_inner, d_state = module.intermediate_size, module.ssm_state_size
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=module.A_log.device).expand(d_inner, -1)
        init.copy_(module.A_log, torch.log(A))
        init.ones_(module.D)
        init.uniform_(module.dt_proj.weight, -(module.time_step_rank**-0.5), module.time_step_rank**-0.5)
        log_min, log_max = torch.log(torch.tensor(config.mamba_dt_min)), torch.log(torch.tensor(config.mamba_dt_max))
        dt = torch.exp(torch.rand(d_inner) * (log_max - log_min) + log_min).clamp(min=config.mamba_dt_init_floor)
        init.copy_(module.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def set_kernel_backend(self, backend: "str | MambaKernels") -> None:
        """Runs every Mamba mixer on the kernel tier `backend` from now on (and the norms by its name: the fused
        RMSNorm unless "torch"), and records its name in `config.kernel_backend`, which save_pretrained writes (a
        loaded model chooses the same way).

        `backend` is a name ("auto", "torch", "triton", "cuda"), chosen for each mixer's device as at its first
        forward, or a tier instance (e.g. `mamba_kernels.TritonKernels(scan_tiles=...)`), bound as it is. The
        errors are those of `config.kernel_backend`: ValueError for an unknown name or a tier that cannot run on the
        device, ImportError (with the install command) for a missing package; nothing changes when one is raised. A
        mixer that later runs on another device (or whose weights are offloaded now) chooses again from the name."""
        name = backend.name if isinstance(backend, MambaKernels) else backend
        check_kernel_backend(name)
        mixers = [module for module in self.modules() if isinstance(module, HybridLMMambaMixer)]
        devices = {mixer.A_log.device for mixer in mixers} - {torch.device("meta")}
        chosen = {device: select_kernels(backend, device) for device in devices}
        for mixer in mixers:
            device = mixer.A_log.device
            mixer.kernels, mixer.kernels_device = chosen.get(device), (device if device in chosen else None)
        for norm in self.modules():
            if isinstance(norm, HybridLMRMSNorm):
                norm.kernel_backend = name
        self.config.kernel_backend = name

    def push_to_hub(self, repo_id: str, **kwargs):
        """Uploads the model (weights, config, code for trust_remote_code) with a generated model card: the layer
        plan and the total and active-per-token parameter counts. Takes transformers' `push_to_hub` options."""
        return push_folder_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader with its documented semantics (missing weights are initialised and reported in
        `missing_keys`; a tensor whose shape changed raises unless `ignore_mismatched_sizes=True`), and errors that
        name the tensor: a backbone tensor of another shape, or one the config has no place for, means the
        weights do not belong to this config.

        The loader runs with `ignore_mismatched_sizes=True` so that it reports every mismatch instead of failing
        on the first without the config fields to check; the user's `ignore_mismatched_sizes` is applied here.

        A bitsandbytes `quantization_config` without `llm_int8_skip_modules` gets `_quantization_skip_modules`;
        the user's own list replaces it (each entry that keeps no layer in high precision is reported)."""
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if source is not None:
            check_weight_files(source, kwargs.get("subfolder", ""))
        wants_info = kwargs.pop("output_loading_info", False)
        shapes_may_differ = kwargs.pop("ignore_mismatched_sizes", False)
        user_skips = _declare_quantization_skips(cls, kwargs)
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        _check_loading_info(info, shapes_may_differ)
        if getattr(model, "hf_quantizer", None) is not None and _is_bitsandbytes(model.hf_quantizer.quantization_config):
            _check_quantized_layers(model, user_skips)
        return (model, info) if wants_info else model


def _report_frozen_mamba_mixers(model: HybridLMPreTrainedModel) -> None:
    """Warns once when peft has adapted modules of `model` but none inside a Mamba mixer."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # only peft sets `peft_config`

    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    mixers = [module for module in model.modules() if isinstance(module, HybridLMMambaMixer)]
    if adapted and mixers and not any(isinstance(sub, BaseTunerLayer) for mixer in mixers for sub in mixer.modules()):
        logger.warning_once(
            f"the adapter reaches {sorted(adapted)} but no Mamba mixer projection: the mixers of the {len(mixers)} "
            f"Mamba layers (of {model.config.num_hidden_layers}) stay frozen. To adapt every mixer and feed-forward "
            "block, target model.lora_target_modules: LoraConfig(target_modules=list(model.lora_target_modules))"
        )


_BACKBONE_PREFIXES = ("embed_tokens.", "layers.", "final_layernorm.")


def _check_loading_info(info: dict, shapes_may_differ: bool) -> None:
    """Raises on an unexpected backbone tensor, and on a tensor of another shape unless `shapes_may_differ`."""
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if _is_backbone_key(_key_name(k)))
    if unexpected:
        raise ValueError(
            f"the checkpoint's weights do not match its config: tensor '{unexpected[0]}' is in the checkpoint but "
            f"the config has no such tensor ({len(unexpected)} such tensors). Check num_hidden_layers, the layer "
            "plan (layers_block_type, layers_num_experts) and mamba_inner_layernorms in config.json."
        )
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched and not shapes_may_differ:
        if _is_backbone_key(_key_name(mismatched[0])):
            fix = "Check hidden_size, the heads, the layer plan and the Mamba sizes in config.json."
        else:
            fix = "Pass ignore_mismatched_sizes=True to initialise it anew (e.g. a classifier with another num_labels)."
        raise ValueError(
            f"the checkpoint's weights do not match its config: {_describe(mismatched[0])} has a different shape in "
            f"the checkpoint than the config implies ({len(mismatched)} such tensors). {fix}"
        )


def _is_backbone_key(name: str) -> bool:
    name = name.removeprefix("model.")
    return name.startswith(_BACKBONE_PREFIXES)


def _key_name(key) -> str:
    return key[0] if isinstance(key, tuple) else str(key)


def _describe(key) -> str:
    if isinstance(key, tuple) and len(key) == 3:
        return f"tensor '{key[0]}' (checkpoint {tuple(key[1])}, model {tuple(key[2])})"
    return f"tensor '{_key_name(key)}'"


def _is_bitsandbytes(quantization_config) -> bool:
    method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
              else getattr(quantization_config, "quant_method", None))
    return method == "bitsandbytes"  # a str enum in BitsAndBytesConfig


def _declare_quantization_skips(cls, kwargs: dict) -> list[str] | None:
    """For a bitsandbytes `quantization_config` in `kwargs`: checks that bitsandbytes is installed, and puts
    `cls._quantization_skip_modules` into a copy of the config when it has no `llm_int8_skip_modules`. Returns the
    user's own list, or None."""
    config = kwargs.get("quantization_config")
    if not _is_bitsandbytes(config):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "quantization_config asks for bitsandbytes weights, but bitsandbytes is not installed: run "
            "`pip install -e \".[quant]\"` in the hybrid_lm checkout (or `pip install 'bitsandbytes>=0.46.1'`)"
        )
    config = BitsAndBytesConfig.from_dict(config) if isinstance(config, dict) else copy.deepcopy(config)
    if config.llm_int8_skip_modules is not None:
        return list(config.llm_int8_skip_modules)
    config.llm_int8_skip_modules = list(cls._quantization_skip_modules)
    kwargs["quantization_config"] = config
    return None


def _check_quantized_layers(model, user_skips: list[str] | None) -> None:
    """After a bitsandbytes load: raises when no layer was quantized, and reports each entry of the user's
    `llm_int8_skip_modules` that keeps no layer in high precision."""
    import bitsandbytes as bnb

    layers = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if not any(isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for module in layers.values()):
        skips = model.hf_quantizer.quantization_config.llm_int8_skip_modules
        raise ValueError(
            f"quantization_config asks for bitsandbytes weights, but no layer of this model is quantized: each of its "
            f"{len(layers)} nn.Linear layers is kept by llm_int8_skip_modules ({skips}) or is of a kind bitsandbytes "
            "does not convert (a pure Mamba model has only Mamba mixers and a head). Load it without "
            "quantization_config, or pass llm_int8_skip_modules=['lm_head'] to quantize the Mamba projections too"
        )
    kept = [name for name, module in layers.items() if type(module) is nn.Linear]  # what bitsandbytes converts
    # the default entries name the heads of every task class ("score" is no layer of the causal LM): not reported
    for entry in [e for e in user_skips or [] if e not in model._quantization_skip_modules]:
        if all(should_convert_module(name, [entry]) for name in kept):
            logger.warning(
                f"llm_int8_skip_modules entry {entry!r} keeps no layer of {type(model).__name__} in high precision: "
                "transformers matches an entry against a layer's full name, from its start (a regex) or as its "
                "suffix, and no layer that bitsandbytes converts matches it. The default entries, for the Mamba "
                f"mixers whole and the heads, are {model._quantization_skip_modules}"
            )


# ----------------------------------------------------------------------------- models


class HybridLMModel(HybridLMPreTrainedModel):
    """The decoder stack: embeddings, `num_hidden_layers` decoder layers, final RMSNorm."""

    def __init__(self, config: HybridLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            DECODER_LAYER_CLASSES[kind](config, layer_idx=i) for i, kind in enumerate(config.layers_block_type)
        )
        self.final_layernorm = HybridLMRMSNorm.from_config(config, config.hidden_size)
        self.rotary_emb = HybridLMRotaryEmbedding(config) if config.use_rope else None
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    @accepts_cache_alias
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        seq_idx: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        """
        input_ids: (B, L) token ids, or inputs_embeds: (B, L, H).
        attention_mask: (B, S) with 1 for tokens and 0 for padding, covering cached and new positions.
        position_ids: (B, L). Without an attention_mask, positions that restart inside a row mark packed
            documents (the convention of transformers' `DataCollatorWithFlattening`): attention stays inside each
            document and the Mamba conv/SSM states restart at each boundary.
        cache: a `transformers.DynamicCache(config=model.config)` (or the one an earlier call returned); created
            when `use_cache`. Attention layers keep keys/values in it, Mamba layers their conv and SSM states.
            (`past_key_values=` is the name up to transformers 5.23.)
        seq_idx: (B, L) document ids of a packed batch (DataCollatorWithFlattening(return_seq_idx=True));
            an alternative to restarting position_ids.
        kwargs: transformers' model kwargs (`output_hidden_states`, `output_attentions`, `output_router_logits`,
            attention-implementation arguments). A keyword none of them uses is reported once and ignored.
        """
        config = self.config
        _report_unused_kwargs(kwargs)
        if use_cache is None:  # unlike config.use_cache alone: a training forward builds no cache unless asked
            use_cache = config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        # The entry checks run once per forward, outside compiled code, and not in a decode step (one token after
        # a prefill, its id from the model's own logits): there they would cost host syncs.
        checking = not torch.compiler.is_compiling()
        decoding = cache is not None and _cache_holds_a_prefix(cache, config) and _length(input_ids, inputs_embeds) == 1
        inputs_embeds = self._embed(input_ids, inputs_embeds, check_ids=checking and not decoding)
        batch, length, _ = inputs_embeds.shape
        if checking:
            self._check_cache(cache, batch)
        past_length = cache.get_seq_length() if cache is not None else 0  # a 0-dim tensor for static caches
        if checking and not decoding:
            _check_attention_mask(attention_mask, batch, int(past_length) + length)
            position_ids = _check_positions(position_ids, batch, length)
            seq_idx = _check_seq_idx(seq_idx, batch, length)
        if position_ids is None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                # a static cache counts on its first attention layer's device, which a device map may put elsewhere
                offset = past_length.to(inputs_embeds.device) if isinstance(past_length, torch.Tensor) else past_length
                position_ids = torch.arange(length, device=inputs_embeds.device) + offset
                position_ids = position_ids.expand(batch, -1)
        # packed documents, for the Mamba layers and (transformers looks for them only without a cache) the masks
        if seq_idx is None and attention_mask is None and length > 1:
            seq_idx = find_packed_sequence_indices(position_ids)

        if isinstance(mask_mapping := attention_mask, dict):  # prepared by generate() for a static cache
            mask_mapping = {"hybrid": mask_mapping.get("linear_attention"), **mask_mapping}
        else:
            mask_mapping = self._masks(inputs_embeds, attention_mask, cache, position_ids, seq_idx, past_length)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None

        hidden_states = inputs_embeds
        for layer, layer_type in zip(self.layers, config.layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=mask_mapping[layer_type],
                position_embeddings=position_embeddings,
                cache=cache,
                seq_idx=seq_idx,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.final_layernorm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **cache_output(cache))

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _masks(self, inputs_embeds, attention_mask, cache, position_ids, seq_idx, past_length) -> dict:
        """One mask per layer type in `config.layer_types`, from transformers' masking utilities."""
        config = self.config
        documents = _same_document(seq_idx, int(past_length)) if seq_idx is not None else None
        # With our document function, transformers must not also find the documents in position_ids: the two
        # combined give wrong masks (seen on 5.24: the last query of a packed row loses its own document).
        if documents is not None:
            position_ids = None
        # positional arguments: the cache argument's name differs between transformers releases
        recurrent = create_recurrent_attention_mask(config, inputs_embeds, attention_mask, cache)
        masks = {"linear_attention": recurrent, "hybrid": recurrent}  # a "hybrid" layer's keys only count
        if "full_attention" in config.layer_types:
            masks["full_attention"] = create_causal_mask(
                config, inputs_embeds, attention_mask, cache, position_ids, and_mask_function=documents
            )
        if "sliding_attention" in config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(
                config, inputs_embeds, attention_mask, cache, position_ids, and_mask_function=documents
            )
        return masks

    # ------------------------------------------------------------------ the entry checks (once per forward)
    def _embed(self, input_ids, inputs_embeds, check_ids: bool) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        for name, value in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor, got {type(value).__name__}; call the tokenizer with "
                    "return_tensors='pt', or wrap the ids in torch.tensor([...])"
                )
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, length, {self.config.hidden_size}), "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            if inputs_embeds.dtype != self.embed_tokens.weight.dtype:
                raise TypeError(
                    f"inputs_embeds has dtype {inputs_embeds.dtype}, the model {self.embed_tokens.weight.dtype}; "
                    f"convert them with inputs_embeds.to({self.embed_tokens.weight.dtype})"
                )
            embeds = inputs_embeds
        else:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
            if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
            if input_ids.dtype not in (torch.int64, torch.int32):
                input_ids = input_ids.long()  # nn.Embedding takes int32 / int64 indices only
            if check_ids and input_ids.numel():  # one device sync
                low, high = torch.stack(torch.aminmax(input_ids)).tolist()
                if low < 0 or high >= self.config.vocab_size:
                    bad = high if high >= self.config.vocab_size else low
                    raise ValueError(
                        f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size - 1}]; "
                        "check that the tokenizer matches the model (config.vocab_size) or resize the embeddings"
                    )
            embeds = self.embed_tokens(input_ids)
        if embeds.shape[1] == 0:
            raise ValueError("the input has no tokens (sequence length 0); pass at least one token per row")
        if embeds.shape[0] == 0:
            raise ValueError("the batch is empty (batch size 0); pass at least one row")
        return embeds

    def _check_cache(self, cache, batch: int) -> None:
        """Checks that `cache` was built for this layer plan and holds states for `batch` rows (shapes only: no
        device sync, so it runs in decode steps too)."""
        if cache is None:
            return
        if not isinstance(cache, Cache):
            raise TypeError(
                f"the cache must be a transformers Cache (DynamicCache(config=model.config)), got {type(cache).__name__}"
            )
        kinds = ["mamba" if isinstance(layer, LinearAttentionCacheLayerMixin) else "attention" for layer in cache.layers]
        if kinds != list(self.config.layers_block_type):
            raise ValueError(
                f"the cache was created for a different model: its layers are {kinds or 'not built yet'}, this model's "
                f"are {list(self.config.layers_block_type)}; pass DynamicCache(config=model.config), the cache this "
                "model returned, or none"
            )
        cached = _cache_batch_size(cache)
        if cached is not None and cached != batch:
            raise ValueError(
                f"the cache holds states for a batch of {cached}, this call's batch is {batch}; a cache serves the "
                "batch it was filled with: pass a new cache (e.g. DynamicCache(config=model.config)) or none"
            )


def _length(input_ids, inputs_embeds) -> int:
    """New tokens of the call (0 without inputs: `_embed` says what is missing)."""
    inputs = input_ids if input_ids is not None else inputs_embeds
    return inputs.shape[1] if inputs is not None and inputs.dim() >= 2 else 0


def _cache_batch_size(cache: Cache) -> int | None:
    """The batch size of the first cache layer that holds a tensor (a Mamba layer's conv state, an attention
    layer's keys; a static layer allocates them at its first update), or None while the cache is empty."""
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            states = layer.conv_states[0]
        else:
            states = getattr(layer, "keys", None) if layer.is_initialized else None
        if states is not None and states.dim() > 1:  # a dynamic layer starts from an empty 1-d tensor
            return states.shape[0]
    return None


def _cache_holds_a_prefix(cache, config: HybridLMConfig) -> bool:
    """From the cache layers' own flags, with no device sync (a static cache counts its tokens on the device)."""
    if not isinstance(cache, Cache) or len(cache.layers) != config.num_hidden_layers:
        return False  # not a cache of this model: the entry check says so
    if "mamba" in config.layers_block_type:
        return cache.has_previous_state(config.layers_block_type.index("mamba"))
    return cache.is_initialized


def _report_unused_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _MODEL_KWARGS)
    if unknown and not torch.compiler.is_compiling():
        logger.warning_once(
            f"HybridLM ignores the keyword argument(s) {unknown}: they are not inputs of this model "
            f"(see HybridLMModel.forward and transformers.utils.TransformersKwargs)"
        )


# What the forwards take through **kwargs: transformers' model kwargs, its loss kwargs (which the causal-LM
# forward hands to `loss_function`) and `return_dict` (taken by the output decorators).
_MODEL_KWARGS = set(TransformersKwargs.__annotations__) | {"shift_labels", "ignore_index", "return_dict"}


def _check_attention_mask(attention_mask, batch: int, total_length: int) -> None:
    if attention_mask is None or isinstance(attention_mask, dict) or attention_mask.dim() == 4:
        return  # no mask, or masks prepared by the caller
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] != total_length:
        raise ValueError(
            f"attention_mask must have shape (batch, cached + new tokens) = ({batch}, {total_length}), got "
            f"{tuple(attention_mask.shape)}; it covers every position seen so far, with 1 for tokens and "
            "0 for padding"
        )


def _check_positions(position_ids, batch: int, length: int):
    if position_ids is None or position_ids.shape == (batch, length):
        return position_ids
    if position_ids.dim() == 2 and position_ids.shape[0] == 1 and position_ids.shape[1] == length:
        return position_ids.expand(batch, -1)
    raise ValueError(
        f"position_ids must have shape (batch, new tokens) = ({batch}, {length}), got {tuple(position_ids.shape)} "
        "(generate derives them from attention_mask, which must have the prompt's shape: 1 = token, 0 = padding)"
    )


def _check_seq_idx(seq_idx, batch: int, length: int):
    if seq_idx is not None and seq_idx.shape != (batch, length):
        raise ValueError(f"seq_idx must have shape (batch, new tokens) = ({batch}, {length}), got {tuple(seq_idx.shape)}")
    return seq_idx


def _check_label_ids(targets: torch.Tensor, num_classes: int, ignore_index: int, num_items_in_batch=None, *,
                     kind: str, limit: str, items: str, fix: str) -> None:
    """The labels a loss reads must be ids in [0, num_classes) or `ignore_index`: a ValueError names one that is
    not. With none left to predict the loss is nan (a mean over nothing; its gradients are zero): said once
    in a warning, unless `num_items_in_batch` (Trainer's count over the accumulated batch) makes it a sum over 0.

    One reduction read with one `.tolist()`: a host sync per forward with labels, which a training step pays anyway
    (Trainer reads each step's loss for `logging_nan_inf_filter`). Skipped where no sync may happen: in compiled
    code and during CUDA graph capture."""
    if torch.compiler.is_compiling() or (targets.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    kept = targets != ignore_index
    low = high = count = 0
    if targets.numel():
        low, high = torch.aminmax(targets.long().masked_fill(~kept, 0))
        low, high, count = torch.stack([low, high, kept.sum()]).tolist()
    if low < 0 or high >= num_classes:
        bad = high if high >= num_classes else low
        raise ValueError(
            f"labels contains {bad}: each label must be a {kind} in [0, {num_classes - 1}] ({limit} {num_classes}) "
            f"or the ignore index {ignore_index}; {fix}"
        )
    if count == 0 and (num_items_in_batch is None or num_items_in_batch == 0):
        logger.warning_once(
            f"every label is the ignore index ({ignore_index}): there are no {items}, so the loss is nan "
            "(a mean over nothing) and adds no gradient; check the label masking and truncation (e.g. prompts that "
            "fill max_length leave no answer tokens). Trainer passes num_items_in_batch, with which such a "
            "micro-batch adds 0."
        )


def _same_document(seq_idx: torch.Tensor, past_length: int):
    """A transformers mask function: query and key in the same packed document. The cached keys count as the
    first document of the chunk. (transformers finds documents in restarting position_ids only; `seq_idx`
    names them directly.)"""
    key_documents = torch.cat([seq_idx[:, :1].expand(-1, past_length), seq_idx], dim=1)  # (B, S)

    def same_document(batch_idx, head_idx, q_idx, kv_idx):
        return key_documents[batch_idx, kv_idx] == key_documents[batch_idx, q_idx]

    return same_document


@dataclass
class HybridLMCausalLMOutput(MoeCausalLMOutputWithPast):
    """MoeCausalLMOutputWithPast plus the router z-loss (`z_loss`) when it is computed."""

    z_loss: torch.FloatTensor | None = None


class HybridLMForCausalLM(HybridLMPreTrainedModel, GenerationMixin):
    """HybridLMModel with a language-modelling head.

    The loss is the next-token cross-entropy (labels of -100 ignored; transformers' loss kwargs such as
    `num_items_in_batch` and `shift_labels` apply). In training mode, and whenever `output_router_logits` is on,
    the MoE regularisers are added to it: `router_aux_loss_coef` times the load-balancing loss (returned as
    `aux_loss`) and `router_z_loss_coef` times the z-loss (`z_loss`); both ignore padded tokens.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # with the config's base_model_tp_plan (as in Llama)

    def __init__(self, config: HybridLMConfig):
        super().__init__(config)
        self.model = HybridLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.static_decoding_caches = StaticDecodingCaches()
        self.post_init()

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' `generate`. On a CUDA device, unless the call names its cache, it decodes from a static
        cache this model keeps between calls, so the decode step transformers compiles (CUDA graphs) is recorded
        once per batch size and replayed afterwards (see generation_hybrid_lm.py; `cache_implementation="dynamic"`
        opts out). This is why transformers' method is wrapped: it cannot keep a cache across calls. Also checked
        first: `prefill_chunk_size`, which transformers hands to `torch.split`, whose error for 0, a negative or a
        fractional size does not say which argument was wrong."""
        chunk = kwargs.get("prefill_chunk_size", getattr(generation_config or self.generation_config,
                                                         "prefill_chunk_size", None))
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(
                f"prefill_chunk_size ({chunk!r}) must be a positive whole number of tokens per prefill forward, or "
                "None to prefill the prompt in one forward; e.g. prefill_chunk_size=512"
            )
        static = static_decoding_kwargs(self, inputs, generation_config, kwargs)
        if static is None:
            return super().generate(inputs, generation_config, **kwargs)
        output = super().generate(inputs, **static)
        if not isinstance(output, torch.Tensor) and output.get(CACHE_NAME) is static[CACHE_NAME]:
            output[CACHE_NAME] = copy.deepcopy(output[CACHE_NAME])  # the next call resets the kept one
        return output

    @can_return_tuple
    @accepts_cache_alias
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        seq_idx: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HybridLMCausalLMOutput:
        """See `HybridLMModel.forward`. labels: (B, L) next-token targets (shifted inside), -100 = ignore.
        logits_to_keep: compute logits for the last N positions only (0 = all), or for the given indices."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        router_losses = output_router_logits or (self.training and labels is not None)
        inputs = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:  # else the model raises
            # before the layers are queued: the check's host sync then waits for no forward on the GPU
            _check_labels(labels, inputs.shape[:2], logits_to_keep)
            targets = kwargs.get("shift_labels")
            _check_label_ids(
                labels[:, 1:] if targets is None else targets, self.vocab_size, kwargs.get("ignore_index", -100),
                kwargs.get("num_items_in_batch"), kind="token id", limit="vocab_size", items="tokens to predict",
                fix="check that the tokenizer matches the model (config.vocab_size) or resize the embeddings",
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            seq_idx=seq_idx,
            output_router_logits=router_losses and any(n > 1 for n in self.config.layers_num_experts),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep < 0:
            raise ValueError(
                f"logits_to_keep ({logits_to_keep}) must be >= 0: the number of last positions to compute logits "
                "for (0 = all), or a tensor of position indices"
            )
        loss = logits = None
        if labels is not None and self.training and self.config.fused_loss and self._head_is_plain():
            loss = self._fused_loss(hidden_states, labels, **kwargs)
        else:
            if isinstance(logits_to_keep, int):
                hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
            else:
                hidden_states = hidden_states[:, logits_to_keep]
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        aux_loss = z_loss = None
        router_logits = outputs.router_logits
        if router_logits and router_losses:
            length = outputs.last_hidden_state.shape[1]
            token_mask = attention_mask[:, -length:] if attention_mask is not None and attention_mask.dim() == 2 else None
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts,
                                           self.config.num_experts_per_tok, token_mask)
            if self.config.router_z_loss_coef > 0:
                z_loss = router_z_loss(router_logits, token_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
                if z_loss is not None:
                    loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.device)

        return HybridLMCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits if output_router_logits else None,
            **cache_output(getattr(outputs, CACHE_NAME)),
        )

    def _head_is_plain(self) -> bool:
        """Whether lm_head is a bare nn.Linear, so the fused loss may read its weight directly. A head that peft
        wrapped (LoRA), bitsandbytes quantized or accelerate hooked computes more than `x @ W^T`: it keeps the
        plain path, so nothing the user attached is bypassed."""
        head = self.lm_head
        return (type(head) is nn.Linear and head.bias is None and not head._forward_hooks
                and not head._forward_pre_hooks and not hasattr(head, "_hf_hook"))

    def _fused_loss(self, hidden_states, labels, shift_labels=None, num_items_in_batch=None, ignore_index=-100,
                    **kwargs) -> torch.Tensor:
        """transformers' causal-LM loss (next-token targets, `shift_labels`, `num_items_in_batch`), computed by
        `linear_cross_entropy` from the (B, L, H) hidden states without the full logits."""
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
        shift_labels = shift_labels.to(hidden_states.device).reshape(-1)
        if num_items_in_batch is not None:
            num_items_in_batch = torch.as_tensor(num_items_in_batch, device=hidden_states.device)
        return linear_cross_entropy(hidden_states.reshape(-1, hidden_states.shape[-1]), self.lm_head.weight,
                                    shift_labels, num_items_in_batch, ignore_index)


def _check_labels(labels, shape: torch.Size, logits_to_keep) -> None:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"labels must be a tensor of integer token ids (-100 = ignore), got "
            f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    if labels.shape != shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(shape)}, got {tuple(labels.shape)}")
    if not isinstance(logits_to_keep, int) or logits_to_keep != 0:
        raise ValueError("labels need logits for every position; leave logits_to_keep at 0 with labels")


class HybridLMForSequenceClassification(HybridLMPreTrainedModel):
    """HybridLMModel with a linear head on the last real token of each row (left or right padding).

    The last real token comes from `attention_mask` when given, else from `config.pad_token_id`.
    """

    def __init__(self, config: HybridLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HybridLMModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    @accepts_cache_alias
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        seq_idx: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        """See `HybridLMModel.forward`. labels: (B,) class ids (or (B, num_labels) targets for regression and
        multi-label problems)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            seq_idx=seq_idx,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, L, H)
        batch, length = hidden_states.shape[:2]
        last = self._last_token_index(input_ids, attention_mask, batch, length, hidden_states.device)
        logits = self.score(hidden_states[torch.arange(batch, device=hidden_states.device), last])  # (B, labels)

        loss = None
        if labels is not None:
            if self._is_single_label_classification(labels):
                if labels.shape not in ((batch,), (batch, 1)):
                    raise ValueError(
                        f"labels must hold one class id per row, shape ({batch},), got {tuple(labels.shape)}; "
                        "per-token labels train HybridLMForCausalLM, and several labels per row are float targets "
                        "of shape (batch, num_labels) with problem_type='multi_label_classification'"
                    )
                _check_label_ids(
                    labels, self.num_labels, -100, kind="class id", limit="num_labels", items="rows to classify",
                    fix="set num_labels to the number of classes (from_pretrained(..., num_labels=N, "
                    "ignore_mismatched_sizes=True) for a new classifier)",
                )
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_output(getattr(outputs, CACHE_NAME)),
        )

    def _is_single_label_classification(self, labels: torch.Tensor) -> bool:
        """Whether the loss reads `labels` as class ids: `ForSequenceClassificationLoss`'s rule."""
        if self.config.problem_type is not None:
            return self.config.problem_type == "single_label_classification"
        return self.num_labels > 1 and labels.dtype in (torch.long, torch.int)

    def _last_token_index(self, input_ids, attention_mask, batch, length, device) -> torch.Tensor:
        positions = torch.arange(length, device=device)
        if attention_mask is not None:
            real = attention_mask[:, -length:].to(device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(device) != self.config.pad_token_id
        else:
            if batch > 1 and input_ids is None:
                logger.warning_once("no attention_mask or pad_token_id: classifying on the last position of each row")
            return torch.full((batch,), length - 1, device=device)
        # rightmost real token; rows without any fall back to the last position
        last = torch.where(real, positions, -1).max(dim=-1).values
        return torch.where(last >= 0, last, length - 1)


__all__ = [
    "HybridLMPreTrainedModel",
    "HybridLMModel",
    "HybridLMForCausalLM",
    "HybridLMForSequenceClassification",
]
