"""The README's main job (a shortened quickstart) and the fine-tuning example, run as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args, cwd):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=900,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_shortened_quickstart_then_lora_finetune(tmp_path):
    out = run("quickstart.py", "--max-steps", 4, "--corpus-mb", 0.3, "--vocab-size", 600, "--seq-len", 64,
              "--batch-size", 4, "--hidden-size", 64, "--max-new-tokens", 8, "--output-dir", tmp_path / "qs",
              cwd=tmp_path)
    assert "layer 2: attention" in out and "moe" in out
    assert "held-out loss before training" in out and "held-out loss after 4 steps" in out
    assert "generated continuation:\ndef fibonacci(n):" in out
    model_dir = tmp_path / "qs" / "model"
    assert (model_dir / "tokenizer.json").exists() and (model_dir / "model.safetensors").exists()

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * 7}"}) for i in range(40)))
    out = run("finetune.py", "--model", model_dir, "--data", data, "--output-dir", tmp_path / "ft", "--lora",
              "--max-steps", 3, "--batch-size", 4, "--save-steps", 2, "--merge", cwd=tmp_path)
    assert (tmp_path / "ft" / "final" / "adapter_config.json").exists()
    assert (tmp_path / "ft" / "merged" / "model.safetensors").exists()
    run("finetune.py", "--model", model_dir, "--data", data, "--output-dir", tmp_path / "ft", "--lora",
        "--max-steps", 4, "--batch-size", 4, "--save-steps", 2, "--resume", cwd=tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shortened_quickstart_on_the_gpu(tmp_path):
    """On a GPU the quickstart trains in Trainer's bf16 mixed precision (autocast over float32 weights) through the
    Triton kernels and the fused loss, then samples through the CUDA-graph decode loop."""
    out = run("quickstart.py", "--max-steps", 4, "--corpus-mb", 0.3, "--vocab-size", 600, "--seq-len", 64,
              "--batch-size", 4, "--hidden-size", 64, "--max-new-tokens", 8, "--output-dir", tmp_path / "qs",
              cwd=tmp_path)
    assert "held-out loss after 4 steps" in out and "generated continuation:\ndef fibonacci(n):" in out


def test_quickstart_refuses_zero_steps_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--max-steps", "0",
                             "--output-dir", str(tmp_path / "qs")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "argument --max-steps: 0 is too small; give at least 1" in result.stderr
    assert not (tmp_path / "qs").exists()


def test_lora_adapter_names_an_absolute_base_and_trains_again_from_its_folder(tmp_path):
    from builders import tiny_model

    import hybrid_lm

    tokenizer = hybrid_lm.train_tokenizer(iter(["def f(x):\n    return x * 2 + 14\n"] * 50), vocab_size=300,
                                          show_progress=False)
    (tmp_path / "work").mkdir()
    model = tiny_model(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "work" / "base")
    tokenizer.save_pretrained(tmp_path / "work" / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}"}) for i in range(20)))
    common = ("--data", data, "--max-steps", 1, "--batch-size", 4, "--lora")
    run("finetune.py", "--model", "base", "--output-dir", "ft", *common, cwd=tmp_path / "work")  # a relative path
    adapter = tmp_path / "work" / "ft" / "final"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tmp_path / "work" / "base")

    run("finetune.py", "--model", adapter, "--output-dir", tmp_path / "ft2", *common, cwd=tmp_path)
    assert (tmp_path / "ft2" / "final" / "adapter_config.json").exists()
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune.py"), "--model", str(adapter),
                             "--data", str(data), "--output-dir", str(tmp_path / "ft3")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"{adapter} is a LoRA adapter of {base}: pass --lora to keep training it" in result.stderr


def test_qlora_finetune_in_4bit_lowers_the_loss(tmp_path):
    pytest.importorskip("bitsandbytes")
    from builders import tiny_model

    import hybrid_lm

    tokenizer = hybrid_lm.train_tokenizer(iter(["def f(x):\n    return x * 2 + 14\n"] * 50), vocab_size=300,
                                          show_progress=False)
    # bitsandbytes' CPU kernels take in_features that are multiples of 64 (see tests/test_quantization.py)
    model = tiny_model(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, mamba_d_state=14)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}"}) for i in range(40)))
    run("finetune.py", "--model", tmp_path / "base", "--data", data, "--output-dir", tmp_path / "ft", "--lora",
        "--load-in-4bit", "--gradient-checkpointing", "--max-steps", 20, "--save-steps", 20, "--batch-size", 4,
        "--learning-rate", 5e-3, cwd=tmp_path)
    assert (tmp_path / "ft" / "final" / "adapter_config.json").exists()
    history = json.loads((tmp_path / "ft" / "checkpoint-20" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]  # logged every 10 steps
    assert len(losses) == 2 and losses[1] < 0.95 * losses[0], losses

    result = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune.py"), "--model", str(tmp_path / "base"),
                             "--data", str(data), "--output-dir", str(tmp_path / "ft2"), "--load-in-4bit"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--load-in-4bit trains LoRA adapters over the 4-bit weights (QLoRA): add --lora" in result.stderr
