"""Which cache a `generate` call decodes from: on a CUDA device, by default, a static cache the model keeps.

transformers compiles the decode step (`torch.compile(mode="reduce-overhead")`, CUDA graphs) whenever `generate`
runs from a static cache on a GPU. But `cache_implementation="static"` builds a new `StaticCache` for every call,
and CUDA graphs are recorded against the addresses of the cache tensors, so every call re-records them. Here the
model keeps one static cache per (batch size, device, dtype), resets it at the start of each call and passes it
to `generate` as the user's own cache would be: graphs are recorded on the first call of a shape and replayed by
every later one. A cache grows (and the graphs are recorded again) only when a call needs more tokens than it
holds, in steps of `LENGTH_STEP`; the caches, and with them their memory, live and die with the model.

Greedy search and sampling then decode with `decoding_hybrid_lm.decode_with_graphs` (passed as generate's
`custom_generate`), which replays one CUDA graph per kept cache; other modes (beam search) take transformers'
own loop over its compiled step. Nothing here is a private transformers hook: `generate` is called with a public
`StaticCache` as its cache argument and, for those modes, a `custom_generate` callable.
"""

import copy
import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import StaticCache
from transformers.generation import GenerationMode
from transformers.utils import logging

from .decoding_hybrid_lm import DecodeStep, decode_with_graphs
from .transformers_compat import CACHE_NAME

logger = logging.get_logger(__name__)

# Cache lengths are multiples of this, so calls of slightly different lengths share one cache and its graphs; the
# cost is attention over up to LENGTH_STEP - 1 masked positions a step.
LENGTH_STEP = 256

# A call that passes its own cache object decodes from it.
_CACHE_ARGUMENTS = (CACHE_NAME, "past_key_values")

# At most this many caches (batch sizes) are kept; the least recently used goes first.
KEPT_CACHES = 4


@dataclass
class _KeptCache:
    device: torch.device
    dtype: torch.dtype
    length: int
    cache: StaticCache
    step: DecodeStep | None = None  # the loop's decode step over `cache`, built at its first use


class StaticDecodingCaches:
    """The static caches of one model, one per batch size (on the model's device and dtype), each grown in steps
    of LENGTH_STEP, at most KEPT_CACHES of them; with each, the decode step `decode_with_graphs` replays, and one
    CUDA-graph memory pool for all of them."""

    def __init__(self):
        self._caches: OrderedDict[int, _KeptCache] = OrderedDict()  # batch size -> kept, least recently used first
        self._graph_pool = None

    def __len__(self) -> int:
        return len(self._caches)

    def take(self, config, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> StaticCache:
        """A reset static cache of `batch` rows and at least `length` tokens, for a model on `device` in `dtype`."""
        kept = self._caches.pop(batch, None)
        if kept is not None and (kept.device, kept.dtype) == (device, dtype) and kept.length >= length:
            kept.cache.reset()
        else:
            del kept  # free the smaller (or stale) cache, and its graph, before allocating the new one
            while len(self._caches) >= KEPT_CACHES:
                self._caches.popitem(last=False)
            length = -(-length // LENGTH_STEP) * LENGTH_STEP
            kept = _KeptCache(device, dtype, length, StaticCache(config=config, max_cache_len=length))
        self._caches[batch] = kept
        return kept.cache

    def decode_step(self, model, cache: StaticCache) -> DecodeStep:
        """The decode step over `cache` (one of the kept ones, reset and not yet prefilled): built at the first
        call, on CUDA captured in a CUDA graph then, and kept with the cache."""
        kept = next(kept for kept in self._caches.values() if kept.cache is cache)
        if kept.step is None:
            batch = next(b for b, k in self._caches.items() if k is kept)
            on_cuda = kept.device.type == "cuda"
            kept.step = DecodeStep(model, cache, batch, kept.length, compile=on_cuda)
            if on_cuda:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                kept.step.capture(self._graph_pool)
        return kept.step


def static_decoding_kwargs(model, inputs, generation_config, kwargs: dict) -> dict | None:
    """The keyword arguments (`generation_config` among them) that make `model.generate(inputs, **them)` decode
    from one of the model's kept static caches, or None when the call should run as given.

    It applies on a CUDA device: by default when the call names no cache, and when it asks for
    `cache_implementation="static"` (on CPU that is transformers' own static cache: there are no graphs to keep).
    A call the static path cannot serve runs as given, and when that was the default, the reason is logged once.
    """
    if not records_graphs(model) or any(kwargs.get(name) is not None for name in _CACHE_ARGUMENTS):
        return None
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    config.update(**kwargs)
    if config.cache_implementation not in (None, "static") or config.use_cache is False:
        return None
    if config.cache_implementation is None and config.disable_compile:
        return None

    reason = _why_not_static(model)
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    if reason is None and mode == GenerationMode.ASSISTED_GENERATION:
        # transformers has the cache record its past (for good) to crop rejected draft tokens off: a kept cache would
        # go on recording in later calls, and a recording cache has no fixed addresses to replay graphs on
        reason = "assisted decoding has the cache record its past"
    if reason is not None:
        if config.cache_implementation is None:
            logger.warning_once(f"generate: decoding from the dynamic cache, not the static one (no CUDA graphs), "
                                f"because {reason}. Pass cache_implementation='dynamic' to choose it yourself.")
        return None
    prompt = _prompt(inputs, kwargs)
    if prompt is None:
        return None
    batch, prompt_length, from_embeds = prompt
    # unset settings take transformers' defaults: one beam, one sequence, max_length 20
    rows = batch * max(config.num_beams or 1, config.num_return_sequences or 1)
    max_length = config.max_length or 20
    if config.max_new_tokens is not None:
        length = prompt_length + config.max_new_tokens
    elif from_embeds:  # max_length counts only the new tokens when generating from embeddings
        length = prompt_length + max_length
    else:
        length = max(max_length, prompt_length + 1)
    cache = model.static_decoding_caches.take(model.config, rows, length, model.device, model.dtype)
    new_kwargs = {key: value for key, value in kwargs.items() if key != "cache_implementation"}
    new_kwargs[CACHE_NAME] = cache
    base = generation_config if generation_config is not None else model.generation_config
    if base.cache_implementation is not None:  # transformers refuses a cache object together with an implementation
        base = copy.deepcopy(base)
        base.cache_implementation = None
    new_kwargs["generation_config"] = base if base is not model.generation_config else generation_config
    reason = _why_not_graph_loop(config, mode, kwargs, from_embeds)
    if reason is None:
        # transformers hands a custom loop no streamer: it is bound here (generate still streams the prompt)
        new_kwargs["custom_generate"] = functools.partial(decode_with_graphs, streamer=kwargs.get("streamer"))
    else:
        logger.info_once(f"generate: decoding with transformers' loop over its compiled step, not hybrid_lm's "
                         f"graph loop, because {reason}")
    return new_kwargs


def _why_not_graph_loop(config, mode: GenerationMode, kwargs: dict, from_embeds: bool) -> str | None:
    """Why `decoding_hybrid_lm.decode_with_graphs` cannot run a call (merged generation config `config`, the
    call's generation mode and keyword arguments), or None when it can: greedy search and sampling, with any logits
    processors, stopping criteria and streamer."""
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"the call asks for {mode.value.replace('_', ' ')}"
    if kwargs.get("custom_generate") is not None:
        return "the call brings its own decoding loop (custom_generate)"
    if kwargs.get("synced_gpus"):
        return "the call decodes in step with other processes (synced_gpus)"
    if config.disable_compile:
        return "compilation is disabled (disable_compile)"
    if config.stop_strings is not None:
        return "the call has stop strings (transformers gives a custom loop no tokenizer to match them with)"
    if config.return_dict_in_generate and (config.output_attentions or config.output_hidden_states):
        return "the call asks for attentions or hidden states of every step"
    if from_embeds:
        return "the prompt is given as inputs_embeds"
    return None


def records_graphs(model) -> bool:
    """Whether transformers compiles `model`'s decode step with CUDA graphs (its test: a CUDA device)."""
    return model.device.type == "cuda"


def _why_not_static(model) -> str | None:
    """What keeps transformers from compiling the decode step of `model` (its own tests), or None."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        return f"the {type(quantizer).__name__} quantization cannot be compiled"
    devices = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) > 1 or devices & {"cpu", "disk"}:
        return f"the model is spread over {sorted(map(str, devices))} (device_map)"
    if "sliding_attention" in model.config.layer_types:
        # transformers' StaticSlidingWindowLayer branches on a Python int (how full the window is) at every step:
        # a recorded graph would replay one branch, and compiling the step recompiles as the int changes
        return "its sliding-window attention layers keep their fill level in a Python int, which a CUDA graph cannot replay"
    return None


def _prompt(inputs, kwargs: dict) -> tuple[int, int, bool] | None:
    """(batch, prompt length, given as embeddings) of a generate call, or None when it cannot be read."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 2:
        return inputs.shape[0], inputs.shape[1], False
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids.shape[0], ids.shape[1], False
    embeds = kwargs.get("inputs_embeds")
    if inputs is None and ids is None and isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return embeds.shape[0], embeds.shape[1], True
    return None
