import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import hybrid_lm
from hybrid_lm.transformers_compat import CACHE_NAME, enable_activation_checkpointing
from builders import assert_same_weights, run_without_package, tiny_config, tiny_model


def ids(batch=2, length=11, vocab=97, seed=0):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_loss_ignores_minus_100():
    model = tiny_model()
    input_ids = ids()
    labels = input_ids.clone()
    labels[0, :4] = -100
    out = model(input_ids, labels=labels)
    assert out.logits.shape == (2, 11, 97)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss is None  # eval mode without output_router_logits: pure language-model loss


def test_training_adds_the_router_losses():
    model = tiny_model(router_aux_loss_coef=0.01, router_z_loss_coef=0.001, fused_loss=False).train()
    input_ids = ids()
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), input_ids[:, 1:].reshape(-1))
    assert out.aux_loss is not None and out.z_loss is not None
    torch.testing.assert_close(out.loss, lm_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss)
    assert len(out.router_logits) == 2  # MoE at layers 1 and 3
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n)


def test_router_losses_ignore_padded_tokens():
    model = tiny_model()
    input_ids = ids(batch=1, length=9)
    plain = model(input_ids, output_router_logits=True)
    padded_ids = torch.cat([torch.zeros(1, 5, dtype=torch.long), input_ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], dim=1).long()
    padded = model(padded_ids, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(padded.aux_loss, plain.aux_loss)
    torch.testing.assert_close(padded.logits[:, 5:], plain.logits, atol=1e-5, rtol=1e-5)
    model.config.router_z_loss_coef = 1.0
    torch.testing.assert_close(model(padded_ids, attention_mask=mask, output_router_logits=True).z_loss,
                               model(input_ids, output_router_logits=True).z_loss)


def test_output_hidden_states_attentions_and_logits_to_keep():
    model = tiny_model()
    model.set_attn_implementation("eager")  # as in transformers, only eager attention returns its weights
    input_ids = ids()
    out = model(input_ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 11, 11)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 11))
    torch.testing.assert_close(out.hidden_states[-1], model.model(input_ids).last_hidden_state)
    last = model(input_ids, logits_to_keep=1).logits
    torch.testing.assert_close(last, out.logits[:, -1:])
    assert model(input_ids, return_dict=False)[0].shape == out.logits.shape


def test_sdpa_and_eager_agree_with_padding_and_window():
    torch.manual_seed(0)
    config = tiny_config(sliding_window=5, use_rope=True)
    sdpa = hybrid_lm.HybridLMForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    eager = hybrid_lm.HybridLMForCausalLM._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    input_ids = ids(length=13)
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        torch.testing.assert_close(sdpa(input_ids, **kwargs).logits, eager(input_ids, **kwargs).logits,
                                   atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    input_ids = ids()
    model(input_ids, labels=input_ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable_activation_checkpointing(model)
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], msg=name)


def test_mamba_parameters_stay_float32_in_low_precision(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    mixer = model.model.layers[0].mamba
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_proj.bias.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert model(ids()).logits.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    mixer = loaded.model.layers[0].mamba
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_proj.bias.dtype == torch.float32
    assert loaded.model.layers[0].mamba.out_proj.weight.dtype == torch.bfloat16


def test_float32_parameters_are_not_rounded_by_half_precision_casts():
    model = tiny_model()
    before = model.model.layers[0].mamba.dt_proj.bias.detach().clone()
    model.half().float()
    torch.testing.assert_close(model.model.layers[0].mamba.dt_proj.bias, before, rtol=0, atol=0)


def test_save_and_load_after_inference_packed_the_weights(tmp_path):
    """An inference forward packs each MoE block's expert weights, each MLP's gate and up and each attention's q, k
    and v into one storage per group (packed_weights.py); the checkpoint still holds one tensor per weight, under
    Jamba's keys, and loads back exactly."""
    from safetensors import safe_open

    def storage(module):
        return module.weight.untyped_storage().data_ptr()

    model = tiny_model()
    input_ids = ids()
    with torch.no_grad():
        expected = model(input_ids).logits
    mlp, attention = model.model.layers[0].feed_forward, model.model.layers[1].self_attn
    experts = model.model.layers[1].feed_forward.experts
    assert storage(experts[0].gate_proj) == storage(experts[1].up_proj)
    assert storage(mlp.gate_proj) == storage(mlp.up_proj) != storage(mlp.down_proj)
    assert storage(attention.q_proj) == storage(attention.k_proj) == storage(attention.v_proj) != storage(
        attention.o_proj)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.feed_forward.experts.2.down_proj.weight").shape == (32, 48)
        assert f.get_tensor("model.layers.1.self_attn.k_proj.weight").shape == attention.k_proj.weight.shape
        assert f.get_tensor("model.layers.0.feed_forward.up_proj.weight").shape == mlp.up_proj.weight.shape
    assert {f"model.layers.1.feed_forward.experts.{e}.{name}.weight" for e in range(4)
            for name in ("gate_proj", "up_proj", "down_proj")} <= keys
    assert {f"model.layers.1.self_attn.{name}.weight" for name in ("q_proj", "k_proj", "v_proj")} <= keys
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected)  # packed again
    torch.testing.assert_close(loaded(input_ids).logits, expected)  # unpacked


def test_save_and_load_through_auto_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for name in ("modeling_hybrid_lm.py", "configuration_hybrid_lm.py", "mamba_kernels.py", "mamba_scan_ref.py",
                 "mamba_conv_ref.py", "mamba_scan_triton.py", "mamba_conv_triton.py", "mamba_cuda.py",
                 "custom_ops.py", "generation_hybrid_lm.py", "decoding_hybrid_lm.py", "packed_weights.py",
                 "decode_attention_ops.py", "triton_decode_attention.py"):  # GPU kernels travel too
        assert (tmp_path / name).exists(), name
    input_ids = ids()
    expected = model(input_ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is hybrid_lm.HybridLMForCausalLM
    assert_same_weights(loaded.state_dict(), model.state_dict())
    torch.testing.assert_close(loaded(input_ids).logits, expected)
    base = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(base(input_ids).last_hidden_state, model.model(input_ids).last_hidden_state)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert classifier(input_ids).logits.shape == (2, 3)


def test_trust_remote_code_loads_without_the_package(tmp_path):
    model = tiny_model()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    input_ids = ids()
    expected = model(input_ids).logits
    torch.save(input_ids, tmp_path / "ids.pt")
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoModel
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "hybrid_lm" not in type(model).__module__.split(".")[0], type(model).__module__
        logits = model(torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)).logits
        torch.save({{"weights": model.state_dict(), "logits": logits.detach()}}, {str(tmp_path / "remote.pt")!r})
        AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print(type(model).__name__)
        """,
        tmp_path,
    )
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    assert_same_weights(remote["weights"], model.state_dict())
    assert (remote["logits"] - expected).abs().max().item() <= 1e-5  # float32 rounding (see assert_same_weights)
    assert "HybridLMForCausalLM" in out


def test_checkpoint_that_does_not_match_its_config_names_the_tensor(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mamba_d_state"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"A_log|x_proj|b_layernorm|c_layernorm"):
        AutoModelForCausalLM.from_pretrained(tmp_path)

    tiny_model().save_pretrained(tmp_path / "missing")
    weights = load_file(tmp_path / "missing" / "model.safetensors")
    del weights["model.layers.2.mamba.D"]
    save_file(weights, tmp_path / "missing" / "model.safetensors", metadata={"format": "pt"})
    # transformers' semantics: a missing tensor is initialised and reported
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "missing", output_loading_info=True)
    assert info["missing_keys"] == {"model.layers.2.mamba.D"} or info["missing_keys"] == ["model.layers.2.mamba.D"]
    torch.testing.assert_close(model.model.layers[2].mamba.D, torch.ones(64))


def test_bad_inputs_get_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token id 97.*\[0, 96\]"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1, 3]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, cached \+ new tokens\) = \(2, 11\)"):
        model(ids(), attention_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match="sequence length 0"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_more_bad_inputs_get_clear_errors_not_raw_ones():
    model = tiny_model()
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list.*return_tensors='pt'"):
        model([[1, 2, 3]])
    with pytest.raises(TypeError, match=r"inputs_embeds has dtype torch.float64, the model torch.float32"):
        model(inputs_embeds=torch.zeros(1, 3, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch is empty"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits_to_keep \(-1\) must be >= 0"):
        model(ids(), logits_to_keep=-1)
    with pytest.raises(TypeError, match="labels must be a tensor of integer token ids"):
        model(ids(), labels=ids().float())
    small = ids().to(torch.int16)  # the check admits int8/int16/uint8 ids: they are embedded like int64 ones
    torch.testing.assert_close(model(small).logits, model(ids()).logits)


def test_sequence_classification_uses_the_last_real_token():
    torch.manual_seed(0)
    model = hybrid_lm.HybridLMForSequenceClassification(tiny_config(num_labels=3)).eval()
    input_ids = ids(batch=1, length=6)
    alone = model(input_ids).logits
    right = torch.cat([input_ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), input_ids], 1)
    right_mask = (right != 0).long()
    left_mask = (left != 0).long()
    torch.testing.assert_close(model(right, attention_mask=right_mask).logits, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(left, attention_mask=left_mask).logits, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(right).logits, alone, atol=1e-5, rtol=1e-5)  # found through pad_token_id


# --- attention features against transformers' own classes ------------------------------------------------


def _load_mixtral_weights(model: hybrid_lm.HybridLMForCausalLM, reference: torch.nn.Module):
    """In-memory name map from transformers' Mixtral/Llama modules to hybrid_lm's."""
    state = {}
    for key, value in reference.state_dict().items():
        key = key.replace("post_attention_layernorm", "pre_ff_layernorm").replace("model.norm.", "model.final_layernorm.")
        key = key.replace(".mlp.gate.weight", ".feed_forward.router.weight").replace(".mlp.", ".feed_forward.")
        if key.endswith("experts.gate_up_proj"):
            for e, weight in enumerate(value):
                gate, up = weight.chunk(2, dim=0)
                state[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                state[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
        elif key.endswith("experts.down_proj"):
            for e, weight in enumerate(value):
                state[key.replace("down_proj", f"{e}.down_proj.weight")] = weight
        else:
            state[key] = value
    model.load_state_dict(state, strict=True)


def test_rope_gqa_sliding_window_and_renormalised_router_match_mixtral():
    torch.manual_seed(0)
    reference_config = MixtralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=6, rope_theta=500.0,
        attn_implementation="eager", max_position_embeddings=64,
    )
    reference = MixtralForCausalLM(reference_config).eval()
    config = tiny_config(
        num_hidden_layers=2, attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1,
        expert_layer_offset=0, use_rope=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        sliding_window=6, norm_topk_prob=True, rms_norm_eps=reference_config.rms_norm_eps,
    )
    model = hybrid_lm.HybridLMForCausalLM(config).eval()
    _load_mixtral_weights(model, reference)
    input_ids = ids(length=15)
    torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, atol=1e-4, rtol=1e-4)


def test_dense_rope_model_matches_llama():
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rope_theta=10000.0, max_position_embeddings=64,
    )).eval()
    config = tiny_config(num_hidden_layers=2, attn_layer_period=1, attn_layer_offset=0, layers_num_experts=[1, 1],
                         num_key_value_heads=1, use_rope=True, rms_norm_eps=reference.config.rms_norm_eps)
    model = hybrid_lm.HybridLMForCausalLM(config).eval()
    _load_mixtral_weights(model, reference)
    input_ids = ids(length=12)
    torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, atol=1e-4, rtol=1e-4)


def test_unknown_keyword_arguments_are_reported_not_silently_ignored(caplog):
    """Forwards take transformers' **kwargs (so its new arguments reach the attention implementations); a keyword
    that none of them uses is named in a warning."""
    model = tiny_model()
    with caplog.at_level(logging.WARNING, logger="hybrid_lm"):
        plain = model(ids()).logits
        torch.testing.assert_close(model(ids(), token_type_ids=torch.zeros(2, 11, dtype=torch.long)).logits, plain)
        model.model(ids(), foo=1)
    assert "['token_type_ids']" in caplog.text and "['foo']" in caplog.text


def test_seq_idx_marks_packed_documents_like_restarting_positions():
    model = tiny_model()
    input_ids = ids(batch=1, length=12)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    seq_idx = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]])
    torch.testing.assert_close(model(input_ids, seq_idx=seq_idx).logits, model(input_ids, position_ids=positions).logits)


def test_training_and_decoding_steps_trace_without_graph_breaks():
    """torch.compile sees the whole step (experts and packed documents included) as one graph."""
    model = tiny_model().train()
    input_ids = ids(length=12)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]] * 2)

    def train_step(input_ids, positions):
        return model(input_ids, labels=input_ids, position_ids=positions).loss

    train_step(input_ids, positions)  # eager first: transformers installs its output-recording hooks on first use
    explanation = torch._dynamo.explain(train_step)(input_ids, positions)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    model.eval()
    cache = getattr(model(input_ids, use_cache=True), CACHE_NAME)
    explanation = torch._dynamo.explain(lambda token: model(token, cache=cache, use_cache=True).logits)(
        input_ids[:, -1:]
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
