"""generate() in every mode a transformers user reaches for, against the invariants that must hold."""

import copy
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache, JambaForCausalLM, StaticCache, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hybrid_lm
from hybrid_lm.transformers_compat import CACHE_NAME
from builders import tiny_config, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "conversion"))
from convert import convert  # noqa: E402
from test_conversion import jamba_folder  # noqa: E402

NO_EOS = dict(eos_token_id=None, bos_token_id=None)
LAYOUTS = {
    "hybrid": {},
    "all-mamba": dict(layers_block_type=["mamba"] * 4),
    "all-attention": dict(layers_block_type=["attention"] * 4, use_rope=True, sliding_window=6),
}
# what the graph loop decodes: sliding-window models take the dynamic cache on CUDA (generation_hybrid_lm)
GRAPH_LAYOUTS = {**LAYOUTS, "all-attention": dict(layers_block_type=["attention"] * 4, use_rope=True)}


def prompt(batch=2, length=9, seed=0, vocab=97):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, n=12, **kwargs):
    return model.generate(input_ids, max_new_tokens=n, do_sample=False, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_incremental_decoding_equals_one_full_forward(layout):
    model = tiny_model(**LAYOUTS[layout])
    input_ids = prompt(length=14)
    full = model(input_ids).logits
    out = model(input_ids[:, :5], use_cache=True)  # prefill, then one token at a time
    steps = [out.logits]
    cache = getattr(out, CACHE_NAME)
    for t in range(5, 14):
        out = model(input_ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_in_chunks_equals_one_shot(layout):
    model = tiny_model(**LAYOUTS[layout], **NO_EOS)
    input_ids = prompt(length=13)
    expected = greedy(model, input_ids)
    for chunk in (1, 4, 5, 13, 20):
        torch.testing.assert_close(greedy(model, input_ids, prefill_chunk_size=chunk), expected, msg=str(chunk))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_left_padded_batch_generates_what_each_row_generates_alone(layout):
    model = tiny_model(**LAYOUTS[layout], **NO_EOS)
    rows = [prompt(1, 4, seed=1)[0], prompt(1, 9, seed=2)[0], prompt(1, 6, seed=3)[0]]
    width = max(len(r) for r in rows) + 2  # even the longest row is padded
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        attention_mask[i, width - len(row):] = 1
    batch = greedy(model, input_ids, attention_mask=attention_mask)
    for i, row in enumerate(rows):
        alone = greedy(model, row[None])
        torch.testing.assert_close(batch[i, width:], alone[0, len(row):], msg=f"row {i}")
    # a single row padded to a longer length
    single = greedy(model, input_ids[:1], attention_mask=attention_mask[:1])
    torch.testing.assert_close(single[0, width:], greedy(model, rows[0][None])[0, len(rows[0]):])


@pytest.mark.parametrize("num_beams", [3, 5])
@pytest.mark.parametrize("layout", ["hybrid", "all-mamba"])
def test_beam_search_with_cache_equals_without(num_beams, layout):
    model = tiny_model(**LAYOUTS[layout], **NO_EOS)
    input_ids = prompt(length=6)
    kwargs = dict(num_beams=num_beams, num_return_sequences=2, max_new_tokens=8, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    cached = model.generate(input_ids, **kwargs)
    uncached = model.generate(input_ids, use_cache=False, **kwargs)
    torch.testing.assert_close(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=1e-4)


def test_sampling_with_a_seed_is_reproducible():
    model = tiny_model(**NO_EOS)
    input_ids = prompt()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(input_ids, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=10,
                                   num_return_sequences=3))
    torch.testing.assert_close(runs[0], runs[1])
    assert runs[0].shape == (6, 19)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generation_continues_from_a_returned_cache(layout):
    """The cache knows how many tokens it holds (Mamba-only stacks too), so generate feeds only the new ones."""
    model = tiny_model(**LAYOUTS[layout], **NO_EOS)
    input_ids = prompt()
    first = model.generate(input_ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, CACHE_NAME)
    assert isinstance(cache, DynamicCache)
    continued = model.generate(first.sequences, **{CACHE_NAME: cache}, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(continued, greedy(model, input_ids, n=11))


# transformers runs assisted decoding for Mamba models from 5.25 on; before, it refuses models with `_is_stateful`
ASSISTED_DECODING = hasattr(DynamicCache, "get_recurrent_states_to_keep")


def _draft_of(model, noise: float, seed: int = 0):
    """A copy of `model` with its weights perturbed: it agrees with the model on some draft tokens, not all. Drafts
    of 4 tokens, none dropped for low confidence (a tiny random model is never confident)."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    draft.generation_config.update(
        assistant_confidence_threshold=0.0, num_assistant_tokens=4, num_assistant_tokens_schedule="constant"
    )
    return draft


@pytest.mark.parametrize("layout", ["hybrid", "all-mamba"])
def test_assisted_decoding_gives_the_greedy_tokens(layout, monkeypatch):
    """Rejected draft tokens are cropped off the cache: the Mamba layers keep the states to roll back to. Drafts
    from a perturbed copy of the model (accepted in part: checked through the crops) and from prompt lookup."""
    model = tiny_model(**LAYOUTS[layout], **NO_EOS)
    input_ids, repeating = prompt(batch=1), torch.tensor([[5, 6, 7, 8, 9] * 3])
    drafts = [dict(assistant_model=_draft_of(model, noise=0.005)), dict(prompt_lookup_num_tokens=3)]
    if not ASSISTED_DECODING:
        for draft in drafts:
            with pytest.raises(ValueError, match="stateful"):
                greedy(model, input_ids, **draft)
        return
    crops = []
    crop = DynamicCache.crop
    monkeypatch.setattr(DynamicCache, "crop", lambda cache, n: (crops.append(-n), crop(cache, n))[1])
    torch.testing.assert_close(greedy(model, input_ids, n=20, **drafts[0]), greedy(model, input_ids, n=20))
    assert set(crops) & {1, 2, 3}  # drafts accepted in part: the cache rolled back to a state inside a forward
    torch.testing.assert_close(greedy(model, repeating, n=20, **drafts[1]), greedy(model, repeating, n=20))


def test_streamer_receives_every_new_token():
    class Collect:
        def __init__(self):
            self.values = []

        def put(self, value):
            self.values.append(value.reshape(-1).tolist())

        def end(self):
            self.values.append("end")

    model = tiny_model(**NO_EOS)
    streamer = Collect()
    out = model.generate(prompt(batch=1), max_new_tokens=4, do_sample=False, streamer=streamer)
    assert streamer.values[0] == prompt(batch=1)[0].tolist()
    assert [v[0] for v in streamer.values[1:-1]] == out[0, 9:].tolist()
    assert streamer.values[-1] == "end"


def test_greedy_generation_equals_transformers_jamba(tmp_path):
    src = jamba_folder(tmp_path / "jamba", layout="1:3")
    reference = JambaForCausalLM.from_pretrained(src).eval()
    model = hybrid_lm.HybridLMForCausalLM.from_pretrained(convert(src, tmp_path / "hybrid", verify=False)).eval()
    input_ids = prompt(length=7, vocab=101)
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(model.generate(input_ids, **kwargs), reference.generate(input_ids, **kwargs))


def test_bad_input_gets_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="attention_mask.*must have the prompt's shape|attention_mask must have shape"):
        model.generate(prompt(), attention_mask=torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)
    other = hybrid_lm.HybridLMForCausalLM(tiny_config(num_hidden_layers=2))
    _, cache = other(prompt(), use_cache=True).to_tuple()[:2]
    with pytest.raises(ValueError, match="different model"):
        model.generate(prompt(), **{CACHE_NAME: cache}, max_new_tokens=2)
    with pytest.raises(ValueError, match="DynamicCache\\(config=model.config\\)"):
        model.generate(prompt(), **{CACHE_NAME: DynamicCache()}, max_new_tokens=2)
    with pytest.raises(ValueError, match="no tokens"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_trainer_evaluate_with_compute_metrics(tmp_path):
    model = tiny_model()

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            ids = prompt(batch=1, length=10, seed=i)[0]
            return {"input_ids": ids, "labels": ids}

    def accuracy(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        return {"accuracy": float((logits[:, :-1].argmax(-1) == labels[:, 1:]).mean())}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    metrics = Trainer(model=model, args=args, eval_dataset=Tokens(), compute_metrics=accuracy).evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert np.isfinite(metrics["eval_loss"])


def test_stop_strings_end_generation_where_the_text_appears():
    tokenizer = hybrid_lm.train_tokenizer(iter(["def add(a, b):\n    return a + b  # 12\n"] * 50), vocab_size=300,
                                          show_progress=False)
    model = tiny_model(vocab_size=len(tokenizer), **NO_EOS)
    input_ids = tokenizer("def", return_tensors="pt").input_ids
    free = greedy(model, input_ids, n=25)[0, input_ids.shape[1]:]
    pieces = [tokenizer.decode(t) for t in free]
    index = next(i for i, p in enumerate(pieces) if i >= 3 and p.strip())  # a visible piece a few tokens in
    stop = pieces[index].strip()
    first = next(i for i in range(len(pieces)) if stop in "".join(pieces[: i + 1]))
    stopped = greedy(model, input_ids, n=25, stop_strings=[stop], tokenizer=tokenizer)[0, input_ids.shape[1]:]
    torch.testing.assert_close(stopped, free[: first + 1])


STATIC_MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
}


@pytest.mark.parametrize("mode", STATIC_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_static_cache_gives_the_dynamic_cache_tokens(layout, mode):
    """transformers' StaticCache (cache_implementation="static"): same tokens as the dynamic cache, left-padded
    batch included."""
    model = tiny_model(**LAYOUTS[layout], **NO_EOS)
    input_ids = prompt(batch=3, length=8)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # row 0 is left-padded
    runs = []
    for cache in (None, "static"):
        torch.manual_seed(7)
        runs.append(model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8,
                                   cache_implementation=cache, **STATIC_MODES[mode]))
    torch.testing.assert_close(runs[1], runs[0])


@pytest.fixture
def kept_static_caches(monkeypatch):
    """The CUDA default (a static cache the model keeps between generate calls) on this device: the same code
    path, without the graphs transformers adds on a GPU."""
    from hybrid_lm import generation_hybrid_lm

    monkeypatch.setattr(generation_hybrid_lm, "records_graphs", lambda model: True)


@pytest.mark.parametrize("mode", STATIC_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kept_static_cache_gives_the_dynamic_cache_tokens(layout, mode, kept_static_caches):
    model = tiny_model(**LAYOUTS[layout], **NO_EOS)
    input_ids = prompt(batch=3, length=8)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    runs = []
    for cache in ("dynamic", None, None):  # the second default call reuses the first one's cache
        torch.manual_seed(7)
        runs.append(model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8,
                                   cache_implementation=cache, **STATIC_MODES[mode]))
    # sliding-window layers decode from the dynamic cache: transformers' static window layer keeps a Python int
    # that a CUDA graph cannot replay (generation_hybrid_lm._why_not_static)
    assert len(model.static_decoding_caches) == (0 if "sliding_window" in LAYOUTS[layout] else 1)
    torch.testing.assert_close(runs[1], runs[0])
    torch.testing.assert_close(runs[2], runs[0])


def test_kept_static_caches_are_reused_grown_and_bounded(kept_static_caches):
    from hybrid_lm.generation_hybrid_lm import KEPT_CACHES, LENGTH_STEP

    model = tiny_model(**NO_EOS)
    caches = model.static_decoding_caches
    out = model.generate(prompt(batch=2), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    (first,) = [kept.cache for kept in caches._caches.values()]
    assert caches._caches[2].length == LENGTH_STEP
    returned = getattr(out, CACHE_NAME)
    assert returned is not first and returned.get_seq_length() == 9 + 4 - 1  # a copy the next call leaves alone
    greedy(model, prompt(batch=2, seed=1), n=5)
    assert [kept.cache for kept in caches._caches.values()] == [first]  # same shape: the same cache, reset
    assert returned.get_seq_length() == 9 + 4 - 1
    greedy(model, prompt(batch=2, length=LENGTH_STEP), n=3)  # longer: a new cache of the next step
    (grown,) = [kept.cache for kept in caches._caches.values()]
    assert grown is not first and caches._caches[2].length == 2 * LENGTH_STEP
    for batch in range(3, 3 + KEPT_CACHES):
        greedy(model, prompt(batch=batch), n=2)
    assert sorted(caches._caches) == list(range(3, 3 + KEPT_CACHES))  # batch 2, the least recently used, went


def test_kept_static_cache_stays_out_of_the_way(kept_static_caches, caplog):
    """A call that names its cache decodes from it; one the static path cannot serve says why, once."""
    model = tiny_model(**NO_EOS)
    input_ids = prompt()
    given = DynamicCache(config=model.config)
    greedy(model, input_ids, **{CACHE_NAME: given})
    greedy(model, input_ids, use_cache=False)
    greedy(model, input_ids, cache_implementation="dynamic")
    assert len(model.static_decoding_caches) == 0 and given.get_seq_length() > 0

    model.hf_device_map = {"model": "cpu", "lm_head": "disk"}  # what from_pretrained(device_map=...) records
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            offloaded = greedy(model, input_ids)
            greedy(model, input_ids)
    finally:
        hf_logging.disable_propagation()
    reasons = [r.getMessage() for r in caplog.records if "not the static one" in r.getMessage()]
    assert len(reasons) == 1 and "spread over ['cpu', 'disk']" in reasons[0]
    assert len(model.static_decoding_caches) == 0
    torch.testing.assert_close(offloaded, greedy(model, input_ids, cache_implementation="dynamic"))


@pytest.mark.skipif(not ASSISTED_DECODING, reason="transformers runs assisted decoding of Mamba models from 5.25 on")
def test_assisted_decoding_takes_the_dynamic_cache(kept_static_caches, caplog):
    """The cache records its past for good: not one to keep for later calls."""
    model = tiny_model(**NO_EOS)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            tokens = greedy(model, prompt(batch=1), prompt_lookup_num_tokens=2)
    finally:
        hf_logging.disable_propagation()
    assert len(model.static_decoding_caches) == 0
    assert any("because assisted decoding" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(tokens, greedy(model, prompt(batch=1), cache_implementation="dynamic"))


def _graph_loop_steps(model) -> list:
    """The decode steps of the graph loop (decoding_hybrid_lm.py) the model keeps, one per cache it has served."""
    return [kept.step for kept in model.static_decoding_caches._caches.values() if kept.step is not None]


def _eos_ending_rows_at_different_steps(model, input_ids, attention_mask, n):
    """EOS tokens (a list) that end row r of a greedy call by step 2 + 3 r at the latest: the rows stop at
    different steps, and the call before `n` new tokens."""
    free = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=n, do_sample=False,
                          cache_implementation="dynamic")[:, input_ids.shape[1]:]
    assert n > 2 + 3 * (len(free) - 1), "too few new tokens for the rows to end apart"
    return sorted({free[row, 2 + 3 * row].item() for row in range(len(free))})


@pytest.mark.parametrize("layout", GRAPH_LAYOUTS)
def test_graph_loop_stops_rows_at_eos_as_transformers_does(layout, kept_static_caches):
    """Rows that hit EOS get padding, and the call ends when all have: the same sequences (and length) as
    transformers' loop over the dynamic cache, with the scores and raw logits of every step."""
    model = tiny_model(**GRAPH_LAYOUTS[layout], **NO_EOS)
    input_ids = prompt(batch=3, length=8)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    eos = _eos_ending_rows_at_different_steps(model, input_ids, attention_mask, n=12)
    runs = [model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
                           eos_token_id=eos, pad_token_id=1, return_dict_in_generate=True, output_scores=True,
                           output_logits=True, cache_implementation=cache)
            for cache in ("dynamic", None)]
    assert len(_graph_loop_steps(model)) == 1
    torch.testing.assert_close(runs[1].sequences, runs[0].sequences)
    assert runs[0].sequences.shape[1] < 8 + 12 and (runs[0].sequences == 1).any(), "EOS ended no row early"
    for field in ("scores", "logits"):
        assert len(getattr(runs[1], field)) == len(getattr(runs[0], field))
        torch.testing.assert_close(torch.stack(getattr(runs[1], field)), torch.stack(getattr(runs[0], field)))


def test_graph_loop_applies_the_calls_processors_and_streams_every_token(kept_static_caches):
    """Repetition penalty, several sampled sequences per prompt, a minimum length and a streamer: what
    transformers' loop gives, token for token, with the same seed."""
    class Collect:
        def __init__(self):
            self.values = []

        def put(self, value):
            self.values.append(value.reshape(-1).tolist())

        def end(self):
            self.values.append("end")

    model = tiny_model(**NO_EOS)
    input_ids = prompt(batch=1)
    settings = dict(max_new_tokens=9, do_sample=True, top_p=0.8, repetition_penalty=1.3, num_return_sequences=3,
                    min_new_tokens=4)
    runs, streamers = [], []
    for cache in ("dynamic", None):
        torch.manual_seed(3)
        runs.append(model.generate(input_ids, cache_implementation=cache, **settings))
    assert len(_graph_loop_steps(model)) == 1
    torch.testing.assert_close(runs[1], runs[0])
    for cache in ("dynamic", None):
        streamers.append(Collect())
        greedy(model, input_ids, n=6, cache_implementation=cache, streamer=streamers[-1])
    assert streamers[1].values == streamers[0].values and streamers[1].values[-1] == "end"
    assert len(streamers[1].values) == 1 + 6 + 1  # the prompt, each new token, the end


def test_graph_loop_leaves_other_modes_to_transformers_and_says_why(kept_static_caches, caplog):
    model = tiny_model(**NO_EOS)
    logging.Logger.info_once.cache_clear()  # an earlier test may have logged the same reason, once per process
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("INFO"):
            greedy(model, prompt(), num_beams=2)
    finally:
        hf_logging.disable_propagation()
    assert _graph_loop_steps(model) == [] and len(model.static_decoding_caches) == 1
    assert any("because the call asks for beam search" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_cuda_generate_decodes_with_graphs_and_gives_the_eager_tokens():
    """On CUDA, plain generate decodes from a kept static cache (transformers compiles the step: CUDA graphs). In
    float32 it gives the eager dynamic path's greedy tokens for 64 steps, across batch sizes and a re-capture for a
    longer call; the explicit cache_implementation="static" takes the same path."""
    from hybrid_lm.generation_hybrid_lm import LENGTH_STEP

    model = tiny_model(**NO_EOS).cuda()
    for batch, length in ((1, 9), (3, 9), (16, 9), (3, LENGTH_STEP)):
        input_ids = prompt(batch=batch, length=length).cuda()
        eager = greedy(model, input_ids, n=64, cache_implementation="dynamic")
        static = greedy(model, input_ids, n=64)
        torch.testing.assert_close(static, eager, msg=f"batch {batch}, prompt {length}")
        torch.testing.assert_close(greedy(model, input_ids, n=64, cache_implementation="static"), eager)
    assert len(model.static_decoding_caches) == 3
    steps = _graph_loop_steps(model)
    assert len(steps) == 3 and all(step.graph is not None for step in steps)  # the graph loop, with its graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_loop_on_cuda_stops_at_eos_and_streams_like_transformers():
    """On CUDA the stop flag and the streamed tokens reach the host a step late: the step taken past the stop is
    dropped, so sequences, their length and the stream are transformers' (float32, greedy)."""
    class Collect:
        def __init__(self):
            self.values = []

        def put(self, value):
            self.values.append(value.reshape(-1).tolist())

        def end(self):
            self.values.append("end")

    model = tiny_model(**NO_EOS).cuda()
    input_ids = prompt(batch=3, length=8).cuda()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    eos = _eos_ending_rows_at_different_steps(model, input_ids, attention_mask, n=40)
    runs = [greedy(model, input_ids, n=40, attention_mask=attention_mask, eos_token_id=eos, pad_token_id=1,
                   cache_implementation=cache) for cache in ("dynamic", None)]
    assert len(_graph_loop_steps(model)) == 1
    assert runs[0].shape[1] < 8 + 40 and (runs[0] == 1).any(), "EOS ended no row early"
    torch.testing.assert_close(runs[1], runs[0])
    streams = [Collect(), Collect()]
    for stream, cache in zip(streams, ("dynamic", None)):
        greedy(model, input_ids[:1], n=12, cache_implementation=cache, streamer=stream)
    assert streams[1].values == streams[0].values and len(streams[1].values) == 1 + 12 + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_cuda_generate_in_bf16_has_the_eager_logits_within_bf16_tolerance():
    """bf16: the graph path's logits match eager decoding's within bf16 rounding, step by step, as long as the
    two have picked the same tokens (greedy ties may then diverge)."""
    model = tiny_model(**NO_EOS).cuda().to(torch.bfloat16)
    for batch in (1, 3, 16):
        input_ids = prompt(batch=batch).cuda()
        runs = [model.generate(input_ids, max_new_tokens=32, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, cache_implementation=cache) for cache in ("dynamic", None)]
        eager, static = (torch.stack(run.logits, 1).float() for run in runs)  # (B, steps, V)
        same = (runs[0].sequences == runs[1].sequences)[:, input_ids.shape[1]:].cumprod(1).bool()
        assert same[:, :8].all(), f"batch {batch}: tokens diverged within 8 steps"
        scale = eager.abs().amax(-1, keepdim=True)
        assert ((static - eager).abs() / scale)[same].max() < 0.05, f"batch {batch}"


def test_decode_step_compiled_with_the_gpu_options_gives_the_eager_logits():
    """The decode step the graph loop replays, compiled as on a GPU (`DecodeStep(compile=True)`, Inductor with
    `decoding_hybrid_lm.COMPILE_OPTIONS`; here on CPU, without a graph), gives the eager step's logits step by step,
    from a left-padded prompt."""
    from hybrid_lm.decoding_hybrid_lm import DecodeStep

    model = tiny_model(**NO_EOS)
    input_ids = prompt(batch=2, length=6)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    logits, tokens = [], input_ids[:, -1]
    for compiled in (False, True):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask, use_cache=True, **{CACHE_NAME: cache})
            step = DecodeStep(model, cache, batch=2, cache_length=16, compile=compiled)
            step.start(attention_mask, prompt_length=6)
            logits.append(torch.stack([step(tokens + i) for i in range(3)]))
    torch.testing.assert_close(logits[1], logits[0])
