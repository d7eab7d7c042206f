import json

import pytest
from transformers import AutoConfig, JambaConfig

import hybrid_lm
from hybrid_lm import HybridLMConfig


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
