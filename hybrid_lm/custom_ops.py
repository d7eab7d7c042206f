"""Helpers shared by the files that define torch.library custom ops (the Mamba Triton kernels, the experts' grouped
product): the op namespace, the devices and dtypes the Triton kernels take, and the `@triton.heuristics` of optional inputs.

No import of triton here: experts_ops.py and the `torch` tier import this file on machines without it.
"""

import os
import re

import torch

try:  # a tensor-parallel plan hands over DTensors, which the kernels do not take
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has none
    DTensor = ()

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def op_namespace(module_name: str) -> str:
    """`hybrid_lm` for the installed package; a distinct namespace for a copy of the files that transformers
    loaded next to a checkpoint (trust_remote_code), so both can register their ops in one process."""
    package = module_name.rpartition(".")[0]
    if package == "hybrid_lm":
        return "hybrid_lm"
    return "hybrid_lm_" + re.sub(r"\W", "_", package)


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels run on tensors of `device`: CUDA ones, or CPU ones in Triton's interpreter
    (TRITON_INTERPRET=1, which the tests set; triton reads it when imported)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def tier_runs_on(backend: str, *tensors: torch.Tensor | None) -> bool:
    """Whether a fused kernel may compute on `tensors` (None skipped) for `config.kernel_backend` = `backend`: all on
    one device and none a DTensor, on CUDA unless "torch", on CPU (Triton's interpreter) only for "triton". Decided
    from types and devices only, so the same in eager mode, under torch.compile and in CUDA graphs."""
    given = [t for t in tensors if t is not None]
    device = given[0].device
    return ((backend != "torch" if device.type == "cuda" else backend == "triton" and triton_runs_on(device))
            and all(t.device == device and not isinstance(t, DTensor) for t in given))


def has_triton_dtypes(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor is float32, bfloat16 or float16 (None counts as given)."""
    return all(t is None or t.dtype in TRITON_DTYPES for t in tensors)


def require_triton_dtypes(op: str, **tensors: torch.Tensor | None) -> None:
    """Raises TypeError unless every given tensor is float32, bfloat16 or float16."""
    for name, tensor in tensors.items():
        if not has_triton_dtypes(tensor):
            raise TypeError(
                f"{op}: {name} is {tensor.dtype}; the Triton kernels take float32, bfloat16 or float16 "
                f"(use kernel_backend='torch' for other dtypes)"
            )


def eager_or_op(launch, op):
    """A function that calls `launch`, the launcher of the custom op `op`: through `op` while torch.compile (or
    export) traces, which must see the op as one node, and directly otherwise. The op's dispatch costs about 50 us
    of host time a call on the H200 machine, and an eager training step makes four such calls a Mamba layer."""

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else launch(*args)

    call.__name__ = call.__qualname__ = launch.__name__
    return call


def given_flags(**pointers: str) -> dict:
    """Values for `@triton.heuristics` that set each HAS_* constexpr flag to whether its tensor argument was
    given: `@triton.heuristics(given_flags(HAS_D="D_ptr"))` compiles the D skip in only when D is not None."""
    return {flag: (lambda args, pointer=pointer: args[pointer] is not None) for flag, pointer in pointers.items()}
