"""Bad inputs get an error that names the value and the fix, or a loud warning, never a raw error or silence."""

import logging
import math

import peft
import pytest
import torch
from transformers import DynamicCache, StaticCache

import hybrid_lm
from hybrid_lm.transformers_compat import CACHE_NAME
from builders import tiny_config, tiny_model


def ids(batch=2, length=7, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def warnings_once(caplog):
    """caplog at WARNING for hybrid_lm, with transformers' `warning_once` memory cleared (other tests may have
    triggered the same message)."""
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hybrid_lm"):
        yield caplog
    logging.Logger.warning_once.cache_clear()


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("bad", [97, 1000, -5])
def test_labels_outside_the_vocabulary_are_named(bad):
    labels = ids().clone()
    labels[1, 4] = bad
    with pytest.raises(ValueError, match=rf"labels contains {bad}: each label must be a token id in \[0, 96\] "
                                         r"\(vocab_size 97\) or the ignore index -100; check that the tokenizer"):
        tiny_model()(ids(), labels=labels)


def test_label_ids_are_checked_against_the_ignore_index_the_loss_uses():
    model = tiny_model()
    labels = ids().masked_fill(ids() > 50, -1)  # -1 as the ignore index
    with pytest.raises(ValueError, match="labels contains -1: .* or the ignore index -100"):
        model(ids(), labels=labels)
    loss = model(ids(), labels=labels, ignore_index=-1).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("labels, message", [
    ([0, 3], r"labels contains 3: each label must be a class id in \[0, 2\] \(num_labels 3\) or the ignore index "
             r"-100; set num_labels to the number of classes"),
    ([-1, 2], r"labels contains -1: each label must be a class id in \[0, 2\]"),
])
def test_classifier_labels_outside_num_labels_are_named(labels, message):
    torch.manual_seed(0)
    model = hybrid_lm.HybridLMForSequenceClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(ValueError, match=message):
        model(ids(), labels=torch.tensor(labels))
    assert torch.isfinite(model(ids(), labels=torch.tensor([0, -100])).loss)  # -100 is ignored here too


def test_classifier_refuses_labels_of_token_shape():
    torch.manual_seed(0)
    model = hybrid_lm.HybridLMForSequenceClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(ValueError, match=r"labels must hold one class id per row, shape \(2,\), got \(2, 7\); "
                                         "per-token labels train HybridLMForCausalLM"):
        model(ids(), labels=torch.randint(0, 3, (2, 7)))
    assert torch.isfinite(model(ids(), labels=torch.tensor([[1], [2]])).loss)  # (batch, 1) is one id per row


def test_the_label_check_does_not_break_a_compiled_graph():
    """The check reads a device value, so it is skipped under torch.compile: fullgraph=True fails on a break."""
    model = tiny_model()
    labels = ids().masked_fill(ids() > 50, -100)
    expected = model(ids(), labels=labels).loss
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids(), labels=labels).loss, expected)


def test_labels_with_nothing_to_predict_warn_and_give_transformers_nan(warnings_once):
    """The loss stays what transformers' loss gives (nan: a mean over no tokens; zero gradients), with a warning."""
    model = tiny_model()
    labels = torch.full_like(ids(), -100)
    labels[:, 0] = ids()[:, 0]  # the first position is never a target (labels are shifted inside)
    assert math.isnan(model(ids(), labels=labels).loss.item())
    assert "every label is the ignore index (-100): there are no tokens to predict, so the loss is nan" in \
        warnings_once.text
    assert "Trainer passes num_items_in_batch" in warnings_once.text

    warnings_once.clear()
    torch.manual_seed(0)
    classifier = hybrid_lm.HybridLMForSequenceClassification(tiny_config(num_labels=3)).eval()
    assert math.isnan(classifier(ids(), labels=torch.tensor([-100, -100])).loss.item())
    assert "there are no rows to classify" in warnings_once.text


def test_an_empty_micro_batch_under_gradient_accumulation_adds_zero_without_a_warning(warnings_once):
    """Trainer passes num_items_in_batch, counted over all micro-batches of a step: one of them may hold no target."""
    model = tiny_model().train()
    empty = torch.full_like(ids(), -100)
    loss = model(ids(), labels=empty, num_items_in_batch=torch.tensor(5)).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert "every label is the ignore index" not in warnings_once.text
    model(ids(), labels=empty, num_items_in_batch=torch.tensor(0))  # nothing in the whole step: said
    assert "every label is the ignore index" in warnings_once.text


def test_trainer_with_an_empty_micro_batch_trains_without_a_warning(tmp_path, warnings_once):
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": ids(1, 7, seed)[0], "labels": ids(1, 7, seed)[0]} for seed in range(2)]
    rows[1]["labels"] = torch.full((7,), -100)  # the second micro-batch of the step has nothing to predict
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no")
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=rows)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    assert "every label is the ignore index" not in warnings_once.text


# ----------------------------------------------------------------------------- caches


def filled_cache(model, kind):
    cache = DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config,
                                                                                    max_cache_len=32)
    model(ids(batch=2), cache=cache, use_cache=True)
    return cache


BATCH_MESSAGE = (r"the cache holds states for a batch of 2, this call's batch is 3; a cache serves the batch it was "
                 r"filled with: pass a new cache \(e.g. DynamicCache\(config=model.config\)\) or none")


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("length", [1, 5], ids=["decode-step", "prefill"])
def test_a_cache_reused_with_another_batch_size_is_refused(kind, length):
    model = tiny_model()
    cache = filled_cache(model, kind)
    with pytest.raises(ValueError, match=BATCH_MESSAGE):
        model(ids(batch=3, length=length), cache=cache, use_cache=True)
    model(ids(batch=2, length=length), cache=cache, use_cache=True)  # the batch it was filled with goes on


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_generate_with_a_cache_of_another_batch_size_is_refused(kind):
    model = tiny_model()
    cache = filled_cache(model, kind)
    with pytest.raises(ValueError, match=BATCH_MESSAGE):
        model.generate(ids(batch=3), max_new_tokens=2, do_sample=False, **{CACHE_NAME: cache})


def test_the_batch_check_covers_mamba_only_and_attention_only_stacks():
    for layers in (["mamba", "mamba"], ["attention", "attention"]):
        model = tiny_model(num_hidden_layers=2, layers_block_type=layers)
        cache = filled_cache(model, "dynamic")
        with pytest.raises(ValueError, match="batch of 2, this call's batch is 3"):
            model(ids(batch=3, length=1), cache=cache, use_cache=True)


# ----------------------------------------------------------------------------- prefill_chunk_size


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True])
def test_a_bad_prefill_chunk_size_is_named(chunk):
    model = tiny_model()
    message = rf"prefill_chunk_size \({chunk!r}\) must be a positive whole number of tokens per prefill forward, " \
              "or None to prefill the prompt in one forward"
    with pytest.raises(ValueError, match=message):
        model.generate(ids(), max_new_tokens=2, do_sample=False, prefill_chunk_size=chunk)
    model.generation_config.prefill_chunk_size = chunk  # or from a generation_config.json
    with pytest.raises(ValueError, match=message):
        model.generate(ids(), max_new_tokens=2, do_sample=False)
    chunked = model.generate(ids(), max_new_tokens=2, do_sample=False, prefill_chunk_size=3)  # the call wins
    model.generation_config.prefill_chunk_size = None
    torch.testing.assert_close(chunked, model.generate(ids(), max_new_tokens=2, do_sample=False))


def test_prefill_chunk_size_in_the_model_config_points_to_generate():
    with pytest.raises(ValueError, match=r"'prefill_chunk_size' \(512\) is not a HybridLMConfig field; it is a "
                                         r"generation parameter: pass it to generate\(\) or set "
                                         r"model.generation_config.prefill_chunk_size"):
        tiny_config(prefill_chunk_size=512)


# ----------------------------------------------------------------------------- LoRA through peft directly


@pytest.mark.parametrize("targets, warned", [
    (["q_proj", "v_proj"], True),  # the Llama habit: attention only, and most layers are Mamba layers
    ("all", False),  # model.lora_target_modules
    (["in_proj"], False),
])
def test_lora_that_misses_the_mamba_mixers_is_reported(targets, warned, warnings_once):
    model = tiny_model()
    targets = list(model.lora_target_modules) if targets == "all" else targets
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
    lora(ids())
    message = ("the adapter reaches ['q_proj', 'v_proj'] but no Mamba mixer projection: the mixers of the 2 Mamba "
               "layers (of 4) stay frozen. To adapt every mixer and feed-forward block, target "
               "model.lora_target_modules")
    assert (message in warnings_once.text) is warned
    assert ("no Mamba mixer projection" in warnings_once.text) is warned


def test_lora_on_a_model_without_mamba_layers_is_not_reported(warnings_once):
    model = tiny_model(num_hidden_layers=2, layers_block_type=["attention", "attention"])
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "Mamba mixer" not in warnings_once.text
