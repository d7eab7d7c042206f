"""hybrid_lm quickstart: a corpus, a digit-split tokenizer, a small hybrid model trained with Trainer,
saved, reloaded through the Auto classes, and asked to continue a prompt.

    python examples/quickstart.py [--corpus PATH] [--max-steps N] [--output-dir DIR] [size options]

With no --corpus it reads this Python installation's standard-library sources (real code and prose,
plenty of numbers), so nothing is downloaded. The defaults finish in a few minutes on a 2-core CPU
and use a GPU when there is one.
"""

import argparse
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

import hybrid_lm


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; give at least 1")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="a text file or a folder of .py/.txt/.md files (default: stdlib)")
    parser.add_argument("--corpus-mb", type=float, default=2.0, help="read at most this many MB of text")
    parser.add_argument("--output-dir", type=Path, default=Path("output/quickstart"))
    parser.add_argument("--max-steps", type=at_least_one, default=80,
                        help="training steps (at least 1: Trainer reads 0 as 'train by epochs')")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def read_corpus(path: Path | None, max_bytes: int) -> list[str]:
    """Documents (one per file) up to max_bytes, in a stable order."""
    root = path or Path(sysconfig.get_paths()["stdlib"])
    if not root.exists():
        raise SystemExit(f"error: corpus {root} does not exist")
    if root.is_file():
        files = [root]
    else:
        patterns = ("*.py",) if path is None else ("*.py", "*.txt", "*.md", "*.rst")
        files = sorted(f for pattern in patterns for f in root.rglob(pattern)
                       if "site-packages" not in f.parts and f.is_file())
    documents, total = [], 0
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            documents.append(text[: max_bytes - total])
            total += len(documents[-1])
        if total >= max_bytes:
            break
    if len(documents) < 2:
        raise SystemExit(f"error: {root} holds too little text; give a larger corpus")
    return documents


class Blocks(torch.utils.data.Dataset):
    """The token stream of all documents (each closed by eos) cut into blocks of seq_len."""

    def __init__(self, documents, tokenizer, seq_len):
        stream = []
        for ids in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids + [tokenizer.eos_token_id])
        n_blocks = len(stream) // seq_len
        if n_blocks == 0:
            raise SystemExit(f"error: the corpus gives fewer than {seq_len} tokens; lower --seq-len")
        self.blocks = torch.tensor(stream[: n_blocks * seq_len]).view(n_blocks, seq_len)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    start = time.time()
    on_gpu = torch.cuda.is_available()

    # 1. corpus: every 20th document is held out
    documents = read_corpus(args.corpus, int(args.corpus_mb * 1e6))
    train_docs = [d for i, d in enumerate(documents) if i % 20]
    held_out = [d for i, d in enumerate(documents) if i % 20 == 0]
    print(f"corpus: {len(documents)} documents, {sum(map(len, documents)) / 1e6:.1f} MB "
          f"({len(held_out)} held out)")

    # 2. a byte-level BPE that keeps every digit a token of its own
    tokenizer = hybrid_lm.train_tokenizer(iter(train_docs), vocab_size=args.vocab_size, model_max_length=args.seq_len)
    print(f"tokenizer: {len(tokenizer)} tokens; '2024-11-22' -> {tokenizer.tokenize('2024-11-22')}")

    # 3. a small hybrid: a:m = 1:3, mixture of experts every second layer
    config = hybrid_lm.HybridLMConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 11 // 4,
        num_hidden_layers=args.num_layers, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
        expert_layer_offset=1, num_experts=args.num_experts, num_experts_per_tok=2, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_state=16, max_position_embeddings=args.seq_len,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    total, active = hybrid_lm.hub_hybrid_lm.parameter_counts(model)
    print(config.layer_plan())
    print(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token")

    # 4. train with transformers' Trainer
    train_set, eval_set = Blocks(train_docs, tokenizer, args.seq_len), Blocks(held_out, tokenizer, args.seq_len)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "trainer"), max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=max(1, args.max_steps // 10), lr_scheduler_type="cosine",
        weight_decay=0.01, logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to=[],
        bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu, seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set)
    before = trainer.evaluate()["eval_loss"]
    print(f"held-out loss before training: {before:.3f} (perplexity {math.exp(before):.1f})")
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss after {args.max_steps} steps: {after:.3f} (perplexity {math.exp(after):.1f})")

    # 5. save, reload through the Auto classes, generate
    final_dir = args.output_dir / "model"
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(final_dir)
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForCausalLM.from_pretrained(final_dir).to("cuda" if on_gpu else "cpu").eval()
    inputs = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, repetition_penalty=1.2)
    print(f"saved to {final_dir}; reloaded {type(model).__name__} and {type(tokenizer).__name__}")
    print("generated continuation:\n" + tokenizer.decode(output[0], skip_special_tokens=True))
    print(f"quickstart took {time.time() - start:.0f} s")
    return {"loss_before": before, "loss_after": after, "output_dir": str(final_dir)}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
