"""One dispatch function per Mamba op: the mixer calls these, never a backend directly.

Backends (DESIGN.md, "three tiers"):
- `torch`: the exact reference in ssm_ops.py / conv_ops.py; always present, any device and dtype.
- `triton`: triton_ssm.py / triton_conv.py; CUDA tensors (or Triton's CPU interpreter,
  TRITON_INTERPRET=1), float32 / bfloat16 / float16.
- `cuda`: mamba-ssm's and causal-conv1d's compiled kernels (cuda_ops.py). They lack an initial state,
  `seq_idx` and a differentiable final state: such calls run on `triton` instead (logged once).

`resolve_backend` maps `config.kernel_backend` to a backend for the tensors' device once per process and
logs the choice. `"auto"` takes, on CUDA, `cuda` if importable, else `triton`, else `torch` (on CPU always
`torch`), and only after the candidate passed a tiny self-check against the reference on that device;
one that fails is skipped with a warning. A backend asked for by name must be installed: otherwise the
error says how to install it. Inside `torch.compile` tracing no self-check runs (it would launch kernels
on fake tensors): run one eager step first to get it.
"""

import os
from types import SimpleNamespace

import torch
from transformers.utils import logging

from .conv_ops import causal_conv1d_ref, causal_conv1d_update_ref
from .ssm_ops import selective_scan_ref, selective_state_update_ref

logger = logging.get_logger(__name__)

_resolved: dict[tuple[str, str], str] = {}
_modules: dict[str, object] = {}
_import_errors: dict[str, ImportError] = {}
_announced: set[str] = set()


def _load(backend: str):
    """The ops of a fast backend, or None when they cannot be imported (the error is kept).

    The imports name their modules (`from .triton_ssm import ...`) so that transformers' remote-code loader,
    which finds sibling files by such lines, copies the kernel files next to a saved checkpoint."""
    if backend not in _modules and backend not in _import_errors:
        try:
            if backend == "triton":
                from .triton_conv import causal_conv1d_triton, causal_conv1d_update_triton
                from .triton_ssm import selective_scan_triton, selective_state_update_triton

                _modules[backend] = SimpleNamespace(
                    selective_scan=selective_scan_triton, selective_state_update=selective_state_update_triton,
                    causal_conv1d=causal_conv1d_triton, causal_conv1d_update=causal_conv1d_update_triton,
                )
            else:
                from .cuda_ops import (
                    causal_conv1d_cuda_ext,
                    causal_conv1d_update_cuda_ext,
                    conv_supports,
                    scan_supports,
                    selective_scan_cuda_ext,
                )

                _modules[backend] = SimpleNamespace(
                    selective_scan=selective_scan_cuda_ext, causal_conv1d=causal_conv1d_cuda_ext,
                    causal_conv1d_update=causal_conv1d_update_cuda_ext, scan_supports=scan_supports,
                    conv_supports=conv_supports,
                )
        except ImportError as error:
            _import_errors[backend] = error
    return _modules.get(backend)


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "triton":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return device.type == "cuda"


def _announce(message: str, warning: bool = False) -> None:
    if message not in _announced and not torch.compiler.is_compiling():
        _announced.add(message)
        (logger.warning if warning else logger.info)(message)


def resolve_backend(requested: str, device: torch.device) -> str:
    """Maps `config.kernel_backend` ("auto", "torch", "triton", "cuda") to the backend that will run on `device`."""
    key = (requested, device.type)
    if key in _resolved:
        return _resolved[key]
    if requested == "torch":
        backend = "torch"
    elif requested in ("triton", "cuda"):
        if _load(requested) is None:
            raise ImportError(
                f"kernel_backend={requested!r} is not available: {_import_errors[requested]} "
                f"(or use kernel_backend='auto')"
            )
        if not _runs_on(requested, device):
            raise ValueError(
                f"kernel_backend={requested!r} runs on CUDA tensors, got {device.type} ones; "
                f"move the model to a GPU or use kernel_backend='auto'"
            )
        backend = requested
    elif requested == "auto":
        backend = "torch"
        for candidate in ("cuda", "triton"):
            if device.type == "cuda" and _load(candidate) is not None and _passes_self_check(candidate, device):
                backend = candidate
                break
    else:
        raise ValueError(f"kernel_backend ({requested!r}) must be one of 'auto', 'torch', 'triton', 'cuda'")
    if not torch.compiler.is_compiling():
        _resolved[key] = backend
    _announce(f"hybrid_lm: Mamba ops run on the '{backend}' backend (kernel_backend={requested!r}, {device.type})")
    return backend


def _passes_self_check(backend: str, device: torch.device) -> bool:
    """Runs every op of `backend` once on tiny random inputs against the reference; False (with a
    warning) on an error or a mismatch. Skipped (True) while torch.compile traces."""
    if torch.compiler.is_compiling():
        return True
    try:
        # the check runs backward passes: it must work when the first call comes from generate() (no_grad) too,
        # and it compares float32 results: an autocast region around the first call must not lower them
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            _self_check(backend, device)
    except Exception as error:  # any failure of a fast tier means: use the next one
        _announce(f"hybrid_lm: the '{backend}' Mamba kernels failed their self-check on {device} and are "
                  f"not used: {error}", warning=True)
        return False
    return True


def _self_check(backend: str, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    batch, channels, length, d_state, width = 2, 8, 24, 4, 4
    u, delta, z = rand(batch, channels, length), rand(batch, channels, length, scale=0.5), rand(batch, channels, length)
    A = -torch.rand(channels, d_state, generator=generator).to(device) - 0.5
    B, C, D, bias = rand(batch, d_state, length), rand(batch, d_state, length), rand(channels), rand(channels, scale=0.3)
    grad_out = rand(batch, channels, length)

    # 1. the scan, output and every gradient
    def scan_with_grads(fn):
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
        out = fn(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)
        out.backward(grad_out)
        return [out] + [t.grad for t in leaves]

    fast = scan_with_grads(lambda *a, **k: selective_scan(*a, **k, backend=backend))
    for name, expected, actual in zip(("out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias"),
                                      scan_with_grads(selective_scan_ref), fast):
        _require_close(f"selective_scan {name}", actual, expected)

    # 2. the conv and the two decoding steps
    x, conv_state, weight, state = rand(batch, channels, length), rand(batch, channels, width - 1), rand(channels, width), rand(batch, channels, d_state)
    step = (u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias, True)
    _require_close("causal_conv1d", causal_conv1d(x, weight, bias, activation="silu", backend=backend),
                   causal_conv1d_ref(x, weight, bias, activation="silu"))
    _require_close("causal_conv1d_update",
                   causal_conv1d_update(x[..., 0], conv_state.clone(), weight, bias, "silu", backend=backend),
                   causal_conv1d_update_ref(x[..., 0], conv_state.clone(), weight, bias, "silu"))
    _require_close("selective_state_update", selective_state_update(state.clone(), *step, backend=backend),
                   selective_state_update_ref(state.clone(), *step))


def _require_close(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()
    if not error < 1e-3:  # NaN fails too
        raise RuntimeError(f"{what} differs from the reference by {error:.2e} (relative)")


def _fast_dtype(*tensors) -> bool:
    return all(t is None or t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, seq_idx=None, return_final_state=False, backend="torch"):
    """See `ssm_ops.selective_scan_ref` for shapes; `backend` comes from `resolve_backend`."""
    args = (u, delta, A, B, C, D, z, delta_bias)
    if backend == "cuda":
        cuda = _load("cuda")
        if cuda.scan_supports(*args, initial_state, seq_idx, return_final_state):
            return cuda.selective_scan(*args, delta_softplus, return_final_state)
        _announce("hybrid_lm: mamba-ssm's scan has no initial state, seq_idx or final-state gradient (and wants "
                  "delta, B, C, z in u's dtype); such calls run on the 'triton' backend")
        backend = "triton" if _load("triton") is not None else "torch"
    if backend == "triton" and _fast_dtype(u, delta, B, C, z):
        return _load("triton").selective_scan(
            *args, delta_softplus, initial_state, seq_idx, return_final_state
        )
    return selective_scan_ref(*args, delta_softplus, initial_state, seq_idx, return_final_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend="torch"):
    """See `ssm_ops.selective_state_update_ref` for shapes. mamba-ssm's decoding step is itself a Triton
    kernel, so the `cuda` backend uses ours."""
    if backend in ("cuda", "triton") and _load("triton") is not None and _fast_dtype(state, x, dt, B, C, z):
        return _load("triton").selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def causal_conv1d(x, weight, bias=None, initial_state=None, seq_idx=None, activation=None,
                  return_final_state=False, backend="torch"):
    """See `conv_ops.causal_conv1d_ref` for shapes."""
    if backend == "cuda":
        cuda = _load("cuda")
        if cuda.conv_supports(x, weight, bias, initial_state, seq_idx, return_final_state):
            return cuda.causal_conv1d(x, weight, bias, activation)
        _announce("hybrid_lm: causal-conv1d takes no initial state, seq_idx or final state here (nor widths "
                  "outside 2..4 or a bias of another dtype than the weight); such calls run on the 'triton' backend")
        backend = "triton" if _load("triton") is not None else "torch"
    if backend == "triton" and _fast_dtype(x, weight, bias, initial_state):
        return _load("triton").causal_conv1d(
            x, weight, bias, initial_state, seq_idx, activation, return_final_state
        )
    return causal_conv1d_ref(x, weight, bias, initial_state, seq_idx, activation, return_final_state)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend="torch"):
    """See `conv_ops.causal_conv1d_update_ref` for shapes."""
    if backend == "cuda" and _load("cuda").conv_supports(x, weight, bias):
        return _load("cuda").causal_conv1d_update(x, conv_state, weight, bias, activation)
    if backend in ("cuda", "triton") and _load("triton") is not None and _fast_dtype(x, conv_state, weight, bias):
        return _load("triton").causal_conv1d_update(x, conv_state, weight, bias, activation)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
