import json

import pytest
from transformers import AutoConfig, JambaConfig

import hybrid_lm
from hybrid_lm import HybridLMConfig
from builders import tiny_model


def test_period_offset_resolve_to_the_layer_plan():
    config = HybridLMConfig(num_hidden_layers=8, attn_layer_period=4, attn_layer_offset=2,
                            expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2)
    assert config.layers_block_type == ["mamba", "mamba", "attention", "mamba"] * 2
    assert config.layers_num_experts == [1, 4] * 4
    assert config.layer_types == ["linear_attention", "linear_attention", "full_attention", "linear_attention"] * 2
    plan = config.layer_plan().splitlines()
    assert len(plan) == 1 + 8
    assert "attention:mamba = 2:6" in plan[0]
    assert "attention" in plan[3] and "mlp" in plan[3]
    assert "mamba" in plan[2] and "moe" in plan[2] and "4 experts, top-2" in plan[2]


def test_explicit_lists_win_over_period_and_offset():
    config = HybridLMConfig(num_hidden_layers=3, attn_layer_period=2, attn_layer_offset=1,
                            layers_block_type=["attention", "attention", "mamba"], layers_num_experts=[0, 1, 8])
    assert config.layers_block_type == ["attention", "attention", "mamba"]
    assert [config.feed_forward_type(i) for i in range(3)] == ["none", "mlp", "moe"]
    assert "none" in config.layer_plan().splitlines()[1]


def test_pure_families_are_expressible():
    mamba = HybridLMConfig(num_hidden_layers=4, layers_block_type=["mamba"] * 4, layers_num_experts=[0] * 4,
                           intermediate_size=0)
    assert "attention:mamba = 0:4" in mamba.layer_plan()
    transformer = HybridLMConfig(num_hidden_layers=4, attn_layer_period=1, attn_layer_offset=0)
    assert set(transformer.layers_block_type) == {"attention"}


def test_jamba_config_maps_field_by_field():
    jamba = JambaConfig(num_hidden_layers=16, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
                        expert_layer_offset=1, num_experts=16, num_experts_per_tok=2, hidden_size=256,
                        intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)
    shared = {k: v for k, v in jamba.to_dict().items() if k in HybridLMConfig.__dataclass_fields__
              and k not in ("model_type", "transformers_version", "architectures")}
    config = HybridLMConfig(**shared)
    assert config.layers_block_type == jamba.layers_block_type
    assert config.layers_num_experts == jamba.layers_num_experts
    assert config.mamba_dt_rank == jamba.mamba_dt_rank


def test_save_and_load_round_trip(tmp_path):
    config = HybridLMConfig(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=0, use_rope=True,
                            sliding_window=64, norm_topk_prob=True, router_z_loss_coef=1e-3)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "hybrid_lm"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_hybrid_lm.HybridLMForCausalLM"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, HybridLMConfig)
    for name in ("layers_block_type", "layers_num_experts", "use_rope", "sliding_window", "norm_topk_prob",
                 "router_z_loss_coef", "rope_parameters", "head_dim", "mamba_dt_rank"):
        assert getattr(loaded, name) == getattr(config, name), name


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(attn_layer_offset=4, attn_layer_period=4), ["attn_layer_offset (4)", "attn_layer_period (4)", "0..3"]),
        (dict(expert_layer_offset=2, expert_layer_period=2), ["expert_layer_offset (2)", "0..1"]),
        (dict(attn_layer_period=0), ["attn_layer_period (0)"]),
        (dict(attn_layer_offset=-1), ["attn_layer_offset (-1)"]),
        (dict(num_experts=4, num_experts_per_tok=5), ["num_experts_per_tok (5)", "num_experts (4)"]),
        (dict(num_experts_per_tok=0), ["num_experts_per_tok (0)"]),
        (dict(num_experts=0), ["num_experts (0)"]),
        (dict(hidden_size=100, num_attention_heads=16), ["hidden_size (100)", "num_attention_heads (16)", "head_dim"]),
        (dict(num_attention_heads=16, num_key_value_heads=3), ["num_key_value_heads (3)", "num_attention_heads (16)"]),
        (dict(num_hidden_layers=2, layers_block_type=["attention", "conv"]), ["layers_block_type[1]", "'conv'"]),
        (dict(num_hidden_layers=3, layers_block_type=["mamba"] * 2), ["layers_block_type has 2", "num_hidden_layers is 3"]),
        (dict(num_hidden_layers=2, layers_num_experts=[1]), ["layers_num_experts has 1", "num_hidden_layers is 2"]),
        (dict(num_hidden_layers=2, num_experts=8, layers_num_experts=[1, 3]), ["layers_num_experts[1] is 3"]),
        (dict(kernel_backend="fast"), ["kernel_backend ('fast')"]),
        (dict(hidden_act="swishy"), ["hidden_act ('swishy')"]),
        (dict(router_aux_loss_coef=-0.1), ["router_aux_loss_coef (-0.1)"]),
        (dict(mamba_dt_rank=0), ["mamba_dt_rank (0)"]),
        (dict(mamba_d_state=0), ["mamba_d_state (0)"]),
        (dict(sliding_window=0), ["sliding_window (0)"]),
        (dict(vocab_size=0), ["vocab_size (0)"]),
        (dict(use_rope=True, hidden_size=36, num_attention_heads=4, num_key_value_heads=4), ["even head_dim", "9"]),
        (dict(intermediate_size=0), ["intermediate_size (0)"]),
        (dict(mamba_dt_min=0.5, mamba_dt_max=0.1), ["mamba_dt_min (0.5)", "mamba_dt_max (0.1)"]),
    ],
)
def test_inconsistent_values_name_the_field_and_rule(fields, words):
    with pytest.raises(ValueError) as error:
        HybridLMConfig(**fields)
    for word in words:
        assert word in str(error.value)


def test_explicit_head_dim_lifts_the_divisibility_rule():
    config = HybridLMConfig(hidden_size=100, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    assert config.head_dim == 32


def test_package_registers_the_auto_config():
    assert AutoConfig.for_model("hybrid_lm").__class__ is hybrid_lm.HybridLMConfig


# ----------------------------------------------------------------------------- nothing silent


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(attn_layer_perod=4), r"'attn_layer_perod' \(4\) is not a HybridLMConfig field; did you mean "
                                   r"'attn_layer_period'\?"),
        (dict(num_layers=12), r"'num_layers' \(12\) is not a HybridLMConfig field; did you mean 'num_hidden_layers'"),
        (dict(tie_word_embeddings="no"), r"tie_word_embeddings \('no'\) must be True or False"),
        (dict(use_rope=1), r"use_rope \(1\) must be True or False"),
        (dict(pad_token_id=-1), r"pad_token_id \(-1\) must be None or an id in the vocabulary, 0\.\.65535"),
        (dict(vocab_size=100, pad_token_id=100), r"pad_token_id \(100\) must be None or an id in the vocabulary, "
                                                 r"0\.\.99 \(vocab_size 100\)"),
        (dict(vocab_size=100, eos_token_id=[2, 150]), r"eos_token_id \(\[2, 150\]\) must be None or an id"),
        (dict(vocab_size=100, bos_token_id=100), r"bos_token_id \(100\)"),
        (dict(initializer_range=-0.02), r"initializer_range \(-0\.02\) must be a number >= 0"),
        (dict(attention_dropout=1.0), r"attention_dropout \(1\.0\) is a probability: use 0 <= p < 1"),
        (dict(attention_dropout=-0.1), r"attention_dropout \(-0\.1\) is a probability"),
        (dict(use_rope=True, rope_parameters={"rope_type": "bogus", "rope_theta": 1e4}),
         r"rope_parameters\['rope_type'\] \('bogus'\) is unknown; use one of \['default', 'linear'"),
        (dict(num_hidden_layers=2, layers_block_type="attention"),
         r"layers_block_type \('attention'\) must be a list with one entry per layer"),
        (dict(num_hidden_layers=2, layers_num_experts="11"), r"layers_num_experts \('11'\) must be a list"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        HybridLMConfig(**fields)


def test_a_typo_in_config_json_is_refused_on_load(tmp_path):
    HybridLMConfig(num_hidden_layers=4).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "attn_layer_perod": 2}))
    with pytest.raises(ValueError, match="'attn_layer_perod' .* did you mean 'attn_layer_period'"):
        AutoConfig.from_pretrained(tmp_path)


def test_keys_transformers_itself_passes_are_accepted(tmp_path):
    config = HybridLMConfig(num_hidden_layers=4, vocab_size=100, eos_token_id=[2, 3], pad_token_id=None,
                            torch_dtype="float32", name_or_path="x", attn_implementation="eager", num_labels=3,
                            tokenizer_class="HybridLMTokenizer", transformers_version="5.17.0",
                            architectures=["HybridLMForCausalLM"], max_length=20, _commit_hash=None)
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    config.save_pretrained(tmp_path)
    loaded, unused = AutoConfig.from_pretrained(tmp_path, return_unused_kwargs=True, dtype="auto",
                                                output_attentions=False, not_a_field=1)
    assert unused == {"not_a_field": 1}
    assert loaded.eos_token_id == [2, 3] and loaded.num_labels == 3
    assert loaded.quantization_config["load_in_8bit"] is True


def test_a_saved_model_config_loads_back(tmp_path):
    model = tiny_model()
    model.config.use_cache = False
    model.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.architectures == ["HybridLMForCausalLM"] and loaded.use_cache is False


# ----------------------------------------------------------------------------- loading errors name the path


def test_loading_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist \(and is not a Hub repo id\); pass a folder"):
        HybridLMConfig.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is an empty folder: nothing to load"):
        HybridLMConfig.from_pretrained(tmp_path / "empty")
    HybridLMConfig(num_hidden_layers=4).save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    for content, message in [("", r"config\.json is empty; save it again"),
                             ('{"vocab_size": 1', r"config\.json is not valid JSON \(.*; 16 bytes, truncated\?\)"),
                             (json.dumps({k: v for k, v in saved.items() if k != "model_type"}),
                              r"has no model_type; a hybrid_lm config says \"model_type\": \"hybrid_lm\""),
                             (json.dumps({**saved, "model_type": "jamba"}),
                              r"holds a 'jamba' checkpoint, not 'hybrid_lm'; .* python conversion/convert\.py")]:
        (tmp_path / "ckpt" / "config.json").write_text(content)
        with pytest.raises(ValueError, match=message):
            HybridLMConfig.from_pretrained(tmp_path / "ckpt")
