"""The Mamba kernel tiers, and how a model picks one.

A mixer calls `self.kernels.selective_scan(...)` (and `selective_state_update`, `causal_conv1d`,
`causal_conv1d_update`), where `kernels` is an instance of one of the classes below, bound once per device
(`HybridLMMambaMixer.kernels_for`). The contracts and shape legends of the four ops are the docstrings of
mamba_scan_ref.py and mamba_conv_ref.py.

Tiers (DESIGN.md, "three tiers"), each a subclass of the one it falls back to: a call a tier cannot serve
goes to `super()`.
- `MambaKernels` ("torch"): the exact references; always present, any device and dtype.
- `TritonKernels` ("triton"): mamba_scan_triton.py / mamba_conv_triton.py, on CUDA tensors (or anywhere in
  Triton's CPU interpreter, TRITON_INTERPRET=1), float32 / bfloat16 / float16; other dtypes run the reference.
- `CudaKernels` ("cuda"): mamba-ssm's and causal-conv1d's compiled kernels (mamba_cuda.py) for the scan and
  the conv. What they lack (an initial state, `seq_idx`, a differentiable final state, mixed dtypes; the
  scan's decoding step) runs on the Triton tier, logged once.

`select_kernels(config.kernel_backend, device)` builds the tier for a device and logs the choice once.
`"auto"` takes, on CUDA, `cuda` if installed, else `triton`, else `torch` (on CPU always `torch`), each only
after it passed a tiny self-check against the reference on that device; one that fails is skipped with a
warning. A tier named explicitly must be installed (otherwise the error gives the install command) and able to
run on the device. Inside torch.compile tracing no self-check runs (it would launch kernels on fake tensors):
run one eager step first.
"""

import torch
from transformers.utils import logging

from .configuration_hybrid_lm import check_kernel_backend
from .custom_ops import has_triton_dtypes, triton_runs_on
from .mamba_conv_ref import causal_conv1d_ref, causal_conv1d_update_ref
from .mamba_scan_ref import selective_scan_ref, selective_state_update_ref

# The fast tiers' packages are optional: a missing one is kept and raised, with its install command, when the
# tier is asked for. (transformers' remote-code checks skip imports inside try blocks; it still copies the files.)
try:
    from .mamba_conv_triton import MAX_WIDTH as MAX_CONV_WIDTH
    from .mamba_conv_triton import causal_conv1d_triton, causal_conv1d_update_triton
    from .mamba_scan_triton import selective_scan_triton, selective_state_update_triton
except ImportError as error:
    _TRITON_ERROR: ImportError | None = error
else:
    _TRITON_ERROR = None
try:
    from .mamba_cuda import (
        causal_conv1d_cuda_ext,
        causal_conv1d_update_cuda_ext,
        conv_supports,
        scan_supports,
        selective_scan_cuda_ext,
    )
except ImportError as error:
    _CUDA_ERROR: ImportError | None = error
else:
    _CUDA_ERROR = None

logger = logging.get_logger(__name__)


def _log_once(message: str) -> None:
    if not torch.compiler.is_compiling():
        logger.info_once(message)


class MambaKernels:
    """The `torch` tier: the exact references (mamba_scan_ref.py, mamba_conv_ref.py), and the four ops every tier
    has, with the references' signatures. Tiers are stateless apart from their tile settings."""

    name = "torch"

    def __init__(self):
        error = self.import_error()
        if error is not None:
            raise ImportError(
                f"kernel_backend={self.name!r} is not available: {error} (or use kernel_backend='auto')"
            ) from error

    @classmethod
    def import_error(cls) -> ImportError | None:
        """Why this tier cannot be built here (a missing package), or None."""
        return None

    @classmethod
    def runs_on(cls, device: torch.device) -> bool:
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def selective_scan(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, seq_idx=None, return_final_state=False):
        """`mamba_scan_ref.selective_scan_ref`."""
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                                  return_final_state)

    def selective_state_update(self, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        """`mamba_scan_ref.selective_state_update_ref`."""
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

    def causal_conv1d(self, x, weight, bias=None, initial_state=None, seq_idx=None, activation=None,
                      return_final_state=False):
        """`mamba_conv_ref.causal_conv1d_ref`."""
        return causal_conv1d_ref(x, weight, bias, initial_state, seq_idx, activation, return_final_state)

    def causal_conv1d_update(self, x, conv_state, weight, bias=None, activation=None):
        """`mamba_conv_ref.causal_conv1d_update_ref`."""
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)


class TritonKernels(MambaKernels):
    """The `triton` tier. `scan_tiles` (a `mamba_scan_triton.ScanTiles`) and `conv_tiles` (a
    `mamba_conv_triton.ConvTiles`) set the kernels' tile sizes, None their defaults; tests pass small ones to cross
    several chunks and programs on tiny inputs."""

    name = "triton"

    def __init__(self, scan_tiles=None, conv_tiles=None):
        super().__init__()
        self.scan_tiles = scan_tiles
        self.conv_tiles = conv_tiles

    @classmethod
    def import_error(cls) -> ImportError | None:
        return _TRITON_ERROR

    @classmethod
    def runs_on(cls, device: torch.device) -> bool:
        return triton_runs_on(device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scan_tiles={self.scan_tiles}, conv_tiles={self.conv_tiles})"

    def selective_scan(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, seq_idx=None, return_final_state=False):
        args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, return_final_state)
        if not has_triton_dtypes(u, delta, B, C, z):
            return super().selective_scan(*args)
        return selective_scan_triton(*args, tiles=self.scan_tiles)

    def selective_state_update(self, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        args = (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        if not has_triton_dtypes(state, x, dt, B, C, z):
            return super().selective_state_update(*args)
        return selective_state_update_triton(*args)

    def causal_conv1d(self, x, weight, bias=None, initial_state=None, seq_idx=None, activation=None,
                      return_final_state=False):
        args = (x, weight, bias, initial_state, seq_idx, activation, return_final_state)
        if not has_triton_dtypes(x, weight, bias, initial_state) or weight.shape[1] > MAX_CONV_WIDTH:
            return super().causal_conv1d(*args)
        return causal_conv1d_triton(*args, tiles=self.conv_tiles)

    def causal_conv1d_update(self, x, conv_state, weight, bias=None, activation=None):
        args = (x, conv_state, weight, bias, activation)
        if not has_triton_dtypes(x, conv_state, weight, bias):
            return super().causal_conv1d_update(*args)
        return causal_conv1d_update_triton(*args)


class CudaKernels(TritonKernels):
    """The `cuda` tier: mamba-ssm's scan and causal-conv1d's conv where they compute the call, the Triton tier
    for the rest (and for the scan's decoding step: mamba-ssm's is itself a Triton kernel)."""

    name = "cuda"

    @classmethod
    def import_error(cls) -> ImportError | None:
        return _CUDA_ERROR or _TRITON_ERROR

    @classmethod
    def runs_on(cls, device: torch.device) -> bool:
        return device.type == "cuda"

    def selective_scan(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, seq_idx=None, return_final_state=False):
        if scan_supports(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, return_final_state):
            return selective_scan_cuda_ext(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_final_state)
        _log_once("hybrid_lm: mamba-ssm's scan has no initial state, seq_idx or final-state gradient (and wants "
                  "delta, B, C, z in u's dtype); such calls run on the 'triton' backend")
        return super().selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                                      return_final_state)

    def causal_conv1d(self, x, weight, bias=None, initial_state=None, seq_idx=None, activation=None,
                      return_final_state=False):
        if conv_supports(x, weight, bias, initial_state, seq_idx):
            return causal_conv1d_cuda_ext(x, weight, bias, activation, return_final_state)
        _log_once("hybrid_lm: causal-conv1d takes no initial state or seq_idx here (nor widths outside 2..4 or a "
                  "bias of another dtype than the weight); such calls run on the 'triton' backend")
        return super().causal_conv1d(x, weight, bias, initial_state, seq_idx, activation, return_final_state)

    def causal_conv1d_update(self, x, conv_state, weight, bias=None, activation=None):
        if conv_supports(x, weight, bias):
            return causal_conv1d_update_cuda_ext(x, conv_state, weight, bias, activation)
        return super().causal_conv1d_update(x, conv_state, weight, bias, activation)


KERNEL_TIERS = {"torch": MambaKernels, "triton": TritonKernels, "cuda": CudaKernels}


def select_kernels(backend: "str | MambaKernels", device: torch.device) -> MambaKernels:
    """The tier that runs the Mamba ops on `device` for `backend`: a `config.kernel_backend` name ("auto",
    "torch", "triton", "cuda") or a tier instance. Raises ValueError for another name or a tier that cannot run
    on `device`, ImportError (with the install command) for a tier whose package is missing. Logs the choice once."""
    if isinstance(backend, MambaKernels):
        kernels, requested = backend, backend.name
    else:
        check_kernel_backend(backend)
        requested = backend
        kernels = _fastest_passing_tier(device) if backend == "auto" else KERNEL_TIERS[backend]()
    if not kernels.runs_on(device):
        raise ValueError(
            f"kernel_backend={kernels.name!r} runs on CUDA tensors, got {device.type} ones; "
            f"move the model to a GPU or use kernel_backend='auto'"
        )
    _log_once(f"hybrid_lm: Mamba ops run on the '{kernels.name}' backend (kernel_backend={requested!r}, {device})")
    return kernels


def _fastest_passing_tier(device: torch.device) -> MambaKernels:
    if device.type == "cuda":
        for tier in (CudaKernels, TritonKernels):
            if tier.import_error() is None:
                kernels = tier()
                if _passes_self_check(kernels, device):
                    return kernels
    return MambaKernels()


# ----------------------------------------------------------------------------- the self-check of "auto"

# (tier, device) -> whether the tier passed its self-check there: the one process-wide state of the kernel layer.
# The check runs every op of a tier forward and backward (the first launches compile the kernels: seconds), which
# every mixer of every model on that device would repeat otherwise; its answer cannot change within a process.
_SELF_CHECKED: dict[tuple[str, str], bool] = {}


def _passes_self_check(kernels: MambaKernels, device: torch.device) -> bool:
    """Whether `kernels` match the reference on tiny random inputs on `device` (cached in `_SELF_CHECKED`);
    False, with a warning, on an error or a mismatch. Skipped (True, not cached) while torch.compile traces."""
    if torch.compiler.is_compiling():
        return True
    key = (kernels.name, str(device))
    if key not in _SELF_CHECKED:
        try:
            # the check runs backward passes: it must work when the first call comes from generate() (no_grad) too,
            # and it compares float32 results: an autocast region around the first call must not lower them
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                _self_check(kernels, device)
            _SELF_CHECKED[key] = True
        except Exception as error:  # any failure of a fast tier means: use the next one
            logger.warning(f"hybrid_lm: the '{kernels.name}' Mamba kernels failed their self-check on {device} and "
                           f"are not used: {error}")
            _SELF_CHECKED[key] = False
    return _SELF_CHECKED[key]


def _self_check(kernels: MambaKernels, device: torch.device) -> None:
    """Raises unless every op of `kernels` (outputs and the scan's gradients) matches the reference."""
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

    for name, expected, actual in zip(("out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias"),
                                      scan_with_grads(selective_scan_ref), scan_with_grads(kernels.selective_scan)):
        _require_close(f"selective_scan {name}", actual, expected)

    # 2. the conv and the two decoding steps
    x, conv_state, weight, state = (rand(batch, channels, length), rand(batch, channels, width - 1),
                                    rand(channels, width), rand(batch, channels, d_state))
    step = (u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias, True)
    _require_close("causal_conv1d", kernels.causal_conv1d(x, weight, bias, activation="silu"),
                   causal_conv1d_ref(x, weight, bias, activation="silu"))
    _require_close("causal_conv1d_update",
                   kernels.causal_conv1d_update(x[..., 0], conv_state.clone(), weight, bias, "silu"),
                   causal_conv1d_update_ref(x[..., 0], conv_state.clone(), weight, bias, "silu"))
    _require_close("selective_state_update", kernels.selective_state_update(state.clone(), *step),
                   selective_state_update_ref(state.clone(), *step))


def _require_close(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()
    if not error < 1e-3:  # NaN fails too
        raise RuntimeError(f"{what} differs from the reference by {error:.2e} (relative)")
