"""Training paths: packed (padding-free) batches, LoRA adapters, Trainer."""

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

from builders import tiny_model

LAYOUTS = {
    "hybrid": {},
    "all-mamba": dict(layers_block_type=["mamba"] * 4),
    "all-attention": dict(layers_block_type=["attention"] * 4, use_rope=True),
}


def documents(lengths=(5, 9, 1, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_batch_equals_documents_run_separately(layout):
    model = tiny_model(**LAYOUTS[layout])
    docs = documents()
    features = [{"input_ids": d.tolist(), "labels": d.tolist()} for d in docs]
    batch = DataCollatorWithFlattening(return_tensors="pt")(features)
    assert batch["position_ids"].shape == batch["input_ids"].shape and "attention_mask" not in batch

    packed = model(**{k: v for k, v in batch.items() if k != "labels"})
    start, losses = 0, []
    for doc in docs:
        alone = model(doc[None]).logits
        segment = packed.logits[:, start : start + len(doc)]
        assert (segment - alone).abs().max().item() <= 1e-4
        if len(doc) > 1:
            losses.append(F.cross_entropy(alone[0, :-1], doc[1:], reduction="sum"))
        start += len(doc)
    # the collator masks each document's first label, so the packed loss is the mean over in-document targets
    expected = torch.stack(losses).sum() / sum(len(d) - 1 for d in docs)
    torch.testing.assert_close(model(**batch).loss, expected, atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_separate_gradients():
    model = tiny_model().train()
    model.config.router_aux_loss_coef = 0.0  # routing statistics are batch-wide by design
    docs = documents(lengths=(6, 8))
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d.tolist(), "labels": d.tolist()} for d in docs])
    model(**batch).loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = sum(len(d) - 1 for d in docs)
    for doc in docs:
        logits = model(doc[None]).logits
        (F.cross_entropy(logits[0, :-1], doc[1:], reduction="sum") / total).backward()
    for name, grad in packed.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4, msg=name)





def test_lora_reaches_the_mamba_projections_and_merges_exactly():
    model = tiny_model()
    targets = list(model.lora_target_modules)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    lora.train()
    input_ids = torch.randint(1, 97, (2, 10))
    lora(input_ids, labels=input_ids).loss.backward()
    mamba_adapters = [(n, p) for n, p in lora.named_parameters() if "lora_" in n and ".mamba." in n]
    assert {n.split(".mamba.")[1].split(".")[0] for n, _ in mamba_adapters} == {"in_proj", "x_proj", "dt_proj", "out_proj"}
    for name, param in mamba_adapters:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    expert_adapters = [p for n, p in lora.named_parameters() if "lora_" in n and ".experts." in n]
    assert expert_adapters and any(p.grad.abs().sum() > 0 for p in expert_adapters)

    lora.eval()
    with torch.no_grad():
        unmerged = lora(input_ids).logits
        merged = lora.merge_and_unload()(input_ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed random blocks of token ids (a language model can still lower its loss on them)."""

    def __init__(self, n=24, length=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.blocks = torch.randint(1, 20, (n, length), generator=g)  # a small alphabet: learnable statistics

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def trainer_for(model, output_dir, max_steps, **overrides):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, save_steps=3, save_strategy="steps", report_to=[], use_cpu=True, seed=0, data_seed=0,
        lr_scheduler_type="constant", disable_tqdm=True, **overrides,
    )
    return Trainer(model=model, args=args, train_dataset=TokenBlocks(), eval_dataset=TokenBlocks(n=8, seed=1))


def logged_losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_trainer_lowers_the_loss_and_resumes_on_the_same_curve(tmp_path):
    before = trainer_for(tiny_model(), tmp_path / "a", 6).evaluate()["eval_loss"]
    full = trainer_for(tiny_model(), tmp_path / "a", 6)
    full.train()
    after = full.evaluate()["eval_loss"]
    assert after < before
    losses = logged_losses(full)
    assert losses[6] < losses[1]

    resumed = trainer_for(tiny_model(seed=7), tmp_path / "b", 6)  # other init: the checkpoint must overwrite it
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    resumed_losses = logged_losses(resumed)
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-4, abs=1e-5), step
