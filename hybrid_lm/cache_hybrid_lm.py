"""Decoding cache of a hybrid stack: key/value tensors for attention layers, conv and SSM states for Mamba layers."""

import torch


class HybridLMCache:
    """Per-layer decoding state, each tensor on its own layer's device.

    Attention layer `i`: `key_cache[i]`, `value_cache[i]` of shape (B, kv_heads, S, head_dim), growing by
    concatenation (S = tokens seen, padding included). Mamba layer `i`: `conv_states[i]` (B, D, d_conv - 1),
    the last conv inputs, and `ssm_states[i]` (B, D, N) in float32. Tensors are created on first use.

    `transformers`' `generate` drives it through `get_seq_length`, `reorder_cache` (beam search) and the
    batch helpers below. It is not a `transformers.Cache`: that class's internals change between 5.x
    releases, and a Mamba state cannot be cropped, which `Cache` assumes.
    """

    is_compileable = False

    def __init__(self, config):
        self.layers_block_type = list(config.layers_block_type)
        self.signature = _signature(config)
        self.reset()

    def __repr__(self):
        return f"{type(self).__name__}(layers={len(self)}, seen_tokens={self.seen_tokens}, batch_size={self.batch_size})"

    def __len__(self):
        return len(self.layers_block_type)

    # --------------------------------------------------------------- layer updates
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Appends (B, kv_heads, L, head_dim) keys and values; returns all cached ones of the layer."""
        if self.key_cache[layer_idx] is None:
            self.key_cache[layer_idx], self.value_cache[layer_idx] = key_states, value_states
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key_states], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value_states], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def has_mamba_state(self, layer_idx: int) -> bool:
        return self.ssm_states[layer_idx] is not None

    def update_mamba_state(self, layer_idx: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self.conv_states[layer_idx], self.ssm_states[layer_idx] = conv_state, ssm_state

    def advance(self, num_tokens: int) -> None:
        """Called by the model once all layers have consumed `num_tokens` new positions."""
        self.seen_tokens += num_tokens

    # --------------------------------------------------------------- what generate calls
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def batch_size(self) -> int | None:
        for tensor in self._tensors():
            return tensor.shape[0]
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b of every state becomes row beam_idx[b], key/values and Mamba states alike."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def reset(self) -> None:
        """Forgets every state; the cache can then serve a new prompt."""
        n = len(self)
        self.key_cache: list[torch.Tensor | None] = [None] * n
        self.value_cache: list[torch.Tensor | None] = [None] * n
        self.conv_states: list[torch.Tensor | None] = [None] * n
        self.ssm_states: list[torch.Tensor | None] = [None] * n
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "HybridLMCache cannot be cropped: a Mamba state summarises the whole prefix and cannot be rolled back. "
            "Re-run the prompt instead (assisted and speculative decoding are not supported for this reason)."
        )

    # --------------------------------------------------------------- checks and helpers
    def check_compatible(self, config) -> None:
        """Raises if this cache was built for a model with another layer plan or state sizes."""
        if self.signature != _signature(config):
            raise ValueError(
                "past_key_values was created for a different model (layer plan or state sizes differ: "
                f"{self.signature} vs {_signature(config)}); pass the cache returned by this model, or none"
            )

    def _tensors(self):
        for group in (self.key_cache, self.value_cache, self.conv_states, self.ssm_states):
            yield from (t for t in group if t is not None)

    def _map(self, fn) -> None:
        for group in (self.key_cache, self.value_cache, self.conv_states, self.ssm_states):
            for i, tensor in enumerate(group):
                if tensor is not None:
                    group[i] = fn(tensor)


def _signature(config) -> tuple:
    return (
        tuple(config.layers_block_type),
        config.hidden_size,
        config.num_key_value_heads,
        config.head_dim,
        config.mamba_d_state,
        config.mamba_d_conv,
        config.mamba_expand,
    )


__all__ = ["HybridLMCache"]
