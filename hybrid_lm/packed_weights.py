"""Weights of projections that read the same input, packed into one tensor for inference.

A projection of a few rows (a decode step) is a latency-bound kernel of a few microseconds, so in forwards that
need no gradient the projections that read one input run as one matrix product over their packed weights: the
MLP's gate and up, attention's q, k and v, and a mixture's experts (grouped products that would otherwise stack
every expert's weights each forward). With gradients enabled the modules run their layers as they are.

Packing copies a group of parameters once into one tensor and makes each parameter's `.data` a view of its slice:
no memory is added after that moment, the parameters stay the same objects (optimizers keep them), in-place writes
(`load_state_dict`, optimizer steps) go through the views, and transformers' `save_pretrained` saves views of one
storage as separate tensors under their own keys. A move or conversion of the weights (`model.to(...)`, `.half()`)
or a replaced parameter ends the packing; the next inference forward packs again.
"""

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


class PackedWeights:
    """One group of parameters packed into one 1-D tensor, for forwards that need no gradient.

    `get(params)` returns the tensor whose consecutive slices are `params`, in order, packing them at the first
    call; None where packing does not apply: gradients are enabled, the parameters are not plain contiguous
    tensors of one device and dtype that own their storage (see `_packable`), or there was no memory to pack.
    In eager mode each call checks by address that the parameters still are the slices (and packs again where
    they are not); compiled code checks parameter identity only and never packs, so an eager forward must come
    first (the decode step's capture runs one), and the owning module drops the packing when its weights move
    (`PacksWeights`).
    """

    def __init__(self, what: str):
        self.what = what  # for the out-of-memory warning, e.g. "the experts' weights"
        self.reset()

    def reset(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.params: tuple[nn.Parameter, ...] = ()
        self.failed = False

    def get(self, params: list[nn.Parameter]) -> torch.Tensor | None:
        if torch.is_grad_enabled():
            return None
        if (self.tensor is not None and len(params) == len(self.params)
                and all(a is b for a, b in zip(params, self.params))):
            if torch.compiler.is_compiling() or _are_slices_of(self.tensor, params):
                return self.tensor
        if torch.compiler.is_compiling() or self.failed or not _packable(params):
            return None
        self.tensor, self.params = None, ()  # an outdated packing frees its memory first
        try:
            self.tensor = _pack(params)
        except torch.OutOfMemoryError:  # packing holds the group's weights twice, for a moment
            logger.warning_once(f"hybrid_lm: no memory to pack {self.what} for inference; they run unpacked "
                                "(slower decoding)")
            self.failed = True
            return None
        self.params = tuple(params)
        return self.tensor

    def __deepcopy__(self, memo):
        # a copy's parameters are new tensors: the copy packs its own at its first inference forward
        return PackedWeights(self.what)

    def __getstate__(self):
        return {"what": self.what}

    def __setstate__(self, state):
        self.__init__(state["what"])


class PacksWeights(nn.Module):
    """Base of the modules that hold `PackedWeights`: moving or converting their parameters ends the packing."""

    def _apply(self, fn, recurse=True):
        for value in vars(self).values():
            if isinstance(value, PackedWeights):
                value.reset()
        return super()._apply(fn, recurse)


def packed_linear(layers: list[nn.Module], weights: PackedWeights, biases: PackedWeights):
    """The packed weight (sum of out_features, in_features) and bias (sum of out_features,) or None of nn.Linear
    layers that read one input, for `F.linear`; None where packing does not apply (gradients enabled, or some
    layer is not a plain nn.Linear: a LoRA wrapper, a bitsandbytes layer, an accelerate hook)."""
    if torch.is_grad_enabled() or not all(is_plain_linear(layer) for layer in layers):
        return None
    weight = weights.get([layer.weight for layer in layers])
    if weight is None:
        return None
    if layers[0].bias is None:
        return weight.view(-1, layers[0].in_features), None
    bias = biases.get([layer.bias for layer in layers])
    return (weight.view(-1, layers[0].in_features), bias) if bias is not None else None


def is_plain_linear(layer: nn.Module) -> bool:
    """An nn.Linear itself (bitsandbytes layers subclass it) with no accelerate hook that moves its weights in."""
    return type(layer) is nn.Linear and not hasattr(layer, "_hf_hook")


def _packable(params: list[nn.Parameter]) -> bool:
    """Plain, contiguous tensors of one device and dtype, each the whole of its storage: not DTensors of a
    tensor-parallel plan, and not views into a buffer something else manages (FSDP's flat parameters, DeepSpeed's
    gathered partitions), whose packed copies would keep the gathered weights alive."""
    first = params[0]
    return all(p is not None and type(p.data) is torch.Tensor and p.is_contiguous() and p.device == first.device
               and p.dtype == first.dtype and p.untyped_storage().nbytes() == p.numel() * p.element_size()
               for p in params)


def _pack(params: list[nn.Parameter]) -> torch.Tensor:
    """Copies the parameters into one 1-D tensor and makes each parameter a view of its slice."""
    # Outside inference mode: a parameter made a view of an inference tensor could not be trained later.
    with torch.no_grad(), torch.inference_mode(False):
        packed = torch.cat([p.reshape(-1) for p in params])
        start = 0
        for param in params:
            param.data = packed[start:start + param.numel()].view(param.shape)
            start += param.numel()
    return packed


def _are_slices_of(packed: torch.Tensor, params: list[nn.Parameter]) -> bool:
    """Whether the parameters still are the consecutive slices of `packed` that `_pack` made them."""
    address, itemsize = packed.data_ptr(), packed.element_size()
    for param in params:
        if (param.data_ptr() != address or not param.is_contiguous() or param.dtype != packed.dtype
                or param.device != packed.device):
            return False
        address += param.numel() * itemsize
    return True
