"""The decoding loop of greedy search and sampling on a CUDA model: each step's forward replayed from one CUDA graph,
and no host synchronisation per step.

transformers' own loop (`GenerationMixin._sample` over its compiled forward) spends about 1.5-2 ms of host time
per step around about 1 ms of GPU work on the bench config (benchmarks/RESULTS.md, "Generation"): it reads the
stop flag on the host every step (a sync, so the host cannot queue the next step while the GPU runs this one),
rebuilds masks and positions with ~30 small launches, and enters the compiled forward through dynamo's guards and
the CUDA-graph trees' bookkeeping. This loop keeps everything else of transformers: `generate` prepares the
generation config, the logits processors, the stopping criteria and the static cache, runs the prefill
(`_prefill`, chunked prefill included), and calls this loop through its public `custom_generate` hook. Per step
the loop applies those same processors and criteria; the forward of the one new token is a graph replay whose
inputs (the token, its position, the padding mask over the whole cache) sit at fixed addresses; the stop flag
and the streamed tokens reach the host one step late (transformers' `DeferredStopCheck`), and a step computed
past the stop is dropped.

Shape legend: B = batch rows, S = the static cache's length, V = vocabulary.
"""

import torch
from transformers.generation.utils import DeferredStopCheck, GenerateDecoderOnlyOutput, StopCheck

from .transformers_compat import CACHE_NAME

# Warm-up runs before a capture (the first also compiles): CUDA graphs must not record one-time work.
WARMUP_STEPS = 2

# Inductor's options for the step. With coordinate-descent tuning on, Inductor also rewrites a product of one row by a
# matrix (every projection at batch 1) as a reduction that it fuses with its neighbours (the norm before it, the
# activation and the residual add around it) and tunes, instead of a cuBLAS GEMV: on an H200 the step of mamba-ssm's
# dense config went from 0.55 to 0.43 ms, and the 426M bench config's from 0.76 to 0.66 ms, for a few seconds more
# of compilation (benchmarks/RESULTS.md, "Generation"). Steps of two rows or more keep cuBLAS's products.
COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


class DecodeStep:
    """The forward of one new token per row over one static cache, with its inputs at fixed addresses.

    `start` fills the padding mask and the positions for a call; each `__call__(tokens)` writes the tokens in,
    runs the step (on CUDA: replays the graph `capture` recorded) and returns the next-token logits (B, V) float32.
    On other devices the step runs eagerly: the same inputs, no graph.
    """

    def __init__(self, model, cache, batch: int, cache_length: int, compile: bool):
        device = model.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1)
        self.attention_mask = torch.ones(batch, cache_length, dtype=torch.long, device=device)  # (B, S)
        self.forward = (torch.compile(self._forward, dynamic=False, options=COMPILE_OPTIONS) if compile
                        else self._forward)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (B, 1, V), the graph's output
        self._addresses: list[int] = []

    def _forward(self, tokens, position_ids, attention_mask):
        return self.model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=True, logits_to_keep=1, **{CACHE_NAME: self.cache}).logits

    def _run(self) -> torch.Tensor:
        logits = self.forward(self.tokens, self.position_ids, self.attention_mask)
        self.position_ids.add_(1)
        return logits

    def capture(self, pool) -> None:
        """Records the step in a CUDA graph (memory from `pool`), then resets the cache. The cache must be empty:
        a one-token prefill first puts it in the decoding state the graph records (and allocates its tensors)."""
        self._forward(self.tokens, self.position_ids, self.attention_mask[:, :1])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._run()
        self.cache.reset()
        self._addresses = _tensor_addresses(self.cache)

    def start(self, attention_mask: torch.Tensor | None, prompt_length: int) -> None:
        """Sets the padding mask (the prompt's, then ones) and the first new token's positions for a call whose
        prompt of `prompt_length` tokens has just been prefilled."""
        if self.graph is not None and _tensor_addresses(self.cache) != self._addresses:
            raise RuntimeError("the static cache's tensors moved after the decode step was captured; please report "
                               "this (transformers version, the generate call); cache_implementation='dynamic' "
                               "avoids it")
        self.attention_mask.fill_(1)
        if attention_mask is None:
            self.position_ids.fill_(prompt_length)
        else:
            self.attention_mask[:, :prompt_length].copy_(attention_mask[:, :prompt_length])
            self.position_ids.copy_(attention_mask[:, :prompt_length].sum(-1, keepdim=True))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B,) the tokens just chosen. Returns the logits for the ones after them, (B, V) float32."""
        self.tokens.copy_(tokens[:, None])
        if self.graph is None:
            logits = self._run()
        else:
            self.graph.replay()
            logits = self.logits
        return logits[:, -1].to(copy=True, dtype=torch.float32)


def _tensor_addresses(cache) -> list[int]:
    """The addresses of every tensor the cache's layers hold (the linear-attention layers keep theirs in dicts)."""
    addresses = []
    for layer in cache.layers:
        for value in vars(layer).values():
            for tensor in value.values() if isinstance(value, dict) else (value,):
                if isinstance(tensor, torch.Tensor):
                    addresses.append(tensor.data_ptr())
    return addresses


def decode_with_graphs(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer=None,
                       **model_kwargs):
    """transformers' greedy search and multinomial sampling (`_sample`'s results) for a model whose cache
    argument is one of its kept static caches; called by `generate` as its `custom_generate`.

    input_ids: (B, P) the prompt. Returns (B, P + new) token ids, or a `GenerateDecoderOnlyOutput` with the
    sequences, the scores and logits asked for, and the cache.
    """
    cache = model_kwargs[CACHE_NAME]
    batch, prompt_length = input_ids.shape
    max_length = stopping_criteria.max_length
    step = model.static_decoding_caches.decode_step(model, cache)  # built (on CUDA: captured) at its first call

    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)  # (B, V)
    del outputs  # the prompt's logits may be large
    step.start(model_kwargs.get("attention_mask"), prompt_length)

    config = generation_config
    keep = config.return_dict_in_generate
    scores = [] if keep and config.output_scores else None
    raw_logits = [] if keep and config.output_logits else None
    pad_token_id = config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)

    sequences = input_ids.new_zeros(batch, max_length)  # (B, max_length); the first `length` columns are filled
    sequences[:, :prompt_length] = input_ids
    length = prompt_length
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    # The stop decision waits a step, except when the cache is returned: it must not hold a step past the stop.
    deferred = input_ids.device.type == "cuda" and not keep
    stop_check = (DeferredStopCheck(input_ids, max_length, None, False, streamer) if deferred
                  else StopCheck(streamer))
    while True:
        next_scores = logits_processor(sequences[:, :length], logits)
        if scores is not None:
            scores.append(next_scores)
        if raw_logits is not None:
            raw_logits.append(logits)
        if config.do_sample:
            next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if has_eos_stopping_criteria:  # finished rows get padding
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        sequences[:, length] = next_tokens
        length += 1
        unfinished = unfinished & ~stopping_criteria(sequences[:, :length], next_scores)
        if stop_check(unfinished, next_tokens, length):
            break
        logits = step(next_tokens)
    length -= stop_check.finish()  # a step taken before the deferred stop arrived
    if streamer is not None:
        streamer.end()

    sequences = sequences[:, :length]
    if not keep:
        return sequences
    new_tokens = length - prompt_length
    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=tuple(scores[:new_tokens]) if scores is not None else None,
        logits=tuple(raw_logits[:new_tokens]) if raw_logits is not None else None,
        **{CACHE_NAME: cache},
    )
