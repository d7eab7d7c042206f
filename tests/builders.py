"""Tiny random models and helpers shared by the tests."""

import os
import subprocess
import sys
import textwrap

import torch

import hybrid_lm


def tiny_config(**overrides) -> hybrid_lm.HybridLMConfig:
    """A 4-layer hybrid (attention at layer 1 and 3, MoE at odd layers) small enough for CPU tests."""
    fields = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=4, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, pad_token_id=0,
    )
    fields.update(overrides)
    return hybrid_lm.HybridLMConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> hybrid_lm.HybridLMForCausalLM:
    torch.manual_seed(seed)
    return hybrid_lm.HybridLMForCausalLM(tiny_config(**overrides)).eval()


LAYOUTS = {
    # name: (attn_layer_period, attn_layer_offset) over 8 layers
    "1:1": (2, 1),
    "1:3": (4, 2),
    "1:7": (8, 4),
}


def run_without_package(code: str, tmp_path) -> str:
    """Runs `code` in a fresh interpreter where `import hybrid_lm` fails; returns its stdout."""
    prelude = textwrap.dedent(
        """
        import sys
        class _NoHybridLM:
            def find_spec(self, name, path=None, target=None):
                if name == "hybrid_lm" or name.startswith("hybrid_lm."):
                    raise ImportError("hybrid_lm is not installed here")
        sys.meta_path.insert(0, _NoHybridLM())
        try:
            import hybrid_lm
        except ImportError:
            pass
        else:
            raise SystemExit("hybrid_lm is importable; the test would prove nothing")
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def assert_same_weights(weights: dict, expected: dict) -> None:
    """Two state dicts with the same keys, every tensor bit-equal (a save / load round trip). Outputs of two such
    models are compared within float32 rounding instead: CPU BLAS kernels can round differently for tensors of
    different memory alignment, and loaded tensors are not aligned as freshly allocated ones are."""
    assert weights.keys() == expected.keys(), set(weights) ^ set(expected)
    different = [key for key, value in expected.items() if not torch.equal(weights[key], value)]
    assert not different, f"weights differ after the round trip: {different[:5]}"
