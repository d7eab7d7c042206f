"""Several processes on CPU (gloo): DDP through `accelerate launch`, FSDP2, tensor parallelism, and the fine-tuning
example under `accelerate launch`, each against one process.

The runs are in tests/distributed_run.py (its docstring has the commands). accelerate runs FSDP on accelerators only
(on CPU an FSDP config gives data parallelism), so FSDP2 is tested with torch's `fully_shard` at the decoder layers,
the wrapping accelerate's FSDP2 does; accelerate's own FSDP2 and bf16 mixed precision need the GPUs (README,
"Several devices").
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import hybrid_lm
from builders import tiny_model
from distributed_run import LEARNING_RATE, train_steps

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "tests" / "distributed_run.py"
BIN = Path(sys.executable).parent
STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 16

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch has no torch.distributed with the gloo backend")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list, cwd, timeout=300, gpus=False, **env_vars) -> str:
    """Runs a launcher, on CPU only unless `gpus`; returns its output, or fails with it."""
    env = {**os.environ, **env_vars, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not gpus:
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    try:
        result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"{command[0]} ran past {timeout} s:\n{error.stdout}\n{error.stderr}") from None
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed ({result.returncode}):\n{output[-8000:]}"
    return output


def torchrun(*args, cwd, gpus=False):
    return launch([BIN / "torchrun", "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port",
                   free_port(), *args], cwd, gpus=gpus)


def accelerate_launch(*args, cwd, config="accelerate_ddp.yaml", mixed_precision="no", gpus=False, **env_vars):
    """`accelerate launch` with an example config on 2 processes: CPU ones (ACCELERATE_USE_CPU: gloo) unless `gpus`."""
    return launch([BIN / "accelerate", "launch", "--config_file", ROOT / "examples" / config, "--mixed_precision",
                   mixed_precision, "--num_processes", 2, "--main_process_port", free_port(), *args], cwd, gpus=gpus,
                  **env_vars)


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny hybrid, the batches, and one process trained on the same global batches (losses, weights)."""
    root = tmp_path_factory.mktemp("distributed")
    # The router's load-balancing loss is computed over each process's tokens (as in transformers' MoE models), so
    # with it several processes equal one process accumulating over the shards, not one on the global batch. Without
    # it the loss is a mean over tokens and every process has as many: the global-batch loss.
    tiny_model(router_aux_loss_coef=0.0).save_pretrained(root / "model")
    batches = torch.randint(3, 97, (STEPS, GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    torch.save(batches, root / "data.pt")
    model = hybrid_lm.HybridLMForCausalLM.from_pretrained(root / "model").train()
    losses = train_steps(model, torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE), batches)
    return root, losses, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def torchrun_runs(setup, tmp_path_factory):
    """One torchrun launch: FSDP2 training of the setup's model, then two models loaded with tp_plan="auto" (the
    tiny hybrid, and one with tied embeddings whose projections have biases). Returns the output folder and the TP
    model folders."""
    root, _, _ = setup
    out = tmp_path_factory.mktemp("torchrun")
    # transformers 5.17 gathers the column-wise lm_head only when the vocabulary divides by the number of ranks
    tiny_model(vocab_size=98).save_pretrained(out / "plain")
    biased = tiny_model(seed=1, vocab_size=98, mamba_proj_bias=True, attention_bias=True, mlp_bias=True,
                        tie_word_embeddings=True)
    with torch.no_grad():  # initialised to zeros, where a wrongly sharded bias would go unseen
        for name, param in biased.named_parameters():
            if name.endswith("proj.bias") and "dt_proj" not in name:
                param.normal_(std=0.1)
    biased.save_pretrained(out / "biased")
    folders = (out / "plain", out / "biased")
    torchrun(RUN, "fsdp2", "tp", "--model", root / "model", "--tp-models", *folders, "--data", root / "data.pt",
             "--out", out, cwd=out)
    return out, folders


def _assert_same_training(out, mode, losses, weights, atol=2e-5):
    """atol: of the weights (the losses agree to 1e-5 relative); GPU kernels against the CPU reference need more."""
    result = json.loads((out / f"{mode}.json").read_text())
    assert result["num_processes"] == 2, result
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    trained = hybrid_lm.HybridLMForCausalLM.from_pretrained(out / mode).state_dict()
    assert trained.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=atol, msg=f"{mode}: {name} differs")
    return result


def test_ddp_through_accelerate_launch_equals_one_process(setup, tmp_path):
    root, losses, weights = setup
    accelerate_launch(RUN, "accelerate", "--model", root / "model", "--data", root / "data.pt", "--out", tmp_path,
                      cwd=tmp_path)
    result = _assert_same_training(tmp_path, "accelerate", losses, weights)
    assert result["distributed_type"] == "MULTI_CPU", result


def test_fsdp2_at_the_decoder_layers_equals_one_process(setup, torchrun_runs):
    _, losses, weights = setup
    result = _assert_same_training(torchrun_runs[0], "fsdp2", losses, weights)
    assert result["decoder_layers"] == 4 and result["fsdp_modules"] == 5, result  # each layer, and the root


def test_tensor_parallel_model_gives_the_logits_and_tokens_of_one_process(setup, torchrun_runs):
    """The hybrid sharded by the plan (Mamba by channel), and one whose Mamba in_proj has a bias (kept whole)."""
    root, _, _ = setup
    out, folders = torchrun_runs
    parallel = torch.load(out / "tp.pt")
    input_ids = torch.load(root / "data.pt")[0]
    for index, folder in enumerate(folders):
        model = hybrid_lm.HybridLMForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(parallel[index]["logits"], model(input_ids).logits, rtol=1e-5, atol=1e-5,
                                       msg=f"{folder.name}: logits differ")
            torch.testing.assert_close(parallel[index]["tokens"],
                                       model.generate(input_ids, max_new_tokens=6, do_sample=False))
    sharded = parallel[0]["sharded"]
    for name in ("layers.0.mamba.in_proj.weight", "layers.0.mamba.conv1d.weight", "layers.0.mamba.A_log",
                 "layers.0.mamba.x_proj.weight", "layers.0.mamba.dt_proj.bias", "layers.0.mamba.out_proj.weight",
                 "layers.1.self_attn.k_proj.weight", "layers.1.self_attn.o_proj.weight",
                 "layers.0.feed_forward.down_proj.weight"):
        assert f"model.{name}" in sharded, f"{name} is not sharded: {sharded}"
    assert not [name for name in parallel[1]["sharded"] if ".mamba." in name]  # see HybridLMConfig.__post_init__
    assert "model.layers.1.self_attn.q_proj.bias" in parallel[1]["sharded"]


def _finetune_under_accelerate_launch(tmp_path, **launch_options):
    """finetune.py on a tiny hybrid for 2 steps of 2 rows per process; returns the base model."""
    tokenizer = hybrid_lm.train_tokenizer(iter(["def f(x):\n    return x * 2 + 14\n"] * 50), vocab_size=300,
                                          show_progress=False)
    base = tiny_model(vocab_size=len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}"}) for i in range(16)))
    output = accelerate_launch(
        ROOT / "examples" / "finetune.py", "--model", tmp_path / "base", "--data", data, "--output-dir",
        tmp_path / "ft", "--max-steps", 2, "--batch-size", 2, "--learning-rate", 1e-2, "--save-steps", 1,
        cwd=tmp_path, TRANSFORMERS_VERBOSITY="info", **launch_options)  # info: Trainer's line on the batch size
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in output, output[-3000:]
    return base


def test_finetune_example_under_accelerate_launch_saves_a_plain_folder(tmp_path):
    base = _finetune_under_accelerate_launch(tmp_path)
    final = tmp_path / "ft" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    trained = hybrid_lm.HybridLMForCausalLM.from_pretrained(final)
    changed = [name for name, tensor in base.state_dict().items()
               if not torch.equal(tensor, trained.state_dict()[name])]
    assert any("mamba" in name for name in changed) and any("self_attn" in name for name in changed)


@pytest.mark.gpu
@needs_two_gpus
def test_fsdp2_through_accelerate_on_two_gpus_equals_one_process(setup, tmp_path):
    """examples/accelerate_fsdp.yaml (FSDP2 at the decoder layers, activation checkpointing) in float32."""
    root, losses, weights = setup
    accelerate_launch(RUN, "accelerate", "--model", root / "model", "--data", root / "data.pt", "--out", tmp_path,
                      cwd=tmp_path, config="accelerate_fsdp.yaml", gpus=True)
    result = _assert_same_training(tmp_path, "accelerate", losses, weights, atol=1e-4)
    assert result["distributed_type"] == "FSDP", result


@pytest.mark.gpu
@needs_two_gpus
def test_finetune_example_under_accelerate_fsdp_bf16_on_two_gpus(tmp_path):
    """Sharded checkpoints during training, a plain folder at the end, bf16 mixed precision over float32 weights."""
    base = _finetune_under_accelerate_launch(tmp_path, config="accelerate_fsdp.yaml", mixed_precision="bf16",
                                             gpus=True)
    assert any((tmp_path / "ft").glob("checkpoint-*/pytorch_model_fsdp_0")), list((tmp_path / "ft").iterdir())
    trained = hybrid_lm.HybridLMForCausalLM.from_pretrained(tmp_path / "ft" / "final")
    assert trained.model.layers[0].mamba.A_log.dtype == torch.float32
    changed = [name for name, tensor in base.state_dict().items()
               if not torch.equal(tensor.float(), trained.state_dict()[name].float())]
    assert any("mamba" in name for name in changed) and any("self_attn" in name for name in changed)


@pytest.mark.gpu
@needs_two_gpus
def test_tensor_parallel_on_two_gpus_gives_the_logits_and_tokens_of_one_process(setup, tmp_path):
    root, _, _ = setup
    tiny_model(vocab_size=98).save_pretrained(tmp_path / "plain")
    torchrun(RUN, "tp", "--tp-models", tmp_path / "plain", "--data", root / "data.pt", "--out", tmp_path,
             cwd=tmp_path, gpus=True)
    parallel = torch.load(tmp_path / "tp.pt")[0]
    model = hybrid_lm.HybridLMForCausalLM.from_pretrained(tmp_path / "plain").cuda().eval()
    input_ids = torch.load(root / "data.pt")[0].cuda()
    with torch.no_grad():
        torch.testing.assert_close(parallel["logits"], model(input_ids).logits.cpu(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(parallel["tokens"], model.generate(input_ids, max_new_tokens=6,
                                                                      do_sample=False).cpu())
