"""Attention masks and packed-document ids for HybridLM.

Shape legend: B = batch, L = new tokens, S = cached + new tokens.
"""

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, L) positions that restart at 0 per packed document -> (B, L) document ids, or None if unpacked.

    Under torch.compile the ids are always returned (checking for restarts would branch on data); for an
    unpacked row they are constant, which changes nothing but the speed of the masked paths.
    """
    if position_ids.shape[1] < 2:
        return None
    if not torch.compiler.is_compiling() and not bool((position_ids[:, 1:] == 0).any()):
        return None
    return (position_ids == 0).cumsum(-1)


def build_attention_mask(
    padding_mask: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    batch: int,
    query_length: int,
    past_length: int,
    sliding_window: int | None,
    device: torch.device,
) -> torch.Tensor:
    """(B, 1, L, S) bool mask, True where query i (position past_length + i) may attend key j.

    Combines causality, padding (padding_mask (B, S), 1 = token), packed documents (seq_idx (B, L); the
    cached keys count as the first document of the chunk) and the sliding window. A query that may attend
    nothing (a padded row) attends everything instead, so no softmax row is empty; its output is unused.
    """
    total = past_length + query_length
    query_pos = torch.arange(past_length, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = key_pos <= query_pos  # (L, S)
    if sliding_window is not None:
        mask = mask & (query_pos - key_pos < sliding_window)
    mask = mask[None, None].expand(batch, 1, query_length, total)
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, :].bool()
    if seq_idx is not None:
        key_doc = torch.cat([seq_idx[:, :1].expand(-1, past_length), seq_idx], dim=1)
        mask = mask & (seq_idx[:, None, :, None] == key_doc[:, None, None, :])
    return mask | ~mask.any(dim=-1, keepdim=True)
