"""bf16 / int8 / nf4 / fp4 weights on the bench config, hybrid_lm beside transformers' JambaForCausalLM on the same
trained weights: weight memory, prefill and decode speed, held-out perplexity.

    PYTHONPATH=. python benchmarks/quantization.py [--train-seconds 60] [--modes bf16 int8 nf4 fp4] [--tiny]

1. Trains the 426M bench config (`benchmarks/generate.py`'s "bench") for --train-seconds on the quickstart corpus
   (this Python's standard-library sources, read as `examples/quickstart.py` reads them; every 20th file held out),
   with a byte-level BPE of --vocab tokens, and saves it in bf16; converts the folder to the Jamba format
   (`conversion/convert.py`).
2. Loads each folder once per mode with `from_pretrained(quantization_config=BitsAndBytesConfig(...), dtype=bf16)`:
   hybrid_lm with its declared defaults (experts, attention and MLP projections quantized; Mamba mixers, routers,
   norms, lm_head precise), Jamba with the same `llm_int8_skip_modules` plus its router (an nn.Linear there). Its
   experts are 3-D parameters, which bitsandbytes does not quantize.
3. Per load: `torch.cuda.memory_allocated()` right after loading ("weights"), the bytes of the model's own
   parameters and buffers ("tensors"; a gap between the two is memory the model does not own: the script then says
   what gc.collect() frees and names the largest CUDA tensors that are not the model's), the loading peak,
   and the calculator's figure (`hybrid-lm memory`, hybrid_lm only); prefill ms (batch 1, --prompt tokens,
   `logits_to_keep=1`); decode ms/step (greedy generate of --new tokens, dynamic cache, eager); perplexity on
   --eval-blocks held-out blocks of --seq-len tokens.

Needs bitsandbytes for the quantized modes. --tiny: a small model for a few seconds on the CPU (a check that the
script runs; its figures mean nothing), where "weights" is the tensors' bytes.
"""

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path += [str(ROOT / "benchmarks"), str(ROOT / "conversion"), str(ROOT / "examples")]

import hybrid_lm  # noqa: E402
from generate import CONFIGS  # noqa: E402
from quickstart import Blocks, read_corpus  # noqa: E402

from hybrid_lm.hub_hybrid_lm import parameter_counts  # noqa: E402
from hybrid_lm.memory_hybrid_lm import QUANTIZATION_SKIP_MODULES, estimate_memory, meta_model  # noqa: E402

# bitsandbytes' CPU kernels need in_features % 64 == 0 and out_features % 32 == 0 (x_proj: 4 + 2 x 14 outputs)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=2,
            expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, num_attention_heads=4,
            num_key_value_heads=2, mamba_d_state=14)
MODES = {
    "bf16": None,
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
}
MB = 1e6


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--engines", nargs="+", choices=["hybrid_lm", "jamba"], default=["hybrid_lm", "jamba"])
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--corpus-mb", type=float, default=8.0)
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer size (the model keeps its vocab_size)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    parser.add_argument("--new", type=int, default=32, help="decode steps")
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU, to check that the script runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.train_seconds, args.corpus_mb, args.vocab, args.seq_len = min(args.train_seconds, 10.0), 0.5, 512, 64
        args.batch_size, args.eval_blocks, args.prompt, args.new = 8, 8, 64, 8
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def train(config, train_set, args, device) -> hybrid_lm.HybridLMForCausalLM:
    """AdamW with bf16 autocast (on CUDA), linear warm-up then cosine decay over the time budget."""
    torch.manual_seed(args.seed)
    model = hybrid_lm.HybridLMForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    start, step, loss = time.perf_counter(), 0, float("nan")
    while (elapsed := time.perf_counter() - start) < args.train_seconds:
        for batch in loader:
            progress = (time.perf_counter() - start) / args.train_seconds
            if progress >= 1:
                break
            scale = min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * scale
            ids = batch["input_ids"].to(device)
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 100 == 0:
                print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"trained {step} steps of {args.batch_size} x {args.seq_len} tokens in {elapsed:.0f} s, "
          f"last loss {loss.item():.3f}", flush=True)
    return model.eval()


def load(engine, folder, mode, device):
    from transformers import BitsAndBytesConfig, JambaForCausalLM

    kwargs = dict(dtype=torch.bfloat16)
    if device.type == "cuda":
        kwargs["device_map"] = "cuda"
    if MODES[mode] is not None:
        skips = {} if engine == "hybrid_lm" else {"llm_int8_skip_modules": [*QUANTIZATION_SKIP_MODULES, "router"]}
        kwargs["quantization_config"] = BitsAndBytesConfig(**MODES[mode], **skips)
    cls = hybrid_lm.HybridLMForCausalLM if engine == "hybrid_lm" else JambaForCausalLM
    return cls.from_pretrained(folder, **kwargs).eval()


def tensor_bytes(model) -> int:
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def foreign_cuda_tensors(model, limit=5) -> list[str]:
    """The largest live CUDA tensors that are no parameter or buffer of `model` (what a memory gap is made of)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    found = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.is_cuda and obj.untyped_storage().data_ptr() not in own:
                found[obj.untyped_storage().data_ptr()] = (obj.untyped_storage().nbytes(), tuple(obj.shape), obj.dtype)
        except (RuntimeError, ReferenceError):
            continue
    largest = sorted(found.values(), key=lambda item: -item[0])[:limit]
    return [f"{size / 2**20:.1f} MiB {shape} {dtype}" for size, shape, dtype in largest]


def quantized_layers(model) -> int:
    return sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


@torch.no_grad()
def perplexity(model, blocks, device, batch=4) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        ids = blocks[start:start + batch].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def speeds(model, prompt, new, device) -> tuple[float, float]:
    """(prefill ms, decode ms/step), best of 2 after a warm-up."""
    def prefill():
        model(input_ids=prompt, logits_to_keep=1)

    def generate(n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                      eos_token_id=None)

    prefill(), generate(new)()  # warm-up: kernels, autotuning
    prefill_s = min(timed(prefill, device) for _ in range(3))
    first = min(timed(generate(1), device) for _ in range(2))
    total = min(timed(generate(new), device) for _ in range(2))
    return prefill_s * 1e3, (total - first) / (new - 1) * 1e3


def measure(engine, folder, mode, config, held_out, prompt, args, device) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    model = load(engine, folder, mode, device)
    own = tensor_bytes(model)
    row = dict(engine=engine, mode=mode, quantized=quantized_layers(model), tensors=own, weights=own, peak=None,
               calculated=estimate_memory(config, 1, weights=mode).weights_bytes if engine == "hybrid_lm" else None)
    if device.type == "cuda":
        row["weights"] = torch.cuda.memory_allocated() - before
        row["peak"] = torch.cuda.max_memory_allocated() - before
        gc.collect()  # what only a collection frees (reference cycles) was not the model's
        if (freed := row["weights"] - (torch.cuda.memory_allocated() - before)) > 0.01 * own:
            print(f"  {engine} {mode}: gc.collect() after loading freed {freed / MB:.1f} MB", flush=True)
        if row["weights"] - own > 0.01 * own:
            print(f"  {engine} {mode}: {(row['weights'] - own) / MB:.1f} MB allocated beyond the model's tensors; "
                  f"largest foreign CUDA tensors: {foreign_cuda_tensors(model)}", flush=True)
    row["prefill_ms"], row["decode_ms"] = speeds(model, prompt, args.new, device)
    row["ppl"] = perplexity(model, held_out, device)
    print(f"  {engine} {mode}: done", flush=True)
    del model
    return row


def table(rows) -> str:
    base = {(r["engine"]): r for r in rows if r["mode"] == "bf16"}
    lines = ["| model | weights | quantized layers | weights MB | x bf16 | tensors MB | load peak MB | calculated MB "
             "| prefill ms | decode ms/step | perplexity | vs bf16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ref = base.get(r["engine"])
        ratio = f"{r['weights'] / ref['weights']:.2f}" if ref else "-"
        delta = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.1f}%" if ref else "-"
        peak = f"{r['peak'] / MB:.1f}" if r["peak"] is not None else "-"
        calculated = f"{r['calculated'] / MB:.1f}" if r["calculated"] is not None else "-"
        lines.append(f"| {r['engine']} | {r['mode']} | {r['quantized']} | {r['weights'] / MB:.1f} | {ratio} | "
                     f"{r['tensors'] / MB:.1f} | {peak} | {calculated} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms']:.2f} | {r['ppl']:.2f} | {delta} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/quantization.py needs a CUDA GPU (or --tiny for a CPU check)")
    if any(MODES[mode] for mode in args.modes):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit('the quantized modes need bitsandbytes: pip install -e ".[quant]"') from None
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    documents = read_corpus(None, int(args.corpus_mb * 1e6))
    train_docs = [d for i, d in enumerate(documents) if i % 20]
    held_docs = [d for i, d in enumerate(documents) if i % 20 == 0]
    tokenizer = hybrid_lm.train_tokenizer(iter(train_docs), vocab_size=args.vocab, show_progress=False)
    train_set = Blocks(train_docs, tokenizer, args.seq_len)
    held_out = Blocks(held_docs, tokenizer, args.seq_len).blocks[:args.eval_blocks]
    fields = {**CONFIGS["bench"], **(TINY if args.tiny else {})}
    config = hybrid_lm.HybridLMConfig(**fields, max_position_embeddings=max(args.seq_len, args.prompt + args.new))
    total, active = parameter_counts(meta_model(config))
    print(config.layer_plan().splitlines()[0])
    print(f"{total / 1e6:.0f}M parameters ({active / 1e6:.0f}M active); corpus {len(train_set)} training blocks, "
          f"{len(held_out)} held out, of {args.seq_len} tokens; tokenizer {len(tokenizer)} tokens; "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model = train(config, train_set, args, device)
        model.to(torch.bfloat16).save_pretrained(f"{tmp}/hybrid_lm")
        del model
        folders = {"hybrid_lm": f"{tmp}/hybrid_lm"}
        if "jamba" in args.engines:
            from convert import convert

            convert(f"{tmp}/hybrid_lm", f"{tmp}/jamba", target_format="jamba", verify=False)
            folders["jamba"] = f"{tmp}/jamba"
        prompt = held_out.reshape(-1)[:args.prompt][None].to(device)
        rows = []
        for mode in args.modes:
            for engine in args.engines:
                try:
                    rows.append(measure(engine, folders[engine], mode, config, held_out, prompt, args, device))
                except Exception as error:  # report the load that could not run, and go on with the others
                    print(f"  {engine} {mode}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)

    print(f"\n{table(rows)}\n")
    print(f"MB = 1e6 bytes. weights: memory_allocated() after loading (CPU: the tensors' bytes); tensors: the model's "
          f"parameters and buffers; prefill: batch 1 x {args.prompt} tokens; decode: batch 1, {args.new} greedy "
          f"steps after a {args.prompt}-token prompt; perplexity: {len(held_out)} held-out blocks of {args.seq_len} "
          f"tokens. Took {time.perf_counter() - start:.0f} s.")
    return rows


if __name__ == "__main__":
    main()
