"""Every difference between the supported transformers releases (5.17 up to the newest 5.x), in one place.

Each entry names the releases it serves and when it can go. Nothing else in hybrid_lm looks at the
transformers version.
"""

import functools

from packaging import version
from transformers import __version__ as _transformers_version

TRANSFORMERS_VERSION = version.parse(_transformers_version)
_CACHE_RENAMED = TRANSFORMERS_VERSION >= version.parse("5.24.0.dev0")

# 1. The cache argument and output field: `past_key_values` up to 5.23, `cache` from 5.24 (where the old name
#    is deprecated until 5.40). Our forwards take `cache`; this is the name generate() passes and reads back,
#    and the name our outputs are built with. Goes when the minimum supported release is 5.24.
CACHE_NAME = "cache" if _CACHE_RENAMED else "past_key_values"
_OLD_CACHE_NAMES = ("past_key_values",)


def accepts_cache_alias(forward):
    """Lets `forward(cache=...)` also be called with the name generate() uses on this release.

    From 5.24 on, `past_key_values=` is deprecated the way transformers deprecates it (its `deprecate_kwarg`,
    a FutureWarning until 5.40). Up to 5.23 it is the current name, so it is renamed without a warning.
    Goes (with `CACHE_NAME`) when the minimum supported release is 5.24: then plain `deprecate_kwarg`.
    """
    if _CACHE_RENAMED:
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def renamed(self, *args, **kwargs):
        for old in _OLD_CACHE_NAMES:
            if old in kwargs:
                if kwargs.get("cache") is not None:
                    raise ValueError(f"pass the cache once: as `cache` or as `{old}`, not both")
                kwargs["cache"] = kwargs.pop(old)
        return forward(self, *args, **kwargs)

    return renamed


def cache_output(cache) -> dict:
    """The cache as a keyword for a transformers `ModelOutput`: `{CACHE_NAME: cache}`."""
    return {CACHE_NAME: cache}


# 2. Reading a Mamba layer's states: `Cache.get_conv_state` / `get_recurrent_state` exist from 5.23 on; before,
#    the states are read from the layer object (same tensors, same semantics: None until the first update).
#    Goes when the minimum supported release is 5.23.
def conv_state(cache, layer_idx: int):
    """The (B, D, d_conv - 1) conv state of a linear-attention cache layer, or None before its first update."""
    if hasattr(cache, "get_conv_state"):
        return cache.get_conv_state(layer_idx)
    layer = cache.layers[layer_idx]
    return layer.conv_states[0] if layer.has_previous_state[0] else None


def recurrent_state(cache, layer_idx: int):
    """The (B, D, N) SSM state of a linear-attention cache layer, or None before its first update."""
    if hasattr(cache, "get_recurrent_state"):
        return cache.get_recurrent_state(layer_idx)
    layer = cache.layers[layer_idx]
    return layer.recurrent_states[0] if layer.has_previous_state[0] else None


# 3. Activation checkpointing: `model.activation_checkpointing_enable` from 5.23 on, where the old
#    `gradient_checkpointing_enable` is deprecated (until v6); 5.17 has only the old name. Goes when the minimum
#    supported release is 5.23.
def enable_activation_checkpointing(model, checkpointing_kwargs: dict | None = None) -> None:
    """Turns on activation (gradient) checkpointing of `model`'s decoder layers."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)


# 4. Token counts of Mamba cache layers: from 5.25 on a linear-attention cache layer counts the tokens it has seen,
#    and `Cache.get_seq_length()` (generate's count of what the cache holds) reads layer 0's count even when layer 0
#    is a Mamba layer; up to 5.24 it read the first attention layer's. The layer adds the width of what
#    `update_conv_state` gets (transformers' own mixers pass the whole conv input) and one per `increase_count` (their
#    in-place decode step). Our mixer stores the kernels' final conv state instead, the last d_conv - 1 inputs with
#    earlier documents of a packed row masked out, which the layer cannot rebuild from the input, so the count is
#    corrected here. Goes (to plain update_conv_state / increase_count) when the minimum supported release is 5.25.
def store_mamba_states(cache, layer_idx: int, conv_state, ssm_state, new_tokens: int) -> None:
    """Stores a prefill's (or a prefill chunk's) final states in a linear-attention cache layer: the conv state
    (B, D, d_conv - 1), the SSM state (B, D, N), and a count of `new_tokens` more tokens where the layer counts.
    The conv state has the width the layer keeps, so `update_conv_state` (append, keep the last columns) stores it
    as it is."""
    cache.update_conv_state(conv_state, layer_idx)
    cache.update_recurrent_state(ssm_state, layer_idx)
    counted = getattr(cache.layers[layer_idx], "cumulative_length_linear", None)
    if counted is not None:
        counted.add_(new_tokens - conv_state.shape[-1])  # update_conv_state counted the state's width


def count_decoded_token(cache, layer_idx: int) -> None:
    """Counts the token a decode step wrote into a linear-attention cache layer's states in place."""
    if hasattr(cache, "increase_count"):
        cache.increase_count(layer_idx, 0)


# 5. Assisted decoding (a draft model, prompt lookup): from 5.25 on transformers runs it for Mamba models. It has the
#    cache record its past (`activate_past_recording(recurrent_states_to_keep=...)`); a recording Mamba layer then
#    stores its whole conv input and the SSM state after each of the last `get_recurrent_states_to_keep` tokens, so
#    that `crop` can take rejected draft tokens off. Up to 5.24 transformers refuses assisted decoding for a model
#    with `_is_stateful`, and nothing records. Goes when the minimum supported release is 5.25.
def records_past(cache, layer_idx: int) -> bool:
    """Whether `cache`'s layer `layer_idx` records its past for assisted decoding (False for no cache)."""
    return cache is not None and hasattr(cache, "get_recurrent_states_to_keep") and cache.is_recording_past(layer_idx)


def recurrent_states_to_keep(cache, layer_idx: int) -> int:
    """How many of the last SSM states a recording cache layer keeps (for as many draft tokens)."""
    return cache.get_recurrent_states_to_keep(layer_idx) or 0
