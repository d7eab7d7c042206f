"""conversion/convert.py against transformers' own classes: same random weights, same logits and losses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import JambaConfig, JambaForCausalLM

import hybrid_lm
from builders import LAYOUTS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "conversion"))
from convert import ConversionError, convert  # noqa: E402


def jamba_folder(path: Path, layout="1:3", num_experts=4, top_k=2, seed=0, merged_experts=False) -> Path:
    torch.manual_seed(seed)
    if layout == "all-mamba":
        period, offset = 16, 9  # no layer index reaches the offset within 8 layers
    elif layout == "all-attention":
        period, offset = 1, 0
    else:
        period, offset = LAYOUTS[layout]
    config = JambaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=8, attn_layer_period=period,
        attn_layer_offset=offset, expert_layer_period=2, expert_layer_offset=1, num_experts=num_experts,
        num_experts_per_tok=top_k, num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8,
        router_aux_loss_coef=0.02,
    )
    model = JambaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so a mix-up would show
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".D") or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    if merged_experts:  # the layout transformers uses in memory: one 3D tensor per projection
        weights = load_file(path / "model.safetensors")
        state = model.state_dict()
        weights = {k: v for k, v in weights.items() if ".experts." not in k}
        weights.update({k: v.contiguous() for k, v in state.items() if ".experts." in k})
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


CASES = [
    ("1:1", 4, 2), ("1:3", 4, 2), ("1:7", 4, 1), ("all-mamba", 4, 2), ("all-attention", 4, 1),
    ("1:3", 1, 1),  # no experts: every feed-forward is a dense MLP
]


@pytest.mark.parametrize("layout, num_experts, top_k", CASES)
def test_jamba_conversion_gives_equal_logits_and_losses(tmp_path, layout, num_experts, top_k):
    src = jamba_folder(tmp_path / "jamba", layout, num_experts, top_k)
    dst = convert(src, tmp_path / "hybrid", verify=False)
    reference = JambaForCausalLM.from_pretrained(src).eval()
    model = hybrid_lm.HybridLMForCausalLM.from_pretrained(dst).eval()
    expected_types = reference.config.layers_block_type
    assert model.config.layers_block_type == expected_types

    input_ids = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(1))
    moe = num_experts > 1
    with torch.no_grad():
        ref = reference(input_ids, labels=input_ids, use_cache=False, output_router_logits=moe)
        out = model(input_ids, labels=input_ids, use_cache=False, output_router_logits=moe)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    if moe:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)


def test_merged_expert_layout_converts_too(tmp_path):
    src = jamba_folder(tmp_path / "jamba", merged_experts=True)
    dst = convert(src, tmp_path / "hybrid", verify=True)
    assert any(".experts.3.up_proj" in key for key in load_file(dst / "model.safetensors"))


def test_command_line_converts_verifies_and_loads_remotely(tmp_path):
    src = jamba_folder(tmp_path / "jamba")
    result = subprocess.run([sys.executable, str(ROOT / "conversion" / "convert.py"), str(src), str(tmp_path / "out"),
                             "--max-shard-size", "40000"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "max |logit difference|" in result.stdout
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "hybrid_lm" and "AutoModelForCausalLM" in config["auto_map"]
    assert (tmp_path / "out" / "modeling_hybrid_lm.py").exists()


def test_bad_input_is_refused_and_leaves_nothing_behind(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "a")
    src = jamba_folder(tmp_path / "jamba")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert(src, tmp_path / "taken")

    config = json.loads((src / "config.json").read_text())
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConversionError, match="unsupported model_type 'bert'"):
        convert(tmp_path / "bert", tmp_path / "b")

    config["mamba_d_state"] = 4
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"has shape .* but config.json implies"):
        convert(src, tmp_path / "c", verify=False)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["bert", "jamba", "taken"]
