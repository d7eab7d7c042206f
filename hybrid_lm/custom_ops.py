"""Helpers shared by the Triton op files: the torch.library namespace, when to use the custom ops, input checks."""

import re

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def op_namespace(module_name: str) -> str:
    """`hybrid_lm` for the installed package; a distinct namespace for a copy of the files that transformers
    loaded next to a checkpoint (trust_remote_code), so both can register their ops in one process."""
    package = module_name.rpartition(".")[0]
    if package == "hybrid_lm":
        return "hybrid_lm"
    return "hybrid_lm_" + re.sub(r"\W", "_", package)


def needs_custom_op(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must go through its custom op: while torch.compile traces, or when autograd records it.
    Otherwise the kernels are launched directly, saving the dispatcher's tens of microseconds per call."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def require_float_inputs(op: str, **tensors: torch.Tensor | None) -> None:
    """Raises TypeError unless every given tensor is float32, bfloat16 or float16."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{op}: {name} is {tensor.dtype}; the Triton kernels take float32, bfloat16 or float16 "
                f"(use kernel_backend='torch' for other dtypes)"
            )
