"""Shared pieces of the quality scripts: arguments, model plans, the training loop, tables, figures.

The scripts beside this file (`mqar.py`, `arithmetic.py`, `lm.py`) each define a task and a grid of runs; this
module holds everything they have in common, so there is one training loop with one progress bar and one way to
write a result (`<name>.md` table, `<name>.json` records, `<name>.png` figure in `--out-dir`).

Time budgets: a full-size run gets `--time-budget` seconds of wall time in all (each script has its default) and
cannot overrun it: `train` shapes its learning-rate schedule by the larger of the step fraction and the time
fraction and stops at its deadline; `run_jobs` gives each run a fair share of what is left; the LM and addition
scripts, whose models must see the same steps, first time a few steps of each model (`seconds_per_step`) and
choose the step count that fits. Figures need matplotlib; without it the table and JSON are still written, and
`--plot-only DIR` draws the figure later from the JSON.

Only hybrid_lm's public API is used: `HybridLMConfig(...)`, `HybridLMForCausalLM(config)`, the forward's `.loss` /
`.logits` and transformers' `base_model` / `get_output_embeddings()`, so the scripts measure what a user gets.
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python benchmarks/quality/x.py` from anywhere imports this checkout's package
    sys.path.insert(0, str(ROOT))

import hybrid_lm  # noqa: E402

DEFAULT_OUT_DIR = ROOT / "benchmarks" / "quality" / "results"

# Token-mixer plans by name. Hybrids put a Mamba layer first: it carries position (causal conv + scan), which the
# attention layers after it need, as in Jamba (attention has no RoPE there).
PLANS = {
    "attention": lambda layers: ["attention"] * layers,
    "mamba": lambda layers: ["mamba"] * layers,
    "1:1": lambda layers: ["mamba" if i % 2 == 0 else "attention" for i in range(layers)],
    "1:3": lambda layers: ["attention" if i % 4 == 2 else "mamba" for i in range(layers)],  # Jamba's period 4, offset 2
}


# ---------------------------------------------------------------------------------------------------- arguments
def parser(description: str, time_budget: float) -> argparse.ArgumentParser:
    """The options every script has; each script adds its own. time_budget: the full size's default in seconds."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    p.add_argument("--tiny", action="store_true", help="a small instance that runs on a 2-core CPU in under 2 minutes")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the .md/.json/.png go (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every model initialisation and data stream")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help=f"wall time of the whole run, setup included (default: {time_budget:.0f} at full size, "
                        "none with --tiny, whose step counts are fixed)")
    p.add_argument("--no-plot", action="store_true", help="write no figure (matplotlib is then not needed)")
    p.add_argument("--plot-only", type=Path, metavar="DIR", help="train nothing: draw the figure from DIR's JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(default_time_budget=time_budget)
    return p


def deadline_of(args) -> float | None:
    """The time.time() by which the run must be over: now + --time-budget (full size: the script's default)."""
    budget = args.time_budget if args.time_budget is not None else None if args.tiny else args.default_time_budget
    if budget is not None and budget <= 0:
        raise SystemExit(f"error: --time-budget must be positive, got {budget}")
    return None if budget is None else time.time() + budget


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but torch {torch.__version__} sees no CUDA GPU")
    return device


def command_line(argv: list[str] | None) -> str:
    """The command that reproduces this run, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    args = sys.argv[1:] if argv is None else argv
    return "PYTHONPATH=. python " + " ".join(shlex.quote(str(a)) for a in [script, *args])


# ---------------------------------------------------------------------------------------------------- models
def build_model(plan: str | list[str], *, num_layers: int, hidden_size: int, vocab_size: int, device: torch.device,
                seed: int, intermediate_size: int | None = None, feed_forward: bool = True, num_experts: int = 1,
                num_heads: int = 4, num_kv_heads: int | None = None, rope_for_pure_attention: bool = True,
                max_length: int = 4096, **overrides) -> hybrid_lm.HybridLMForCausalLM:
    """A HybridLMForCausalLM from a plan name (see PLANS) or an explicit list of mixers.

    feed_forward=False gives layers without a feed-forward block (Zoology's Identity state mixer). num_experts > 1
    puts a mixture of experts (top-2) on every second layer (Jamba's expert period 2, offset 1), dense MLPs
    elsewhere. A pure attention stack gets RoPE (nothing else would tell it positions); hybrids and Mamba do not.
    """
    block_types = PLANS[plan](num_layers) if isinstance(plan, str) else list(plan)
    if not feed_forward:
        ffn = [0] * num_layers
    else:
        ffn = [num_experts if (num_experts > 1 and i % 2 == 1) else 1 for i in range(num_layers)]
    pure_attention = all(t == "attention" for t in block_types)
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        intermediate_size=intermediate_size if intermediate_size is not None else hidden_size * 11 // 4,
        layers_block_type=block_types, layers_num_experts=ffn, num_experts=max(num_experts, 2),
        num_experts_per_tok=2, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        mamba_d_state=16, use_rope=pure_attention and rope_for_pure_attention, max_position_embeddings=max_length,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
        kernel_backend="auto", output_router_logits=num_experts > 1,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return hybrid_lm.HybridLMForCausalLM(hybrid_lm.HybridLMConfig(**fields)).to(device)


def parameter_counts(model) -> tuple[int, int]:
    """(total, active per token), embeddings included; experts a token is not routed to are not active."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name or name.endswith(".experts"))
    n, k = config.num_experts, config.num_experts_per_tok
    return total, total - (experts * (n - k) // n if experts else 0)


def plan_label(model) -> str:
    types = model.config.layers_block_type
    a, m = types.count("attention"), types.count("mamba")
    mixers = "attention" if m == 0 else "mamba" if a == 0 else f"a:m {a}:{m}"
    moe = sum(1 for n in model.config.layers_num_experts if n > 1)
    return f"{len(types)} layers, {mixers}" + (f", MoE on {moe} (n {model.config.num_experts}, K 2)" if moe else "")


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # training loss at every step
    evals: list[tuple[int, dict]] = field(default_factory=list)  # (step, metrics) at every evaluation
    steps: int = 0  # steps taken (fewer than asked when stop_when fired or the deadline came)
    tokens: int = 0  # tokens fed to the model
    seconds: float = 0.0  # training wall time, evaluations excluded
    diverged: bool = False
    out_of_time: bool = False  # the deadline ended the run before its steps were done

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def train(model, next_batch: Callable[[int], dict], *, steps: int, lr: float, device: torch.device,
          weight_decay: float = 0.1, warmup: float = 0.05, evaluate: Callable[[], dict] | None = None,
          eval_every: int = 0, stop_when: Callable[[dict], bool] | None = None, deadline: float | None = None,
          desc: str = "train", progress: bool = True,
          loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None) -> TrainResult:
    """AdamW with linear warm-up and cosine decay to 10%, gradient clipping at 1, bf16 autocast on CUDA.

    next_batch(step) returns the model's keyword arguments (input_ids, labels, ...); the loss is the model's own
    `.loss`, or loss_fn(model, batch) when given. evaluate() runs every eval_every steps and at the end (in eval
    mode, without gradients); training stops early once stop_when(metrics) is true. A non-finite loss ends the run and marks it diverged.

    The schedule follows the run's progress: the fraction of `steps` taken or, with a `deadline` (a time.time()),
    the fraction of the time from the end of the first step (which compiles kernels) to the deadline, whichever is
    larger; the run ends when either reaches 1. Without a deadline, or when it is not reached, that is the usual
    step schedule.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms, biases, A_log, D
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98),
                                  fused=device.type == "cuda")
    clock_start = None  # set after the first step

    def progress_at(step):
        fraction = (step + 1) / steps
        if deadline is not None and clock_start is not None:
            fraction = max(fraction, (time.time() - clock_start) / max(deadline - clock_start, 1e-9))
        return min(fraction, 1.0)

    def schedule(step):
        p = progress_at(step)
        if p < warmup:
            return p / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (p - warmup) / (1 - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    result = TrainResult()
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)

    def run_eval(step):
        model.eval()
        with torch.no_grad(), autocast:
            metrics = evaluate()
        model.train()
        result.evals.append((step, metrics))
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if isinstance(v, float)}, refresh=False)
        return metrics

    model.train()
    pending = []  # losses still on the device: reading each one would synchronise every step
    for step in range(steps):
        batch = next_batch(step)
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        synchronize(device)
        result.seconds += time.perf_counter() - start
        clock_start = clock_start or time.time()
        scheduler.step()
        result.tokens += batch["input_ids"].numel()
        result.steps = step + 1
        bar.update(1)
        result.out_of_time = deadline is not None and time.time() >= deadline and step + 1 < steps
        last = step + 1 == steps or result.out_of_time
        if len(pending) >= 50 or last or (eval_every and (step + 1) % eval_every == 0):
            result.losses.extend(torch.stack(pending).float().tolist())
            pending.clear()
            bar.set_description(f"{desc} loss {result.losses[-1]:.3f}", refresh=False)
            if not math.isfinite(result.losses[-1]):
                result.diverged = True
                break
        if evaluate is not None and (last or (eval_every and (step + 1) % eval_every == 0)):
            metrics = run_eval(step + 1)
            if stop_when is not None and stop_when(metrics):
                break
        if result.out_of_time:
            break
    if evaluate is not None and (not result.evals or result.evals[-1][0] != result.steps):
        run_eval(result.steps)
    bar.close()
    return result


def seconds_per_step(model, next_batch: Callable[[int], dict], *, device: torch.device, warmup: int = 2,
                     timed: int = 3) -> float:
    """Training-step time of `model` on next_batch(0), next_batch(1), ... after `warmup` steps (kernels compiled,
    allocator warm). The steps run at learning rate 0, so the weights stay those of the initialisation and the
    model can be trained afterwards as if freshly built."""
    train(model, next_batch, steps=warmup, lr=0.0, device=device, progress=False)
    return train(model, lambda step: next_batch(warmup + step), steps=timed, lr=0.0, device=device,
                 progress=False).seconds / timed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_steps(steps: int, seconds_per_step: list[float], deadline: float | None, reserve: float = 0.1) -> int:
    """The most steps (at most `steps`) that every model of seconds_per_step can take one after the other before
    the deadline, keeping `reserve` of the time left for evaluations; `steps` itself without a deadline. The models
    then train with the overall deadline as theirs, which only a wrong estimate makes them reach."""
    if deadline is None:
        return steps
    return max(1, min(steps, int((deadline - time.time()) * (1 - reserve) / sum(seconds_per_step))))


def run_jobs(function: Callable, jobs: list[dict], *, workers: int, deadline: float | None, desc: str,
             progress: bool = True) -> list:
    """function(**job, deadline=...) for every job, in `workers` processes (1: in this one), results in the order
    of jobs.

    Small models on a GPU are bound by kernel launches, not by the GPU: several processes sharing it get through a
    grid several times faster than one. `function` must be a module-level function of an importable module.

    With a deadline (a time.time()) each job, when it is handed to a worker, gets a fair share of the time left:
    (deadline - now) * workers / (jobs not started + workers - 1), counted from when it starts (so a worker's
    start-up is not charged to it) and never past the deadline. Jobs that finish early (a run that stopped at its
    target) leave their time to the ones after them. Without one, every job gets deadline None.
    """
    results = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, dynamic_ncols=True)

    def share(started):
        if deadline is None:
            return None
        return max(0.0, deadline - time.time()) * workers / (len(jobs) - started + workers - 1)

    if workers <= 1:
        for i, job in enumerate(jobs):
            results[i] = _timed(function, job, share(i), deadline)
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            running, started = {}, 0
            while started < len(jobs) or running:
                while started < len(jobs) and len(running) < workers:
                    future = pool.submit(_timed, function, jobs[started], share(started), deadline)
                    running[future] = started
                    started += 1
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    results[running.pop(future)] = future.result()
                    bar.update(1)
    bar.close()
    return results


def _timed(function: Callable, job: dict, seconds: float | None, deadline: float | None):
    """function(**job) with its own deadline: `seconds` from now, at most the overall deadline."""
    return function(**job, deadline=None if seconds is None else min(time.time() + seconds, deadline))


def _worker_init():
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // 8)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------------- output
def markdown_table(header: list[str], rows: Iterable[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment(device: torch.device) -> str:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return f"{name}, torch {torch.__version__}, transformers {transformers.__version__}, hybrid_lm {hybrid_lm.__version__}"


def write_results(out_dir: Path, name: str, *, title: str, command: str, device: torch.device, notes: list[str],
                  table: str, records: list[dict], plot: Callable, no_plot: bool) -> Path:
    """Writes `<name>.json` (everything below), `<name>.png` (plot(records, plt) -> figure; skipped, and said so,
    without matplotlib) and `<name>.md` (ready to paste into RESULTS.md), and prints the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(title=title, command=command, machine=environment(device), notes=notes, table=table,
                   records=records)
    payload = json.loads(json.dumps(payload))  # the figure is drawn from what --plot-only reads
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    figure = None if no_plot else _draw(out_dir, name, payload, plot)
    path = out_dir / f"{name}.md"
    path.write_text(_markdown(payload, figure))
    print("\n" + path.read_text())
    print(f"wrote {path}, {path.with_suffix('.json')}" + (f", {figure}" if figure else ""))
    return path


def plot_only(directory: Path, name: str, plot: Callable) -> Path:
    """--plot-only: draws `<name>.png` from `<name>.json` in `directory` and adds it to `<name>.md`."""
    source = directory / f"{name}.json"
    if not source.is_file():
        raise SystemExit(f"error: --plot-only {directory}: there is no {source.name} (write it with --out-dir {directory})")
    payload = json.loads(source.read_text())
    figure = _draw(directory, name, payload, plot)
    if figure is None:
        raise SystemExit("error: --plot-only needs matplotlib: pip install matplotlib")
    (directory / f"{name}.md").write_text(_markdown(payload, figure))
    print(f"wrote {figure}, {directory / f'{name}.md'}")
    return figure


def _markdown(payload: dict, figure: Path | None) -> str:
    lines = [f"### {payload['title']}", "", "```", f"$ {payload['command']}", "```", "",
             f"Machine: {payload['machine']}.", ""]
    lines += [f"- {note}" for note in payload["notes"]] + ["", payload["table"], ""]
    if figure is not None:
        lines += [f"![{payload['title']}]({figure.name})", ""]
    return "\n".join(lines)


def _draw(directory: Path, name: str, payload: dict, plot: Callable) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed, so the figure was skipped: pip install matplotlib, then "
              f"`{Path(sys.argv[0]).name} --plot-only {directory}` draws it from {name}.json")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(payload["records"], plt)
    fig.tight_layout()
    path = directory / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
