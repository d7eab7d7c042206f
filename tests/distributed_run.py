"""The multi-process runs of tests/test_distributed.py (2 CPU processes, gloo), one or more modes per launch:

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate_ddp.yaml --mixed_precision no \
        --num_processes 2 tests/distributed_run.py accelerate --model DIR --data FILE --out DIR
    torchrun --nproc_per_node 2 tests/distributed_run.py fsdp2 tp --model DIR --tp-models DIR [DIR ...] \
        --data FILE --out DIR

`accelerate` and `fsdp2` train --model for every batch of FILE (a (steps, global batch, length) tensor of token
ids), each rank on its contiguous slice of the global batch, with AdamW and gradient clipping, and write the mean loss
of each step and the full final weights as a plain `from_pretrained` folder (OUT/MODE). `train_steps` is the loop,
shared with the single-process reference in the test. `accelerate` uses the Accelerator its launch configures (DDP
here); `fsdp2` shards with torch's `fully_shard` at the decoder layers (`_no_split_modules`, the wrap policy
accelerate's TRANSFORMER_BASED_WRAP takes from the model) with activation checkpointing, because accelerate runs FSDP
only on accelerators. `tp` loads each of --tp-models with `tp_plan="auto"` and writes the logits, greedy tokens and
sharded parameters of each on the first batch.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import hybrid_lm
from hybrid_lm.transformers_compat import enable_activation_checkpointing

LEARNING_RATE = 1e-3
MAX_GRAD_NORM = 0.5  # small enough that clipping acts: the norm must be the global one


def train_steps(model, optimizer, batches, rank=0, world_size=1, backward=None, clip=None, reduce_mean=None,
                device=None):
    """Trains on each global batch in `batches` (steps, B, L); returns the mean loss of every step."""
    losses = []
    for batch in batches:
        rows = batch.shape[0] // world_size
        local = batch[rank * rows:(rank + 1) * rows].to(device or batch.device)
        loss = model(input_ids=local, labels=local).loss
        (backward or torch.Tensor.backward)(loss)
        (clip or torch.nn.utils.clip_grad_norm_)(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        losses.append((reduce_mean(loss.detach()) if reduce_mean else loss.detach()).item())
    return losses


def _with_accelerate(args, batches):
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = hybrid_lm.HybridLMForCausalLM.from_pretrained(args.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = train_steps(
        model, optimizer, batches, accelerator.process_index, accelerator.num_processes, backward=accelerator.backward,
        clip=accelerator.clip_grad_norm_, reduce_mean=lambda loss: accelerator.reduce(loss, "mean"),
        device=accelerator.device,
    )
    state_dict = accelerator.get_state_dict(model)  # gathered on every rank for FSDP, the module's for DDP
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.out / "accelerate", state_dict=state_dict)
    accelerator.wait_for_everyone()
    return losses, {"distributed_type": accelerator.distributed_type.value, "num_processes": accelerator.num_processes}


def _with_fully_shard(args, batches):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = hybrid_lm.HybridLMForCausalLM.from_pretrained(args.model).train()
    enable_activation_checkpointing(model, {"use_reentrant": False})
    wrapped = [module for module in model.modules() if type(module).__name__ in model._no_split_modules]
    for module in wrapped:
        fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    def mean(loss):
        dist.all_reduce(loss)
        return loss / world_size

    losses = train_steps(model, optimizer, batches, rank, world_size, reduce_mean=mean)
    sharded = sum(isinstance(module, FSDPModule) for module in model.modules())
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(args.out / "fsdp2", state_dict=state_dict)
    dist.barrier()
    return losses, {"fsdp_modules": sharded, "decoder_layers": len(wrapped), "num_processes": world_size}


def _with_tensor_parallelism(args, batches):
    from torch.distributed.tensor import DTensor

    results = {}
    for index, folder in enumerate(args.tp_models):
        model = hybrid_lm.HybridLMForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
        input_ids = batches[0].to(model.device)  # each rank's GPU under torchrun on GPUs
        with torch.no_grad():
            results[index] = {"logits": model(input_ids).logits.cpu(),
                              "tokens": model.generate(input_ids, max_new_tokens=6, do_sample=False).cpu()}
        results[index]["sharded"] = sorted(name for name, param in model.named_parameters()
                                           if isinstance(param, DTensor) and param.to_local().shape != param.shape)
    if dist.get_rank() == 0:
        torch.save(results, args.out / "tp.pt")
    dist.barrier()
    return [], {"num_processes": dist.get_world_size()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("modes", nargs="+", choices=["accelerate", "fsdp2", "tp"])
    parser.add_argument("--model", help="the model folder to train")
    parser.add_argument("--tp-models", nargs="+", default=[], help="model folders to load with tp_plan='auto'")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    batches = torch.load(args.data)
    runs = {"accelerate": _with_accelerate, "fsdp2": _with_fully_shard, "tp": _with_tensor_parallelism}
    for mode in args.modes:
        torch.manual_seed(0)
        losses, facts = runs[mode](args, batches)
        if int(os.environ.get("RANK", 0)) == 0:
            (args.out / f"{mode}.json").write_text(json.dumps({"losses": losses, **facts}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
