"""The reference implementations the GPU benchmarks run beside hybrid_lm, built on the same config and weights.

- `jamba_model(model)`: transformers' `JambaForCausalLM` holding `model`'s weights (saved, converted to Jamba's
  layout with conversion/convert.py, loaded back); it uses the mamba-ssm / causal-conv1d kernels when they import.
- `mamba_ssm_model(config)`: mamba-ssm's own `MambaLMHeadModel` with the stack of `config` (Mamba-1 mixers, the
  attention layers at the same places, one dense MLP a layer), random weights.
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "conversion"))


def jamba_model(model, dtype=torch.bfloat16):
    from convert import convert
    from transformers import JambaForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(f"{folder}/hybrid")
        convert(f"{folder}/hybrid", f"{folder}/jamba", target_format="jamba", verify=False)
        return JambaForCausalLM.from_pretrained(f"{folder}/jamba", dtype=dtype).cuda()


def mamba_ssm_model(config, dtype=torch.bfloat16):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    attention_layers = [i for i, kind in enumerate(config.layers_block_type) if kind == "attention"]
    mamba_config = MambaConfig(
        d_model=config.hidden_size, n_layer=config.num_hidden_layers, d_intermediate=config.intermediate_size,
        vocab_size=config.vocab_size, ssm_cfg={"layer": "Mamba1", "d_state": config.mamba_d_state},
        attn_layer_idx=attention_layers,
        attn_cfg={"num_heads": config.num_attention_heads, "num_heads_kv": config.num_key_value_heads},
        rms_norm=True, residual_in_fp32=True, fused_add_norm=False, pad_vocab_size_multiple=8,
    )
    return MambaLMHeadModel(mamba_config, device="cuda", dtype=dtype).eval()
