"""The quality scripts in benchmarks/quality: tasks built and scored right, budgets kept, every `--tiny` run
completes, and on the tiny MQAR instance attention and the a:m 1:1 hybrid learn (the assertion that fails when
learning breaks, not just shapes). The three tiny runs take about 1.5 minutes on 2 CPU cores.
"""

import json
import math
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import arithmetic  # noqa: E402
import common  # noqa: E402
import lm  # noqa: E402
import mqar  # noqa: E402

try:
    import matplotlib  # noqa: F401

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("quality")


def written(out_dir: Path, name: str) -> dict:
    """The run's JSON, after checking that its table (and, with matplotlib, its figure) was written too."""
    markdown = (out_dir / f"{name}.md").read_text()
    assert markdown.startswith("### ") and "| --- |" in markdown and "PYTHONPATH=. python" in markdown
    assert (out_dir / f"{name}.png").is_file() == HAS_MATPLOTLIB
    assert ("![" in markdown) == HAS_MATPLOTLIB
    return json.loads((out_dir / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------------------------- MQAR
def test_mqar_batch_follows_zoology():
    generator = torch.Generator().manual_seed(0)
    vocab, length, pairs = 64, 32, 4
    input_ids, labels = mqar.mqar_batch(16, length, pairs, vocab, generator)
    assert input_ids.shape == labels.shape == (16, length)
    for x, y in zip(input_ids.tolist(), labels.tolist()):
        keys, values = x[0: 2 * pairs: 2], x[1: 2 * pairs: 2]
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        answers = [(t, v) for t, v in enumerate(y) if v != -100]
        assert len(answers) == pairs
        for t, value in answers:  # the token before each answer is a key seen earlier, the answer its value
            assert t >= 2 * pairs + 1 and x[t - 1] in keys and values[keys.index(x[t - 1])] == value
        query_region = x[2 * pairs:]
        assert sorted(k for k in query_region if k) == sorted(keys)  # each key queried once, the rest is 0


def test_mqar_accuracy_counts_answers_only_and_matches_the_full_logits():
    model = common.build_model("1:1", num_layers=2, hidden_size=32, vocab_size=64, device=torch.device("cpu"), seed=0)
    input_ids, labels = mqar.mqar_batch(8, 32, 4, 64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        correct, answers = mqar.answer_accuracy(model, input_ids, labels)
        predicted = model(input_ids=input_ids).logits[:, :-1].argmax(-1)
    mask = labels[:, 1:] != -100
    assert answers == 8 * 4 and correct == int((predicted == labels[:, 1:])[mask].sum())
    labels_all_right = torch.where(mask, predicted, -100)
    assert mqar.answer_accuracy(model, input_ids, torch.cat([labels[:, :1], labels_all_right], 1)) == (32, 32)


def test_mqar_training_loss_is_the_models_own_loss():
    model = common.build_model("1:1", num_layers=2, hidden_size=32, vocab_size=64, device=torch.device("cpu"), seed=0)
    input_ids, labels = mqar.mqar_batch(8, 32, 4, 64, torch.Generator().manual_seed(0))
    model.config.fused_loss = False  # transformers' loss over the full logits: the reference
    expected = model(input_ids=input_ids, labels=labels).loss
    torch.testing.assert_close(mqar.answer_loss(model, {"input_ids": input_ids, "labels": labels}), expected)


def test_tiny_mqar_attention_and_hybrid_learn(out_dir):
    """The regression test for learning: both reach 0.97 in 150-350 steps on seeds 0-4 (about 5 and 12 s)."""
    result = mqar.main(["--tiny", "--out-dir", str(out_dir), "--no-progress"])
    assert written(out_dir, "mqar")["records"] == result["records"]
    assert [r["model"] for r in result["records"]] == ["attention", "hybrid 1:1"]
    failed = [r for r in result["records"] if r["accuracy"] < 0.9]
    assert not failed, "did not learn the tiny MQAR instance:\n" + "\n".join(map(str, failed))


# ---------------------------------------------------------------------------------------------------- addition
def test_addition_generator():
    rng = random.Random(0)
    pairs = arithmetic.problems(rng, 200, 1, 3)
    assert len(set(pairs)) == 200
    assert all(len(str(a)) <= 3 and len(str(b)) <= 3 for a, b in pairs)
    assert {len(str(a)) for a, _ in pairs} == {1, 2, 3}
    held_out = arithmetic.problems(rng, 50, 5, 5)
    assert all(len(str(a)) == len(str(b)) == 5 for a, b in held_out)
    fresh = arithmetic.problems(random.Random(1), 50, 1, 1, exclude=frozenset(pairs))
    assert not set(fresh) & set(pairs)
    with pytest.raises(ValueError, match="distinct problems"):
        arithmetic.problems(random.Random(1), 101, 1, 1)  # only 10 x 10 one-digit problems exist
    assert arithmetic.prompt(123, 4567) == "123+4567=" and arithmetic.answer(123, 4567) == "4690\n"
    assert arithmetic.answer(999, 1) == "1000\n"


@pytest.mark.parametrize("completion, correct", [
    ("4690\n", True),
    ("4690\n12+3=15\n", True),  # what follows the first line is not scored
    ("4690", False),  # no end of line: the model did not stop
    ("469\n", False),
    ("46900\n", False),
    ("04690\n", False),
    (" 4690\n", False),
    ("\n4690\n", False),
])
def test_addition_scorer(completion, correct):
    assert arithmetic.is_correct(123, 4567, completion) is correct


def test_addition_training_batch_labels_the_answer_only():
    from hybrid_lm import train_tokenizer

    digits = train_tokenizer(iter(["12+34=46\n", "5+6=11\n"] * 20), vocab_size=300, show_progress=False).backend_tokenizer
    batch = arithmetic.training_batch(digits, [(12, 34), (5, 6)], torch.device("cpu"))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        labelled = [t for t in labels if t != -100]
        assert digits.decode(labelled) in ("46\n", "11\n")
        assert ids[0] == arithmetic.BOS
        start = labels.index(labelled[0])
        assert digits.decode(ids[1:start]).endswith("=")


def test_tiny_addition_run(out_dir):
    """With a budget the run first times both models and fits its steps (the full size's path); this one is
    generous, so the steps are the tiny default whatever the machine."""
    records = arithmetic.main(["--tiny", "--out-dir", str(out_dir), "--no-progress", "--time-budget", "1000"])["records"]
    assert written(out_dir, "arithmetic")["records"] == records
    assert [r["tokenizer"] for r in records] == ["digits (train_tokenizer)", "plain BPE"]
    assert len({r["steps"] for r in records}) == 1, "both tokenizers must get the same steps"
    for r in records:
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values()) and len(r["accuracy"]) == 3
        assert all(math.isfinite(x) for x in r["losses"]) and sum(r["losses"][-20:]) < sum(r["losses"][:20])
    assert records[0]["tokens_per_problem"] > records[1]["tokens_per_problem"]  # digits never merge


# ---------------------------------------------------------------------------------------------------- LM
def test_tiny_lm_run(out_dir):
    """Through the budgeted path too, with time to spare (see the addition test)."""
    records = lm.main(["--tiny", "--out-dir", str(out_dir), "--no-progress", "--time-budget", "1000"])["records"]
    assert written(out_dir, "lm")["records"] == records
    assert len(records) == 6 and len({r["tokens"] for r in records}) == 1, "equal tokens for all six"
    for family in ([r for r in records if r["experts"] == 1], [r for r in records if r["experts"] > 1]):
        sizes = [r["parameters"] for r in family]
        assert max(sizes) / min(sizes) < 1.02, f"parameter counts not matched: {sizes}"
    for r in records:
        assert 1.0 < r["perplexity"] < 600, f"{r['model']}: no better than uniform over the vocabulary"
        assert r["tokens_per_s"] > 0 and not r["diverged"]


# ---------------------------------------------------------------------------------------------------- shared
@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_plot_only_redraws_every_figure_from_the_json(out_dir):
    for script, name in ((mqar, "mqar"), (arithmetic, "arithmetic"), (lm, "lm")):
        assert (out_dir / f"{name}.json").is_file(), f"the tiny {name} run wrote no JSON (see its own test)"
        (out_dir / f"{name}.png").unlink()
        script.main(["--plot-only", str(out_dir)])
        assert (out_dir / f"{name}.png").stat().st_size > 10_000


def test_without_matplotlib_the_table_and_json_are_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    common.write_results(tmp_path, "x", title="t", command="c", device=torch.device("cpu"), notes=["n"],
                         table="| a |\n| --- |", records=[{"a": 1}], plot=lambda records, plt: None, no_plot=False)
    assert json.loads((tmp_path / "x.json").read_text())["records"] == [{"a": 1}]
    assert "| a |" in (tmp_path / "x.md").read_text() and not (tmp_path / "x.png").exists()
    assert "figure was skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs matplotlib"):
        common.plot_only(tmp_path, "x", plot=lambda records, plt: None)


class _SlowRegression(torch.nn.Module):
    """The train loop's contract, model(**batch).loss, at 10 ms a step."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, input_ids):
        time.sleep(0.01)
        return SimpleNamespace(loss=self.linear(input_ids.float()).pow(2).mean())


def test_train_stops_at_its_deadline():
    deadline = time.time() + 0.3
    result = common.train(_SlowRegression(), lambda step: {"input_ids": torch.ones(2, 4)}, steps=10_000, lr=1e-3,
                          device=torch.device("cpu"), deadline=deadline, progress=False)
    assert result.out_of_time and 5 < result.steps < 100 and time.time() < deadline + 0.2
    assert len(result.losses) == result.steps


def test_timing_steps_leaves_the_initialisation_as_it_was():
    model = common.build_model("1:1", num_layers=2, hidden_size=32, vocab_size=64, device=torch.device("cpu"), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"input_ids": torch.randint(64, (2, 16)), "labels": torch.randint(64, (2, 16))}
    assert common.seconds_per_step(model, lambda step: batch, device=torch.device("cpu")) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert common.fit_steps(1000, [0.5, 1.5], deadline=time.time() + 21, reserve=0.1) == 9  # 18.9 s / 2 s a step
    assert common.fit_steps(5, [0.5, 1.5], deadline=time.time() + 20) == 5
    assert common.fit_steps(5, [0.5], deadline=None) == 5


def test_run_jobs_shares_the_time_left_and_never_passes_the_deadline():
    deadline = time.time() + 100
    given = common.run_jobs(_report_deadline, [{"index": i} for i in range(4)], workers=1, deadline=deadline,
                            desc="jobs", progress=False)
    assert all(d <= deadline for d in given)
    assert given[0] - time.time() == pytest.approx(25, abs=1)  # a quarter of the time for the first of four
    assert given[-1] == deadline  # the last job gets all that is left
    assert common.run_jobs(_report_deadline, [{"index": 0}], workers=1, deadline=None, desc="jobs",
                           progress=False) == [None]


def _report_deadline(index, deadline):
    return deadline
