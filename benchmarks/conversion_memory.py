"""Peak memory of conversion/convert.py on a random Jamba checkpoint of about 2 GB.

    python benchmarks/conversion_memory.py [--experts 8] [--shard-mb 500]

The checkpoint is written shard by shard into a temporary folder (transformers' on-disk Jamba layout,
float32, shards of at most --shard-mb MB): each tensor is drawn with the name and shape of a meta-device
model, so no full model is ever held in memory. The converter then runs in a child process with
--no-verify and --max-shard-size of the same size, and the child's peak resident set size is read from
getrusage(RUSAGE_CHILDREN). That is read inside a small stdlib-only wrapper process around the converter:
a forked child's ru_maxrss counts the parent's pages until exec, and this script's own process holds torch
and a shard. A first child that only imports the converter gives the baseline (Python, torch,
transformers, hybrid_lm). The temporary folder, source and output, is deleted at the end.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import JambaConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "conversion"))

from convert import expected_shapes  # noqa: E402
from sources import jamba_config  # noqa: E402

MB = 10**6


def jamba_checkpoint(folder: Path, config: JambaConfig, shard_bytes: int) -> tuple[int, int]:
    """Writes a random float32 Jamba folder; returns the bytes of the whole, of its largest shard and tensor."""
    shapes = expected_shapes(jamba_config(config.to_dict(), weights=None))  # hybrid_lm names = Jamba's on disk
    generator = torch.Generator().manual_seed(0)
    shards, shard, shard_size = [], {}, 0

    def flush():
        name = f"shard-{len(shards)}.tmp"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        shards.append((name, list(shard), shard_size))

    for key, shape in shapes.items():
        size = shape.numel() * 4
        if shard and shard_size + size > shard_bytes:
            flush()
            shard, shard_size = {}, 0
        shard[key] = torch.randn(shape, generator=generator) * 0.02
        shard_size += size
    flush()
    weight_map = {}
    for i, (name, keys, _) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / name).rename(folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    total = sum(size for *_, size in shards)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    return total, max(size for *_, size in shards), max(shape.numel() * 4 for shape in shapes.values())


# runs argv[1:] and prints its peak RSS in KiB (Linux units of ru_maxrss); the wrapper itself is tiny
PEAK_RSS_WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss_mb(command: list[str]) -> float:
    """Peak resident set size of `command` (a fresh process), in MB."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *command], check=True, stdout=subprocess.PIPE,
                            text=True)
    *output, peak_kib = result.stdout.splitlines()
    if output:
        print("\n".join(output))  # the command's own output
    return int(peak_kib) * 1024 / MB


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (sets the size, default 8)")
    parser.add_argument("--shard-mb", type=int, default=500, help="source and output shard size in MB (default 500)")
    args = parser.parse_args()
    config = JambaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, attn_layer_period=8,
        attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, num_experts=args.experts,
        num_experts_per_tok=2, num_attention_heads=16, num_key_value_heads=4,
    )
    converter = ROOT / "conversion" / "convert.py"
    with tempfile.TemporaryDirectory(prefix="conversion-memory-") as tmp:
        src, dst = Path(tmp) / "jamba", Path(tmp) / "hybrid"
        src.mkdir()
        total, largest, largest_tensor = jamba_checkpoint(src, config, args.shard_mb * MB)
        print(f"checkpoint: {total / MB:.0f} MB float32 in {len(list(src.glob('*.safetensors')))} shards, "
              f"largest shard {largest / MB:.0f} MB, largest tensor {largest_tensor / MB:.0f} MB")

        imports = f"import sys; sys.path.insert(0, {str(converter.parent)!r}); import convert"
        baseline = peak_rss_mb([sys.executable, "-c", imports])
        start = time.perf_counter()
        peak = peak_rss_mb([sys.executable, str(converter), str(src), str(dst), "--no-verify",
                            "--max-shard-size", str(args.shard_mb * MB)])
        seconds = time.perf_counter() - start
        written = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        largest_out = max(p.stat().st_size for p in dst.glob("*.safetensors"))
    print(f"output: {written / MB:.0f} MB, largest shard {largest_out / MB:.0f} MB, converted in {seconds:.1f} s")
    print(f"peak RSS of the converter: {peak:.0f} MB (imports alone: {baseline:.0f} MB; "
          f"above imports: {peak - baseline:.0f} MB = {(peak - baseline) / (total / MB):.2f} x checkpoint)")


if __name__ == "__main__":
    main()
