"""One dispatch function per Mamba op: the mixer calls these, never a backend directly.

Backends (DESIGN.md, "three tiers"): `torch` (the exact reference in ssm_ops.py / conv_ops.py) is always
present. The choice comes from `config.kernel_backend`; `resolve_backend` turns `"auto"` into the
fastest backend available for the tensors' device and logs the choice once.
"""

import torch
from transformers.utils import logging

from .conv_ops import causal_conv1d_ref, causal_conv1d_update_ref
from .ssm_ops import selective_scan_ref, selective_state_update_ref

logger = logging.get_logger(__name__)

_announced: set[tuple[str, str]] = set()


def resolve_backend(requested: str, device: torch.device) -> str:
    """Maps `config.kernel_backend` to the backend that will run on `device`."""
    if requested in ("triton", "cuda"):
        raise ValueError(
            f"kernel_backend={requested!r} is not available in this build of hybrid_lm; use 'torch' or 'auto'"
        )
    backend = "torch"
    key = (requested, device.type)
    if key not in _announced:
        _announced.add(key)
        logger.info(f"hybrid_lm: Mamba ops run on the '{backend}' backend (kernel_backend={requested!r}, {device.type})")
    return backend


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, seq_idx=None, return_final_state=False, backend="torch"):
    """See `ssm_ops.selective_scan_ref` for shapes."""
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                              return_final_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend="torch"):
    """See `ssm_ops.selective_state_update_ref` for shapes."""
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def causal_conv1d(x, weight, bias=None, initial_state=None, seq_idx=None, activation=None,
                  return_final_state=False, backend="torch"):
    """See `conv_ops.causal_conv1d_ref` for shapes."""
    return causal_conv1d_ref(x, weight, bias, initial_state, seq_idx, activation, return_final_state)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend="torch"):
    """See `conv_ops.causal_conv1d_update_ref` for shapes."""
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
