"""Fine-tune a hybrid_lm checkpoint with transformers' Trainer on a text or JSONL dataset, optionally with LoRA.

    python examples/finetune.py --model CKPT --data FILE [FILE ...] --output-dir DIR [--lora] [options]
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/finetune.py ...   (several GPUs)

Data: `.txt` files (one example per line, or the whole file with --whole-files) or `.jsonl` files
(the field given by --text-field), loaded with `datasets`. Examples are packed without padding by
transformers' DataCollatorWithFlattening: position_ids restart at each example and the model keeps
the examples apart (block-diagonal attention, Mamba states reset at each boundary).

--lora trains adapters (peft) on the model's `lora_target_modules` by default: attention, the Mamba
projections (in_proj, x_proj, dt_proj, out_proj) and the MLP/expert projections. Resume an
interrupted run with --resume (the newest checkpoint in --output-dir) or --resume PATH.

--load-in-4bit (with --lora) is QLoRA: the attention, MLP and expert projections load with bitsandbytes NF4
weights (double quantization), while the Mamba mixers, routers, norms and lm_head stay in high precision (the
model declares them); peft's `prepare_model_for_kbit_training` readies the model, and the adapters train over
the 4-bit projections and the full-precision Mamba projections alike. Needs bitsandbytes (`pip install -e ".[quant]"`);
runs on a GPU, and on the CPU (bitsandbytes >= 0.50) for small models.
"""

import argparse
import importlib.util
import json
import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorWithFlattening,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging

import hybrid_lm  # noqa: F401  (registers the Auto classes)
from hybrid_lm.transformers_compat import enable_activation_checkpointing

logger = logging.get_logger("hybrid_lm.finetune")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="hybrid_lm checkpoint folder or Hub id (with its tokenizer), or a LoRA adapter folder "
                        "this script saved (with --lora: training continues on its base model)")
    parser.add_argument("--data", nargs="+", required=True, type=Path, help=".txt or .jsonl files")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--whole-files", action="store_true", help="one example per .txt file instead of per line")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--max-length", type=int, default=512, help="truncate examples to this many tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gradient-accumulation", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=None, help="default 2e-4 with --lora, else 2e-5")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--save-steps", type=int, default=200)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-targets", nargs="+", help="module names (default: the model's lora_target_modules)")
    parser.add_argument("--merge", action="store_true", help="with --lora, also save the merged full model")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="QLoRA: load the base model with 4-bit NF4 weights (bitsandbytes); needs --lora")
    parser.add_argument("--resume", nargs="?", const=True, default=None, help="resume from a checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.load_in_4bit and not args.lora:
        parser.error("--load-in-4bit trains LoRA adapters over the 4-bit weights (QLoRA): add --lora")
    if args.load_in_4bit and args.merge:
        parser.error("--merge cannot fold adapters into 4-bit weights without rounding them: train with "
                     "--load-in-4bit, then merge the saved adapter into the base model loaded in bf16")
    return args


def load_texts(paths: list[Path], text_field: str, whole_files: bool):
    """A `datasets.Dataset` with one column, `text`."""
    from datasets import Dataset, load_dataset

    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"error: data file(s) not found: {', '.join(missing)}")
    suffixes = {p.suffix for p in paths}
    if suffixes <= {".jsonl", ".json"}:
        data = load_dataset("json", data_files=[str(p) for p in paths], split="train")
        if text_field not in data.column_names:
            raise SystemExit(f"error: the JSONL records have no field {text_field!r} (fields: {data.column_names}); "
                             "pass --text-field")
        return data.rename_column(text_field, "text").select_columns(["text"]) if text_field != "text" \
            else data.select_columns(["text"])
    if suffixes <= {".txt", ".md", ".py"}:
        if whole_files:
            return Dataset.from_dict({"text": [p.read_text(encoding="utf-8") for p in paths]})
        return load_dataset("text", data_files=[str(p) for p in paths], split="train")
    raise SystemExit(f"error: use .txt or .jsonl data files (got {sorted(suffixes)})")


def import_peft():
    try:
        import peft
    except ImportError:
        raise SystemExit("error: --lora needs peft: pip install peft (or pip install -e '.[train]' here)") from None
    return peft


def add_lora(model, args):
    """Wraps the model with LoRA adapters and warns when they reach fewer than half of the layers."""
    peft = import_peft()
    targets = args.lora_targets or list(model.lora_target_modules)
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, target_modules=targets,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    touched = {int(m.group(1)) for name, _ in model.named_modules() if "lora_A" in name
               and (m := re.search(r"\.layers\.(\d+)\.", name))}
    num_layers = model.config.num_hidden_layers
    if len(touched) < num_layers / 2:
        logger.warning(f"LoRA adapters reach only {len(touched)} of {num_layers} layers with targets {targets}; "
                       f"the untouched layers cannot adapt. The default targets are {list(model.lora_target_modules)}")
    model.print_trainable_parameters()
    return model


def load_model(args, dtype):
    """The model and tokenizer of --model. A local folder is loaded by its absolute path, so that an adapter saved
    from it names a base model that loads from anywhere; an adapter folder loads its base with the adapter."""
    model_path = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    adapter_config = Path(model_path) / "adapter_config.json"
    base = json.loads(adapter_config.read_text())["base_model_name_or_path"] if adapter_config.is_file() else None
    if base is not None and not args.lora:
        raise SystemExit(f"error: {args.model} is a LoRA adapter of {base}: pass --lora to keep training it, or pass "
                         f"a full model as --model (the base {base}, or the adapter merged with --merge)")
    quantization = {}
    if args.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SystemExit("error: --load-in-4bit needs bitsandbytes: pip install -e '.[quant]' here")
        quantization["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base or model_path, dtype=dtype, **quantization)
    if args.load_in_4bit:
        # freezes the base and casts its high-precision parameters to float32; checkpointing is turned on below
        model = import_peft().prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model, {"use_reentrant": False})
        model.enable_input_require_grads()
    if base is not None:
        model = import_peft().PeftModel.from_pretrained(model, model_path, is_trainable=True)
        model.print_trainable_parameters()
    elif args.lora:
        model = add_lora(model, args)
    has_tokenizer = (Path(model_path) / "tokenizer.json").is_file()
    return model, AutoTokenizer.from_pretrained(model_path if base is None or has_tokenizer else base)


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    on_gpu = torch.cuda.is_available()

    model, tokenizer = load_model(args, torch.bfloat16 if on_gpu else torch.float32)

    texts = load_texts(args.data, args.text_field, args.whole_files)
    texts = texts.filter(lambda example: bool(example["text"].strip()))

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, truncation=True, max_length=args.max_length - 1)
        return {"input_ids": [x + [tokenizer.eos_token_id] for x in ids["input_ids"]]}

    dataset = texts.map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")
    if len(dataset) == 0:
        raise SystemExit("error: the data files hold no text")

    training_args = TrainingArguments(
        output_dir=str(args.output_dir), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation,
        learning_rate=args.learning_rate or (2e-4 if args.lora else 2e-5), lr_scheduler_type="cosine",
        warmup_steps=0.05, logging_steps=10, save_steps=args.save_steps, save_total_limit=2, report_to=[],
        bf16=on_gpu, use_cpu=not on_gpu, seed=args.seed, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=DataCollatorWithFlattening())
    trainer.train(resume_from_checkpoint=args.resume)

    final_dir = args.output_dir / "final"
    if trainer.is_fsdp_enabled:  # FSDP's sharded state dicts go to the checkpoints; the final model is gathered
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final_dir))  # collective under FSDP: every process calls it
    if trainer.is_world_process_zero():  # under accelerate launch / torchrun, one process writes
        tokenizer.save_pretrained(final_dir)
        if args.lora and args.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(args.output_dir / "merged")
            tokenizer.save_pretrained(args.output_dir / "merged")
        print(f"saved to {final_dir}")
    # Every process shuts its process group down before its interpreter exits: left to the exit, the teardown of a
    # process that finished first aborted once ("terminate called without an active exception", CPU DDP in CI).
    # The barrier first: it lets gloo's worker threads finish their last collectives (the trainer's gathers), whose
    # clean-up needs the GIL, before the group can be torn down by a thread that holds it (a deadlock seen in CI:
    # ~ProcessGroupGloo joining a worker that waited for the GIL in ~AsyncAllgatherWork).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return trainer


if __name__ == "__main__":
    main()
