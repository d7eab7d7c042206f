"""conversion/convert.py against transformers' own classes: same random weights, same logits, losses and greedy
generations; hybrid_lm -> Jamba -> hybrid_lm is exact; what a format cannot express is refused clearly."""

import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    JambaConfig,
    JambaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import hybrid_lm
from builders import LAYOUTS, run_without_package, tiny_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "conversion"))
import convert as convert_module  # noqa: E402
from convert import ConversionError, ConversionWarning, convert, shard_size  # noqa: E402

VOCAB = 101


def perturb_(model):
    """Non-trivial norms, biases, D and A_log, so a mix-up between them would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith((".D", "A_log")) or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def assert_same_model(reference, model, vocab=VOCAB):
    """Equal logits (max abs diff <= 1e-4, float32) and equal 20-token greedy generations."""
    input_ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids, use_cache=False).logits
        actual = model(input_ids, use_cache=False).logits
    assert (actual - expected).abs().max().item() <= 1e-4
    greedy = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    prompt = input_ids[:, :7]
    torch.testing.assert_close(model.generate(prompt, **greedy), reference.generate(prompt, **greedy), atol=0, rtol=0)


def load_hybrid(folder):
    return hybrid_lm.HybridLMForCausalLM.from_pretrained(folder).eval()


# ----------------------------------------------------------------------------- source builders


def jamba_folder(path: Path, layout="1:3", num_experts=4, top_k=2, seed=0, merged_experts=False, layers=8) -> Path:
    torch.manual_seed(seed)
    if layout == "all-mamba":
        period, offset = 16, 9  # no layer index reaches the offset within 8 layers
    elif layout == "all-attention":
        period, offset = 1, 0
    else:
        period, offset = LAYOUTS[layout]
    config = JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers, attn_layer_period=period,
        attn_layer_offset=offset, expert_layer_period=2, expert_layer_offset=1, num_experts=num_experts,
        num_experts_per_tok=top_k, num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8,
        router_aux_loss_coef=0.02,
    )
    model = perturb_(JambaForCausalLM(config).eval())
    model.save_pretrained(path)
    if merged_experts:  # the layout transformers uses in memory: one 3D tensor per projection
        _save_in_memory_layout(model, path, ".experts.")
    return path


def _save_in_memory_layout(model, path: Path, marker: str) -> None:
    """Rewrites model.safetensors so the tensors whose name contains `marker` use the in-memory names."""
    weights = {k: v for k, v in load_file(path / "model.safetensors").items()}
    state = model.state_dict()
    on_disk_only = [k for k in weights if k not in state]
    for key in on_disk_only:
        del weights[key]
    weights.update({k: v.contiguous() for k, v in state.items() if marker in k})
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def mamba_folder(path: Path, seed=0, **overrides) -> Path:
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, state_size=8, expand=2, conv_kernel=4)
    perturb_(MambaForCausalLM(MambaConfig(**{**fields, **overrides})).eval()).save_pretrained(path)
    return path


def mamba_ssm_folder(path: Path, vocab_size=97, multiple=8, seed=0, **overrides):
    """A state-spaces `MambaLMHeadModel` folder (config.json + pytorch_model.bin, padded vocabulary), and the
    transformers MambaForCausalLM holding the same weights."""
    torch.manual_seed(seed)
    padded = math.ceil(vocab_size / multiple) * multiple
    reference = MambaForCausalLM(MambaConfig(vocab_size=padded, hidden_size=32, num_hidden_layers=3, state_size=8,
                                             expand=2, conv_kernel=4, layer_norm_epsilon=1e-5)).eval()
    perturb_(reference)
    path.mkdir()
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in reference.state_dict().items()}
    torch.save(state, path / "pytorch_model.bin")
    config = {
        "d_model": 32, "d_intermediate": 0, "n_layer": 3, "vocab_size": vocab_size,
        "ssm_cfg": {"layer": "Mamba1", "d_state": 8}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": multiple, "tie_embeddings": True,
        **overrides,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path, reference


def mixtral_folder(path: Path, merged_experts=False, seed=0, **overrides) -> Path:
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=7,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0}, max_position_embeddings=64)
    model = perturb_(MixtralForCausalLM(MixtralConfig(**{**fields, **overrides})).eval())
    model.save_pretrained(path)
    if merged_experts:
        _save_in_memory_layout(model, path, ".mlp.")
    return path


LLAMA_VARIANTS = {
    # Llama 3 scaling written the legacy way (rope_theta + rope_scaling), tied embeddings, head_dim != H / heads
    "llama3-legacy-tied": dict(
        tie_word_embeddings=True, head_dim=16, max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "yarn-biases": dict(
        attention_bias=True, mlp_bias=True, max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16},
    ),
}


def llama_folder(path: Path, variant="yarn-biases", seed=0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **LLAMA_VARIANTS[variant])
    perturb_(LlamaForCausalLM(config).eval()).save_pretrained(path)
    if "legacy" in variant:  # what transformers 4 wrote
        config = json.loads((path / "config.json").read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = rope
        (path / "config.json").write_text(json.dumps(config))
    return path


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


# ----------------------------------------------------------------------------- jamba


CASES = [
    ("1:1", 4, 2), ("1:3", 4, 2), ("1:7", 4, 1), ("all-mamba", 4, 2), ("all-attention", 4, 1),
    ("1:3", 1, 1),  # no experts: every feed-forward is a dense MLP
]


@pytest.mark.parametrize("layout, num_experts, top_k", CASES)
def test_jamba_conversion_gives_equal_logits_and_losses(tmp_path, layout, num_experts, top_k):
    src = jamba_folder(tmp_path / "jamba", layout, num_experts, top_k)
    dst = convert(src, tmp_path / "hybrid", verify=False)
    reference = JambaForCausalLM.from_pretrained(src).eval()
    model = load_hybrid(dst)
    expected_types = reference.config.layers_block_type
    assert model.config.layers_block_type == expected_types

    input_ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    moe = num_experts > 1
    with torch.no_grad():
        ref = reference(input_ids, labels=input_ids, use_cache=False, output_router_logits=moe)
        out = model(input_ids, labels=input_ids, use_cache=False, output_router_logits=moe)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    if moe:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)


def test_jamba_conversion_generates_what_jamba_generates(tmp_path):
    src = jamba_folder(tmp_path / "jamba", "1:1", layers=4)
    assert_same_model(JambaForCausalLM.from_pretrained(src).eval(), load_hybrid(convert(src, tmp_path / "hybrid")))


def test_merged_expert_layout_converts_too(tmp_path):
    src = jamba_folder(tmp_path / "jamba", merged_experts=True)
    dst = convert(src, tmp_path / "hybrid", verify=True)
    assert any(".experts.3.up_proj" in key for key in load_file(dst / "model.safetensors"))


def test_bfloat16_keeps_the_ssm_parameters_in_float32(tmp_path):
    src = jamba_folder(tmp_path / "jamba")
    dst = convert(src, tmp_path / "hybrid", dtype="bfloat16", verify=True)  # oracle rounded alike: passes
    weights = load_file(dst / "model.safetensors")
    kept = {k for k in weights if k.endswith(("A_log", ".D", "dt_proj.bias"))}
    assert kept and all(weights[k].dtype == torch.float32 for k in kept)
    assert all(v.dtype == torch.bfloat16 for k, v in weights.items() if k not in kept)
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    model = hybrid_lm.HybridLMForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
    assert model.model.layers[0].mamba.A_log.dtype == torch.float32


def test_jamba_with_another_activation_is_refused(tmp_path):
    src = jamba_folder(tmp_path / "jamba")
    edit_config(src, hidden_act="gelu")
    with pytest.raises(ConversionError, match="hidden_act is 'gelu'.*Mamba conv"):
        convert(src, tmp_path / "hybrid")


# ----------------------------------------------------------------------------- mamba


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=False, use_bias=True, use_conv_bias=False,
                                                time_step_rank=5)], ids=["tied", "untied-biases"])
def test_mamba_conversion_matches_transformers_mamba(tmp_path, overrides):
    src = mamba_folder(tmp_path / "mamba", **overrides)
    dst = convert(src, tmp_path / "hybrid", verify=True)
    model = load_hybrid(dst)
    assert model.config.layers_block_type == ["mamba"] * 3 and model.config.layers_num_experts == [0] * 3
    assert not hasattr(model.model.layers[0], "feed_forward")
    assert_same_model(MambaForCausalLM.from_pretrained(src).eval(), model)


def test_mamba_ssm_layout_with_padded_vocabulary(tmp_path):
    src, reference = mamba_ssm_folder(tmp_path / "ssm", vocab_size=97, multiple=8)
    dst = convert(src, tmp_path / "hybrid", verify=True)
    model = load_hybrid(dst)
    assert model.config.vocab_size == 104  # the embedding's rows, not config.json's 97
    assert model.config.tie_word_embeddings and model.config.rms_norm_eps == 1e-5
    assert_same_model(reference, model, vocab=104)


@pytest.mark.parametrize("changes, message", [
    (dict(rms_norm=False), "LayerNorm"),
    (dict(ssm_cfg={"layer": "Mamba2"}), "Mamba-2"),
    (dict(attn_layer_idx=[1]), "attention layers"),
    (dict(d_intermediate=64), "GatedMLP"),
])
def test_mamba_ssm_features_hybrid_lm_lacks_are_refused(tmp_path, changes, message):
    src, _ = mamba_ssm_folder(tmp_path / "ssm")
    edit_config(src, **changes)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "hybrid")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssm"]


# ----------------------------------------------------------------------------- mixtral, llama


@pytest.mark.parametrize("merged_experts", [False, True], ids=["on-disk", "in-memory"])
def test_mixtral_conversion_matches_transformers_mixtral(tmp_path, merged_experts):
    src = mixtral_folder(tmp_path / "mixtral", merged_experts)
    dst = convert(src, tmp_path / "hybrid", verify=True)
    model = load_hybrid(dst)
    config = model.config
    assert config.norm_topk_prob and config.use_rope and config.sliding_window == 7
    assert config.layers_num_experts == [4, 4] and config.layers_block_type == ["attention"] * 2
    reference = MixtralForCausalLM.from_pretrained(src).eval()
    assert_same_model(reference, model)
    input_ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the loss includes the router's load-balancing term, computed the same way
        ref = reference(input_ids, labels=input_ids, use_cache=False, output_router_logits=True)
        out = model(input_ids, labels=input_ids, use_cache=False, output_router_logits=True)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_mixtral_router_jitter_is_dropped_with_a_warning(tmp_path):
    src = mixtral_folder(tmp_path / "mixtral", router_jitter_noise=0.1)
    with pytest.warns(ConversionWarning, match="router_jitter_noise"):
        convert(src, tmp_path / "hybrid", verify=True)


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_llama_conversion_matches_transformers_llama(tmp_path, variant):
    src = llama_folder(tmp_path / "llama", variant)
    dst = convert(src, tmp_path / "hybrid", verify=True)
    model = load_hybrid(dst)
    reference = LlamaForCausalLM.from_pretrained(src).eval()
    assert model.config.rope_parameters["rope_type"] == reference.config.rope_parameters["rope_type"]
    assert model.config.layers_num_experts == [1, 1]
    assert_same_model(reference, model)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "'dynamic' is not supported"),
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial RoPE"),
])
def test_rope_variants_hybrid_lm_lacks_are_refused(tmp_path, rope, message):
    src = llama_folder(tmp_path / "llama")
    edit_config(src, rope_parameters=rope)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "hybrid")


# ----------------------------------------------------------------------------- export to jamba


def test_hybrid_to_jamba_to_hybrid_is_exact(tmp_path):
    original = perturb_(tiny_model(seed=3, layers_block_type=["mamba", "attention", "mamba", "attention"],
                                   layers_num_experts=[1, 4, 1, 4], router_z_loss_coef=0.01))
    original.save_pretrained(tmp_path / "hybrid")
    with pytest.warns(ConversionWarning, match="router_z_loss_coef"):
        jamba = convert(tmp_path / "hybrid", tmp_path / "jamba", target_format="jamba", verify=True)
    config = json.loads((jamba / "config.json").read_text())
    assert config["model_type"] == "jamba" and "auto_map" not in config
    assert (config["attn_layer_period"], config["attn_layer_offset"]) == (2, 1)
    assert not (jamba / "modeling_hybrid_lm.py").exists()
    assert "model.layers.1.feed_forward.experts.3.down_proj.weight" in load_file(jamba / "model.safetensors")
    assert_same_model(original, JambaForCausalLM.from_pretrained(jamba).eval(), vocab=97)

    back = convert(jamba, tmp_path / "back", verify=True)
    before, after = load_file(tmp_path / "hybrid" / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key


EXPORT_REFUSALS = [
    (dict(use_rope=True), "RoPE"),
    (dict(sliding_window=8), "sliding-window attention"),
    (dict(norm_topk_prob=True), "renormalised top-K"),
    (dict(layers_num_experts=[0, 4, 1, 4]), r"without a feed-forward block \(layer \[0\]\)"),
    (dict(attention_bias=True), "attention biases"),
    (dict(mlp_bias=True), "MLP biases"),
    (dict(head_dim=16), "head_dim 16"),
    (dict(mamba_inner_layernorms=False), "dt/B/C RMSNorms"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(layers_block_type=["attention", "attention", "mamba", "attention"]), "no attn_layer_period"),
    (dict(layers_num_experts=[4, 4, 1, 4]), "no expert_layer_period"),
]


@pytest.mark.parametrize("overrides, message", EXPORT_REFUSALS, ids=[m.split()[0] for _, m in EXPORT_REFUSALS])
def test_export_to_jamba_refuses_what_jamba_lacks(tmp_path, overrides, message):
    tiny_model(**overrides).save_pretrained(tmp_path / "hybrid")
    with pytest.raises(ConversionError, match="Jamba cannot express this model: .*" + message):
        convert(tmp_path / "hybrid", tmp_path / "jamba", target_format="jamba")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hybrid"]


def test_export_names_every_missing_feature_and_wrong_directions_are_refused(tmp_path):
    tiny_model(use_rope=True, sliding_window=8).save_pretrained(tmp_path / "hybrid")
    with pytest.raises(ConversionError, match="RoPE.*; sliding-window"):
        convert(tmp_path / "hybrid", tmp_path / "out", target_format="jamba")
    with pytest.raises(ConversionError, match="use --to jamba"):
        convert(tmp_path / "hybrid", tmp_path / "out")
    src = jamba_folder(tmp_path / "jamba")
    with pytest.raises(ConversionError, match="convert it to hybrid_lm first"):
        convert(src, tmp_path / "out", target_format="jamba")


# ----------------------------------------------------------------------------- command line and bad input


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "conversion" / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_command_line_converts_verifies_and_loads_remotely(tmp_path):
    src = jamba_folder(tmp_path / "jamba")
    (src / "tokenizer_config.json").write_text("{}")
    result = run_cli(src, tmp_path / "out", "--max-shard-size", "40KB")  # as transformers reads it: 40000 bytes
    assert result.returncode == 0, result.stderr
    assert "max |logit difference|" in result.stdout
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "hybrid_lm" and "AutoModelForCausalLM" in config["auto_map"]
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    printed = run_without_package(f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}, trust_remote_code=True)
        print(type(model).__name__, model.config.layers_block_type.count("attention"))
    """, tmp_path)
    assert printed.split() == ["HybridLMForCausalLM", "2"]


def test_command_line_errors_exit_2_without_a_traceback(tmp_path):
    src = jamba_folder(tmp_path / "jamba")
    (tmp_path / "taken").mkdir()
    result = run_cli(src, tmp_path / "taken")
    assert result.returncode == 2
    assert result.stderr.startswith("error: destination") and "already exists" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_input_is_refused_and_leaves_nothing_behind(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "a")
    src = jamba_folder(tmp_path / "jamba")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert(src, tmp_path / "taken")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="has no config.json"):
        convert(tmp_path / "empty", tmp_path / "b")
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="no safetensors weights"):
        convert(tmp_path / "empty", tmp_path / "b")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="not valid JSON"):
        convert(tmp_path / "empty", tmp_path / "b")

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConversionError, match="unsupported model_type 'bert'"):
        convert(tmp_path / "bert", tmp_path / "b")

    with monkeypatch.context() as patch:  # fails after writing everything
        patch.setattr(convert_module, "verify_conversion", lambda *args: 1.0)
        with pytest.raises(ConversionError, match="disagrees with the source"):
            convert(src, tmp_path / "c")
    edit_config(src, mamba_d_state=4)
    with pytest.raises(ConversionError, match=r"has shape .* but config.json implies"):
        convert(src, tmp_path / "c", verify=False)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["bert", "empty", "jamba", "taken"]


def test_missing_shard_and_unknown_tensor_are_refused(tmp_path):
    src = tmp_path / "jamba"
    JambaForCausalLM.from_pretrained(jamba_folder(tmp_path / "one")).save_pretrained(src, max_shard_size="30KB")
    shards = sorted(src.glob("model-*.safetensors"))
    weights = load_file(shards[0])
    save_file({**weights, "model.layers.0.mamba.extra": torch.zeros(1)}, shards[0], metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="'model.layers.0.mamba.extra' .* has no place"):
        convert(src, tmp_path / "out")
    src_llama = llama_folder(tmp_path / "llama")
    weights = load_file(src_llama / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # what old transformers 4 saved: dropped
    save_file(weights, src_llama / "model.safetensors", metadata={"format": "pt"})
    convert(src_llama, tmp_path / "llama-hybrid", verify=False)
    save_file({**weights, "model.layers.0.mystery.weight": torch.zeros(1)}, src_llama / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="'model.layers.0.mystery.weight' is not part of a llama checkpoint"):
        convert(src_llama, tmp_path / "out")
    shards[-1].unlink()
    with pytest.raises(ConversionError, match=f"lists shards that are missing: \\['{shards[-1].name}'\\]"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# ----------------------------------------------------------------------------- at the edges


def staging_folders(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if ".converting-" in path.name)


def start_slow_conversion(src: Path, dst: Path) -> subprocess.Popen:
    """convert.py's command line as a process that blocks in verification, once its work folder is full; returns
    when it is. (`run_command_line`, with the module's verification replaced: a script run anew would define the
    real one again, whose few seconds the signal could miss.) Ctrl-C is handled as in a terminal even where the
    tests run as a background job, whose children inherit an ignored SIGINT."""
    code = (f"import signal, sys, time; sys.path.insert(0, {str(ROOT / 'conversion')!r}); import convert; "
            "convert.verify_conversion = lambda *a: time.sleep(60); "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.exit(convert.run_command_line([{str(src)!r}, {str(dst)!r}]))")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        folders = [dst.parent / name for name in staging_folders(dst.parent)]
        if folders and (folders[0] / "config.json").exists():
            return process
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the conversion never reached verification: {process.communicate()}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_conversion_leaves_nothing_behind(tmp_path, signum):
    src = jamba_folder(tmp_path / "jamba", layers=2)
    process = start_slow_conversion(src, tmp_path / "out")
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted; " in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jamba"]


def test_the_next_run_removes_what_a_killed_one_left(tmp_path, capsys):
    src = jamba_folder(tmp_path / "jamba", layers=2)
    process = start_slow_conversion(src, tmp_path / "out")
    process.kill()
    process.wait()
    (left,) = staging_folders(tmp_path)
    convert(src, tmp_path / "out", verify=False)
    assert f"removed {tmp_path / left}, left behind by an interrupted earlier conversion" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jamba", "out"]


def test_destination_problems_and_a_truncated_shard_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    src = jamba_folder(tmp_path / "jamba", layers=2)
    (tmp_path / "a_file").write_text("x")
    capsys.readouterr()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))

    cases = [((tmp_path / "a_file" / "out",), "destination .*a_file/out is below .*a_file, which is a file; choose a "
                                              "folder path"),
             ((tmp_path / "locked" / "out",), "cannot create .*locked/out \\(Permission denied: .*locked\\); choose a "
                                              "writable destination"),
             ((tmp_path / "out", "--tolerance", "nan"), "--tolerance must be a number >= 0 .* got nan"),
             ((tmp_path / "out", "--tolerance", "-1"), "--tolerance must be a number >= 0 .* got -1.0")]
    for args, message in cases:
        with monkeypatch.context() as patch:
            if "locked" in str(args[0]):
                patch.setattr(convert_module.tempfile, "mkdtemp", refuse)
            assert convert_module.main([str(src), *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(f"error: {message}\n", err), err
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert convert_module.main([str(src), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: {weights} is truncated or damaged (Error while deserializing header: "
                                       "incomplete metadata, file not fully covered); download or copy it again\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "jamba", "locked"]
    assert not any((tmp_path / "locked").iterdir())


def test_max_shard_size_reads_units_as_transformers_does(capsys):
    assert shard_size("2GB") == 2 * 10**9 and shard_size("1GiB") == 2**30 and shard_size("40000") == 40000
    with pytest.raises(SystemExit):
        convert_module.main(["a", "b", "--max-shard-size", "lots"])
    assert "'lots' is not a size; give bytes or e.g. 2GB" in capsys.readouterr().err


def test_output_permissions_follow_the_umask_and_the_source_tokenizer_stays_itself(tmp_path):
    src = jamba_folder(tmp_path / "jamba", layers=2)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["hello world 2024"] * 50, trainer=trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.save(str(src / "tokenizer.json"))  # no tokenizer_config.json: AutoTokenizer would go by model_type
    (src / "tokenizer.json").chmod(0o600)
    source_ids = backend.encode("hello world 2024").ids
    old = os.umask(0o022)
    try:
        convert(src, tmp_path / "out", verify=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name
    settings = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hello world 2024")["input_ids"] == source_ids
