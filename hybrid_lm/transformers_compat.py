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
