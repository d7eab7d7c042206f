"""hybrid_lm held against what transformers expects of an in-library model, on whichever release is installed.

The first tests fail loudly, naming the release, when generate() starts handing the model something it does
not take or expecting something back it does not give: the next rename is found here, not by users.
"""

import inspect
import json
import logging
import warnings

import pytest
import torch
import transformers
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Cache,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hybrid_lm
from builders import tiny_config, tiny_model
from hybrid_lm.modeling_hybrid_lm import _MODEL_KWARGS
from hybrid_lm.transformers_compat import CACHE_NAME

RELEASE = f"transformers {transformers.__version__}"
NO_EOS = dict(eos_token_id=None, bos_token_id=None)
GENERATE_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=5),
    "beam": dict(num_beams=3, do_sample=False),
    "chunked-prefill": dict(do_sample=False, prefill_chunk_size=3),
    "static-cache": dict(do_sample=False, cache_implementation="static"),
}


def prompt(batch=2, length=7, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def record_forward_calls(model):
    """Every call of model.forward as (kwargs, output); a hook, so generate still inspects the real signature."""
    calls = []
    model.register_forward_hook(lambda module, args, kwargs, output: calls.append((kwargs, output)), with_kwargs=True)
    return calls


@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_generate_hands_the_model_only_what_it_takes(mode):
    model = tiny_model(**NO_EOS)
    calls = record_forward_calls(model)
    torch.manual_seed(0)
    model.generate(prompt(), attention_mask=torch.ones(2, 7, dtype=torch.long), max_new_tokens=4, **GENERATE_MODES[mode])
    # the forward's own parameters, transformers' model kwargs, and the cache under this release's name
    parameters = set(inspect.signature(type(model).forward).parameters) - {"self", "kwargs"} | {CACHE_NAME}
    for kwargs, output in calls:
        unknown = set(kwargs) - parameters - _MODEL_KWARGS
        assert not unknown, (
            f"{RELEASE}: generate() now passes {sorted(unknown)} to the model's forward, which hybrid_lm does not "
            "take; a renamed or new input (add it to the forward or to transformers_compat.py)"
        )
        assert isinstance(kwargs.get(CACHE_NAME), Cache), (
            f"{RELEASE}: generate() passed no Cache under the argument name '{CACHE_NAME}' (got {sorted(kwargs)}); "
            "the cache argument was renamed again: update transformers_compat.CACHE_NAME"
        )
        assert isinstance(getattr(output, CACHE_NAME, None), Cache), (
            f"{RELEASE}: the model's output has no Cache in '{CACHE_NAME}', the field generate() reads back"
        )


def test_generate_returns_the_cache_under_the_name_of_this_release():
    model = tiny_model(**NO_EOS)
    out = model.generate(prompt(), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(getattr(out, CACHE_NAME), Cache), f"{RELEASE}: generate's output has no '{CACHE_NAME}'"


def test_no_deprecation_warnings_from_our_code():
    """Training, forwards with a cache and every generate mode under the current names warn about nothing
    deprecated (5.24 deprecates `past_key_values` and `is_gradient_checkpointing`, for example)."""
    model = tiny_model(**NO_EOS)
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)  # transformers also deprecates through logger.warning_once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()
        model(prompt(), labels=prompt()).loss.backward()
        model.eval()
        out = model(prompt(), use_cache=True)
        model(prompt(length=1), cache=getattr(out, CACHE_NAME), use_cache=True)
        for kwargs in GENERATE_MODES.values():
            model.generate(prompt(), max_new_tokens=3, return_dict_in_generate=True, **kwargs)
        hybrid_lm.HybridLMForSequenceClassification(tiny_config(num_labels=2))(prompt())
    transformers_logger.removeHandler(handler)
    deprecations = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    deprecations += [message for message in logged if "deprecat" in message.lower()]
    assert not deprecations, f"{RELEASE}:\n" + "\n".join(deprecations)


def test_the_old_cache_name_still_works():
    model = tiny_model()
    out = model(prompt(), use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated from 5.24 on, current before
        step = model(prompt(length=1), past_key_values=getattr(out, CACHE_NAME), use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], model(torch.cat([prompt(), prompt(length=1)], 1)).logits[:, -1],
                               atol=1e-5, rtol=1e-5)


# --- what an in-library model does -------------------------------------------------------------------------


def test_generate_from_inputs_embeds_continues_like_from_ids():
    model = tiny_model(**NO_EOS)
    ids = prompt()
    from_ids = model.generate(ids, max_new_tokens=5, do_sample=False)[:, ids.shape[1]:]
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(from_embeds, from_ids)


def test_set_attn_implementation_switches_the_attention_function():
    calls = []

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("counting_sdpa", counting_sdpa)
    model = tiny_model()
    expected = model(prompt()).logits
    model.set_attn_implementation("counting_sdpa")
    torch.testing.assert_close(model(prompt()).logits, expected)
    assert len(calls) == 2  # two attention layers
    model.set_attn_implementation("eager")
    calls.clear()
    out = model(prompt(), output_attentions=True)
    assert not calls and out.attentions[0].shape == (2, 4, 7, 7)


def test_dynamic_rope_matches_llama_beyond_the_trained_length():
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_parameters=rope, max_position_embeddings=8,
    )).eval()
    config = tiny_config(num_hidden_layers=2, attn_layer_period=1, attn_layer_offset=0, layers_num_experts=[1, 1],
                         use_rope=True, rope_parameters=rope, max_position_embeddings=8,
                         rms_norm_eps=reference.config.rms_norm_eps)
    model = hybrid_lm.HybridLMForCausalLM(config).eval()
    state = {k.replace("post_attention_layernorm", "pre_ff_layernorm").replace("model.norm.", "model.final_layernorm.")
             .replace(".mlp.", ".feed_forward."): v for k, v in reference.state_dict().items()}
    model.load_state_dict(state, strict=True)
    long = prompt(length=20)  # 2.5x max_position_embeddings: the dynamic scaling changes the frequencies
    torch.testing.assert_close(model(long).logits, reference(long).logits, atol=1e-4, rtol=1e-4)


def test_loss_kwargs_such_as_shift_labels_are_honoured():
    model = tiny_model()
    ids = prompt()
    plain = model(ids, labels=ids).loss
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    torch.testing.assert_close(model(ids, labels=ids, shift_labels=shifted).loss, plain)
    masked = shifted.clone()
    masked[:, :3] = -100
    assert not torch.allclose(model(ids, labels=ids, shift_labels=masked).loss, plain)


def test_base_model_records_router_logits_by_argument_and_config():
    model = tiny_model()
    assert len(model.model(prompt(), output_router_logits=True).router_logits) == 2  # MoE at layers 1 and 3
    model.config.output_router_logits = True
    assert len(model.model(prompt()).router_logits) == 2


def test_from_pretrained_initialises_what_the_checkpoint_lacks(tmp_path):
    config = tiny_config()
    model = hybrid_lm.HybridLMForCausalLM.from_pretrained(None, config=config, state_dict={})
    assert torch.isfinite(model(prompt()).logits).all()
    assert torch.equal(model.model.layers[0].mamba.D, torch.ones_like(model.model.layers[0].mamba.D))


def test_a_head_of_another_size_raises_unless_mismatches_are_allowed(tmp_path):
    torch.manual_seed(0)
    hybrid_lm.HybridLMForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"score\.weight.*ignore_mismatched_sizes=True"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=42)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=42, ignore_mismatched_sizes=True)
    assert model.score.weight.shape == (42, 32)


def test_a_backbone_tensor_the_config_has_no_place_for_is_an_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layers_block_type"] = ["mamba", "attention", "mamba", "mamba"]  # layer 3 is attention in the weights
    config.pop("attn_layer_period"), config.pop("attn_layer_offset")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers\.3\..*config has no such tensor"):
        AutoModelForCausalLM.from_pretrained(tmp_path)



def test_torch_export_of_a_forward_without_cache():
    """(With a cache, transformers' export support flattens key/value layers only, not linear-attention ones.)"""
    model = tiny_model()
    ids = prompt()
    exported = torch.export.export(model, (), kwargs={"input_ids": ids, "use_cache": False})
    torch.testing.assert_close(exported.module()(input_ids=ids, use_cache=False).logits,
                               model(ids, use_cache=False).logits)


def test_a_missing_untied_head_is_reported_loudly(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model(tie_word_embeddings=False).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        _, info = hybrid_lm.HybridLMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "lm_head.weight" in set(info["missing_keys"])
    assert any("lm_head.weight" in message and "MISSING" in message for message in logged), logged
