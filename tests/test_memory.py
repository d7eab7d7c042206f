"""hybrid-lm memory: exact parameter counts, the byte formulas, the CLI, and Jamba-v0.1's published figures."""

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

from hybrid_lm import HybridLMConfig, HybridLMForCausalLM
from hybrid_lm.cli import main
from hybrid_lm.hub_hybrid_lm import parameter_counts
from hybrid_lm.feed_forward_hybrid_lm import HybridLMSparseMoeBlock
from hybrid_lm.memory_hybrid_lm import (
    moe_activation_bytes,
    JSON_KEYS,
    estimate_memory,
    load_source_config,
    meta_model,
    quantized_linear_names,
    quantized_weight_bytes,
)
from hybrid_lm.source_configs_hybrid_lm import jamba_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from oracles import LiveTensorBytes  # noqa: E402
from memory import cache_bytes  # noqa: E402  (benchmarks/memory.py: what the GPU benchmark measures)

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
            expert_layer_offset=0, num_experts=4, num_experts_per_tok=2, mamba_d_state=4)
CONFIGS = [
    pytest.param(TINY, id="hybrid-moe"),
    pytest.param({**TINY, "layers_block_type": ["mamba"] * 4, "layers_num_experts": [0] * 4}, id="all-mamba"),
    pytest.param({**TINY, "layers_block_type": ["attention"] * 4, "layers_num_experts": [1] * 4}, id="all-attention"),
    pytest.param({**TINY, "tie_word_embeddings": True}, id="tied"),
    pytest.param({**TINY, "attention_bias": True, "mlp_bias": True, "mamba_proj_bias": True}, id="biases"),
    pytest.param({**TINY, "mamba_inner_layernorms": False, "mamba_conv_bias": False}, id="no-inner-norms"),
]

# Jamba-v0.1's config.json (ai21labs/Jamba-v0.1), the fields that set sizes
JAMBA_V01 = dict(
    model_type="jamba", vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
    expert_layer_offset=1, num_experts=16, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
    mamba_dt_rank=256, mamba_conv_bias=True, mamba_proj_bias=False, tie_word_embeddings=False,
    max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
)
GB = 1e9  # "80GB" as GPUs are sold: 80e9 bytes = 74.5 GiB, below the ~79.6 GiB an H100 80GB reports


@pytest.mark.parametrize("fields", CONFIGS)
def test_counts_are_those_of_the_built_model(fields):
    config = HybridLMConfig(**fields)
    model = HybridLMForCausalLM(config)
    estimate = estimate_memory(config, context=16)
    assert (estimate.total_params, estimate.active_params) == parameter_counts(model)
    assert estimate.total_params == sum(p.numel() for p in model.parameters())
    bf16 = model.to(torch.bfloat16)
    assert estimate.weights_bytes == sum(p.numel() * p.element_size() for p in bf16.parameters())


def test_active_parameters_leave_out_the_experts_a_token_is_not_routed_to():
    config = HybridLMConfig(**TINY)
    expert = 3 * config.hidden_size * config.intermediate_size
    moe_layers = sum(n > 1 for n in config.layers_num_experts)
    estimate = estimate_memory(config, context=16)
    assert estimate.total_params - estimate.active_params == moe_layers * (4 - 2) * expert


@pytest.mark.parametrize("weights", ["bf16", "int8", "nf4", "fp4"])
def test_json_parts_add_up_to_the_total(weights):
    estimate = estimate_memory(HybridLMConfig(**TINY), context=1000, batch=3, weights=weights)
    parts = estimate.to_dict()
    assert set(JSON_KEYS) <= set(parts)
    assert parts["total_bytes"] == sum(parts[key] for key in ("weights_bytes", "kv_cache_bytes",
                                                              "mamba_state_bytes", "activation_bytes"))


@pytest.mark.parametrize("weights", ["int8", "nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_weights_keep_the_high_precision_parts(weights, double_quant):
    config = HybridLMConfig(**TINY)
    model = meta_model(config)
    quantized = quantized_linear_names(model)
    assert quantized and not any(".mamba." in name or name == "lm_head" for name in quantized)
    expected = 0
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")
        if module in quantized and kind == "weight":
            expected += quantized_weight_bytes(*param.shape, weights, double_quant)
        elif name.endswith(("A_log", ".D", "dt_proj.bias")):
            assert param.dtype == torch.float32
            expected += 4 * param.numel()
        else:  # embeddings, lm_head, Mamba projections and conv, routers, norms
            expected += 2 * param.numel()
    assert estimate_memory(config, 16, weights=weights, double_quant=double_quant).weights_bytes == expected


def test_bitsandbytes_layouts():
    assert quantized_weight_bytes(256, 128, "int8") == 256 * 128 + 4 * 256  # int8 CB + float32 SCB per row
    assert quantized_weight_bytes(256, 128, "nf4") == 256 * 128 // 2 + 4 * 512 + 64  # + float32 absmax / 64
    assert quantized_weight_bytes(256, 128, "nf4", double_quant=True) == 256 * 128 // 2 + 512 + 4 * 2 + 4 + 1024 + 64


def test_cache_and_state_formulas():
    config = HybridLMConfig(**TINY)
    estimate = estimate_memory(config, context=1000, batch=3)
    assert estimate.kv_cache_bytes == 2 * 2 * 3 * 2 * 8 * 1000 * 2  # layers, K+V, batch, kv heads, head dim, tokens
    assert estimate.mamba_state_bytes == 2 * (3 * 64 * 3 * 2 + 3 * 64 * 4 * 4)  # conv bf16 + SSM fp32
    windowed = estimate_memory(HybridLMConfig(**TINY, sliding_window=100), context=1000, batch=3)
    assert windowed.kv_cache_bytes == estimate.kv_cache_bytes * 99 // 1000  # the last window - 1 tokens


@pytest.mark.parametrize("fields", [
    pytest.param(TINY, id="hybrid"),
    pytest.param({**TINY, "layers_block_type": ["mamba"] * 4, "layers_num_experts": [0] * 4}, id="all-mamba"),
    pytest.param({**TINY, "sliding_window": 50}, id="sliding-window"),
])
def test_the_cache_after_a_prefill_holds_the_calculated_bytes(fields):
    model = HybridLMForCausalLM(HybridLMConfig(**fields, kernel_backend="torch")).to(torch.bfloat16).eval()
    input_ids = torch.randint(0, 128, (2, 300))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for start in range(0, 300, 100):  # a chunked prefill
            model(input_ids=input_ids[:, start:start + 100], cache=cache, use_cache=True, logits_to_keep=1)
    estimate = estimate_memory(model.config, context=300, batch=2, prefill_chunk=100)
    assert cache_bytes(cache) == estimate.kv_cache_bytes + estimate.mamba_state_bytes


def test_prefill_chunk_bounds_the_activations():
    mamba = HybridLMConfig(**{**TINY, "layers_block_type": ["mamba"] * 4, "layers_num_experts": [0] * 4})
    whole = estimate_memory(mamba, context=1 << 20)
    chunked = estimate_memory(mamba, context=1 << 20, prefill_chunk=4096)
    assert chunked.activation_bytes < whole.activation_bytes / 100
    assert chunked.kv_cache_bytes == whole.kv_cache_bytes
    # attending over the cache adds SDPA's masks (chunk x context: boolean, then additive in bf16) and one layer's
    # K, V while it grows
    hybrid = HybridLMConfig(**TINY)
    chunked = estimate_memory(hybrid, context=1 << 20, prefill_chunk=4096)
    one_layer_kv = 2 * 2 * 8 * (1 << 20) * 2
    attending = 4096 * (1 << 20) * (1 + 2) + one_layer_kv
    assert attending < chunked.activation_bytes < attending + estimate_memory(hybrid, 4096).activation_bytes


# ----------------------------------------------------------------------------- the CLI


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path):
    HybridLMConfig(**TINY).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_cli_reads_a_folder_and_a_config_json(capsys, folder):
    code, out, _ = run_cli(capsys, "memory", str(folder), "--context", "100")
    assert code == 0 and "total" in out and "KV cache" in out
    code, out, _ = run_cli(capsys, "memory", str(folder / "config.json"), "--context", "100", "--json")
    assert code == 0
    figures = json.loads(out)
    assert list(figures) == list(JSON_KEYS)
    assert figures == {key: getattr(estimate_memory(HybridLMConfig(**TINY), 100), key) for key in JSON_KEYS}


def test_cli_options_reach_the_estimate(capsys, folder):
    code, out, _ = run_cli(capsys, "memory", str(folder), "--context", "100", "--batch", "2", "--weights", "nf4",
                           "--prefill-chunk", "10", "--json")
    assert code == 0
    expected = estimate_memory(HybridLMConfig(**TINY), 100, 2, "nf4", prefill_chunk=10)
    assert json.loads(out)["total_bytes"] == expected.total_bytes


SOURCES = [
    pytest.param(lambda: transformers.JambaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, num_experts=4, mamba_d_state=4), id="jamba"),
    pytest.param(lambda: transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4), id="mixtral"),
    pytest.param(lambda: transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2), id="llama"),
    pytest.param(lambda: transformers.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4),
                 id="mamba"),
]
SOURCE_MODELS = {"jamba": transformers.JambaForCausalLM, "mixtral": transformers.MixtralForCausalLM,
                 "llama": transformers.LlamaForCausalLM, "mamba": transformers.MambaForCausalLM}


@pytest.mark.parametrize("make_config", SOURCES)
def test_cli_reads_the_config_of_each_source_family(capsys, tmp_path, make_config):
    source = make_config()
    source.save_pretrained(tmp_path / "src")
    code, out, err = run_cli(capsys, "memory", str(tmp_path / "src"), "--context", "64", "--json")
    assert code == 0, err
    # the converted model has the source model's parameters, one for one
    with torch.device("meta"):
        reference = SOURCE_MODELS[source.model_type](source)
    assert json.loads(out)["total_params"] == sum(p.numel() for p in reference.parameters())


def test_load_source_config_maps_jamba():
    config = load_source_config_from(JAMBA_V01)
    assert config.layers_block_type.count("attention") == 4 and config.num_experts == 16


def load_source_config_from(source: dict, tmp_path=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(source))
        return load_source_config(folder)


@pytest.mark.parametrize("argv, message", [
    pytest.param(["{missing}", "--context", "8"], "does not exist", id="missing-path"),
    pytest.param(["{empty}", "--context", "8"], "has no config.json", id="folder-without-config"),
    pytest.param(["{text}", "--context", "8"], "is not a JSON config", id="not-json"),
    pytest.param(["{other}", "--context", "8"], "model_type 'bert'", id="unknown-model-type"),
    pytest.param(["{bad}", "--context", "8"], "num_experts_per_tok", id="invalid-config"),
    pytest.param(["{empty}", "--context", "0"], "too small", id="context-0"),
    pytest.param(["{empty}", "--context", "8", "--weights", "int4"], "invalid choice", id="unknown-weights"),
    pytest.param(["{empty}", "--context", "8", "--batch", "x"], "not an integer", id="batch-not-a-number"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").write_text("not json")
    (tmp_path / "other.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bad.json").write_text(json.dumps({**TINY, "model_type": "hybrid_lm", "num_experts_per_tok": 9}))
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "text": tmp_path / "text",
             "other": tmp_path / "other.json", "bad": tmp_path / "bad.json"}
    code, out, err = run_cli(capsys, "memory", *[arg.format(**paths) for arg in argv])
    assert code == 2 and out == ""
    assert message in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    if "invalid choice" not in message and "not an integer" not in message and "too small" not in message:
        assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- Jamba-v0.1


@pytest.fixture(scope="module")
def jamba():
    return jamba_config(JAMBA_V01)


def test_jamba_v01_has_its_published_52b_total_and_12b_active_parameters(jamba):
    estimate = estimate_memory(jamba, context=1)
    assert estimate.total_params == pytest.approx(52e9, rel=0.02)
    assert estimate.active_params == pytest.approx(12e9, rel=0.02)


@pytest.mark.parametrize("context", [140_000, 140 * 1024])
def test_jamba_v01_fits_140k_tokens_on_an_80gb_gpu_with_8bit_weights(jamba, context):
    estimate = estimate_memory(jamba, context=context, weights="int8")
    assert estimate.total_bytes < 80 * GB
    assert estimate_memory(jamba, context=context, weights="bf16").total_bytes > 80 * GB


def test_jamba_v01_4bit_weights(jamba):
    bf16 = estimate_memory(jamba, 1).weights_bytes
    nf4 = estimate_memory(jamba, 1, weights="nf4").weights_bytes
    # the Mamba mixers (2.9B parameters) and the embeddings stay bf16 by default: 0.33x, not the 0.3x target
    assert 0.30 < nf4 / bf16 < 0.34
    assert estimate_memory(jamba, 1, weights="nf4", double_quant=True).weights_bytes / bf16 < 0.32
    # quantizing the Mamba projections too meets it
    assert estimate_memory(jamba, 1, weights="nf4", quantize_mamba=True).weights_bytes / bf16 <= 0.3


def test_readme_table_is_the_calculators(jamba):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for weights in ("bf16", "int8", "nf4"):
        e = estimate_memory(jamba, context=140_000, weights=weights)
        row = (f"| {weights} | {e.weights_bytes / GB:.1f} GB | {e.kv_cache_bytes / GB:.1f} GB | "
               f"{e.mamba_state_bytes / GB:.2f} GB | {e.activation_bytes / GB:.1f} GB | {e.total_bytes / GB:.1f} GB |")
        assert row in readme


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "one-expert-at-a-time"])
def test_moe_activation_term_is_the_peak_of_a_real_moe_forward(grouped):
    """The calculator's MoE term against the storages a bf16 MoE block really holds at once in an inference
    forward (counted op by op on CPU, where the grouped products run as on the GPU)."""
    config = HybridLMConfig(vocab_size=128, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                            num_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    block = HybridLMSparseMoeBlock(config)
    torch.nn.init.normal_(block.router.weight)  # tokens spread over the experts, as the formula assumes
    block = block.to(torch.bfloat16)
    if not grouped:  # what a quantized expert makes it do: run module by module
        block._grouped_projections = lambda: None
    tokens = 2048
    x = torch.randn(1, tokens, config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        block(x)  # the first inference forward packs the weights (once; no memory is added, packed_weights.py)
    counter = LiveTensorBytes()
    with torch.no_grad(), counter:
        block(x)
    assert block.experts_are_grouped() == grouped
    assert counter.peak == pytest.approx(moe_activation_bytes(config, tokens, grouped), rel=0.1)
