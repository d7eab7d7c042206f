"""The quality scripts in benchmarks/quality: the MQAR task and the addition task are built and scored right.

(Their `--tiny` runs are not part of the suite yet: on a shared 2-core CPU they take minutes, and the tiny
MQAR instance that pure attention learns reliably still has to be found; see issue 14.)
"""

import random
import sys
from pathlib import Path

import pytest
import torch

QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import arithmetic  # noqa: E402
import mqar  # noqa: E402


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


def test_mqar_accuracy_counts_answers_only():
    labels = torch.tensor([[-100, -100, 7, -100, 5]])
    logits = torch.zeros(1, 5, 10)
    logits[0, 1, 7] = 1  # right answer for position 2
    logits[0, 3, 4] = 1  # wrong answer for position 4
    logits[0, 0, 3] = 1  # a non-answer position: ignored
    assert mqar.answer_accuracy(logits, labels) == (1, 2)


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


# ---------------------------------------------------------------------------------------------------- LM
