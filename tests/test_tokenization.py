"""HybridLMTokenizer: digit splitting, exact round trips, Auto/remote-code loading, padding, chat template, CLI."""

import builtins
import importlib
import json
import os
import random
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import hybrid_lm
import hybrid_lm.tokenization_hybrid_lm as tokenization
from hybrid_lm import HybridLMConfig, HybridLMTokenizer, train_tokenizer
from hybrid_lm.cli import main
from builders import run_without_package

REPO = Path(__file__).resolve().parent.parent
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
SAMPLE = "On 2024-03-15 the order abc123 cost $1,234.56 (was 1999.99).\r\n  Indented   text\t漢字 😀"


def digit_heavy_lines(count: int, seed: int = 0) -> list[str]:
    """Dates, prices, long numbers, versions and digits glued to words, in English-like lines."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ter", "son", "pra", "vel", "dun", "shi", "qua", "ri", "bel", "tor", "nex", "ul"]
    words = ["the", "order", "price", "total", "invoice", "shipped", "on", "item", "room", "version", "and", "paid"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]

    def number():
        return rng.choice([
            f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            f"${rng.randint(0, 99999):,}.{rng.randint(0, 99):02d}",
            str(rng.randrange(10 ** rng.randint(5, 18))),
            f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}",
            f"abc{rng.randint(0, 999)}",
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
            "".join(rng.choice("٠١٢٣٤٥٦٧٨٩") for _ in range(4)),  # Arabic-Indic digits
            "".join(rng.choice("０１２３４５６７８９") for _ in range(3)),  # fullwidth digits
        ])

    return [" ".join(rng.choice([rng.choice(words), number()]) for _ in range(12)) + "\n" for _ in range(count)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return digit_heavy_lines(1500)


@pytest.fixture(scope="module")
def tokenizer(corpus) -> HybridLMTokenizer:
    return train_tokenizer(iter(corpus), vocab_size=500, show_progress=False)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(digit_heavy_lines(600, seed=1)), encoding="utf-8")
    return path


def digits_in(text: str) -> int:
    return sum(char.isdigit() for char in text)


# ----------------------------------------------------------------------------- digits


def test_no_token_holds_more_than_one_digit(tokenizer, corpus):
    tokens = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    assert len(tokenizer) == 500
    assert max(digits_in(token) for token in tokens) == 1
    assert max(len(token) for token in tokens) >= 4  # merges did happen

    # The same corpus does produce multi-digit tokens without the digit split, so the check above has teeth.
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    plain.train_from_iterator(iter(corpus), trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert max(digits_in(plain.decode([i])) for i in range(plain.get_vocab_size())) >= 2


@pytest.mark.parametrize("text", ["123456", "abc123", "x١٢٣y", " 2024-03-15", "$1,234.56", "３.１４"])
def test_each_digit_is_its_own_token(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) == text
    digit_pieces = [piece for piece in pieces if digits_in(piece)]
    assert digit_pieces == [char for char in text if char.isdigit()]


def test_six_digits_are_six_tokens(tokenizer):
    assert len(tokenizer.encode("123456", add_special_tokens=False)) == 6


# ----------------------------------------------------------------------------- exact round trips


@pytest.mark.parametrize("text", [
    "", "😀👩‍👩‍👧🎉", "漢字かなカナ한국어", "\x00", "a\x00b", "\x01\x07\x1b[31m\x7f\x85", "\r\n",
    "line\r\nline\rline\n",
    " leading", "trailing ", "  multiple   spaces  ", " " * 300, "\t\t\n\n\n ",
    "\u0301", "e\u0301 \u0301\u0302",
    "\ufeffBOM", "שלום عربي", "\u200d\u200b\u2028", "\U0010ffff\ue000", "<|eos", SAMPLE,
])
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


SPECIAL_STRINGS = ["<|pad|>", "<|bos|>", "<|eos|>", *ROLE_MARKERS]
ANY_TEXT = st.one_of(
    st.text(),
    st.lists(st.one_of(st.text(max_size=5), st.sampled_from(SPECIAL_STRINGS))).map("".join),  # special strings inside
)


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_decode_inverts_encode_for_any_text(tokenizer, text):
    plain = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(plain) == text
    # split_special_tokens=True treats "<|eos|>" in the text as text, so even skip_special_tokens=True is exact
    split = tokenizer.encode(text, add_special_tokens=True, split_special_tokens=True)
    assert split[0] == tokenizer.bos_token_id
    assert tokenizer.decode(split, skip_special_tokens=True) == text
    if not any(special in text for special in SPECIAL_STRINGS):
        with_special = tokenizer.encode(text, add_special_tokens=True)
        assert with_special == [tokenizer.bos_token_id] + plain
        assert tokenizer.decode(with_special, skip_special_tokens=True) == text


def test_special_token_strings_in_text_are_special_unless_split(tokenizer):
    text = "say <|eos|> now"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.eos_token_id in ids  # what chat templates rely on: rendered markers become single tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "say  now"
    split = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert not set(split) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(split, skip_special_tokens=True) == text


def test_byte_level_has_no_unknown_token(tokenizer):
    assert tokenizer.unk_token is None
    every_byte = bytes(range(128)).decode("ascii") + "é€𝄞"
    assert tokenizer.decode(tokenizer.encode(every_byte, add_special_tokens=False)) == every_byte


def test_untrained_tokenizer_is_the_byte_alphabet():
    untrained = HybridLMTokenizer()
    assert len(untrained) == 3 + 256
    text = "2024 😀\r\n"
    ids = untrained.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())
    assert untrained.decode(ids) == text


# ----------------------------------------------------------------------------- special tokens, bos/eos


def test_special_tokens_come_first_and_match_the_config_ids(tokenizer):
    config = HybridLMConfig()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        config.pad_token_id, config.bos_token_id, config.eos_token_id)
    assert tokenizer.convert_tokens_to_ids(list(ROLE_MARKERS)) == [3, 4, 5]
    assert tokenizer.decode(list(range(6)), skip_special_tokens=True) == ""


def test_bos_is_added_and_eos_is_not(tokenizer):
    ids = tokenizer.encode("hello")
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids


def test_add_bos_and_eos_choices_survive_save_and_load(corpus, tmp_path):
    tokenizer = train_tokenizer(iter(corpus[:200]), vocab_size=300, show_progress=False)
    tokenizer.add_bos_token = False
    tokenizer.add_eos_token = True
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.add_bos_token, loaded.add_eos_token) == (False, True)
    assert loaded.encode("hi 42") == tokenizer.encode("hi 42")
    assert loaded.encode("hi 42")[-1] == loaded.eos_token_id
    assert loaded.encode("hi 42")[0] != loaded.bos_token_id


def test_special_tokens_are_configurable(corpus):
    tokenizer = train_tokenizer(iter(corpus[:200]), vocab_size=300, show_progress=False,
                                special_tokens={"user_token": "<|human|>", "eos_token": "</s>"})
    assert tokenizer.convert_ids_to_tokens(list(range(6))) == [
        "<|pad|>", "<|bos|>", "</s>", "<|system|>", "<|human|>", "<|assistant|>"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|bos|><|human|>hi</s>"


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": 262}, "vocab_size"),
    ({"special_tokens": {"mask_token": "<m>"}}, "unknown key 'mask_token'"),
    ({"special_tokens": {"bos_token": "<|eos|>"}}, "distinct"),
    ({"min_frequency": -1}, "min_frequency"),
    ({"model_max_length": 0}, "model_max_length"),
])
def test_bad_arguments_raise_before_training(kwargs, match):
    def never_read():
        raise AssertionError("the corpus was read")
        yield

    with pytest.raises(ValueError, match=match):
        train_tokenizer(never_read(), **{"vocab_size": 300, **kwargs})


def test_model_max_length_comes_from_the_config(corpus, tmp_path):
    assert train_tokenizer(iter(corpus[:50]), vocab_size=270, show_progress=False).model_max_length == (
        HybridLMConfig().max_position_embeddings)
    config = HybridLMConfig(max_position_embeddings=4096)
    tokenizer = train_tokenizer(iter(corpus[:50]), vocab_size=270, show_progress=False,
                                model_max_length=config.max_position_embeddings)
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 4096


# ----------------------------------------------------------------------------- files


def test_files_are_read_byte_for_byte(tmp_path, monkeypatch):
    text = "crlf\r\nlone cr\r 漢字😀 e\u0301\n" * 20
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(tokenization, "READ_BLOCK_BYTES", 5)  # multi-byte characters straddle block edges
    assert "".join(tokenization._read_utf8([path], "strict")) == text


@pytest.mark.parametrize("block_bytes", [4, 1 << 20])
def test_non_utf8_file_names_file_line_and_byte(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(tokenization, "READ_BLOCK_BYTES", block_bytes)
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\nline two: café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*not valid UTF-8 \(line 2, byte 16\)"):
        train_tokenizer(path, vocab_size=300, show_progress=False)
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes("ok\n€".encode()[:-1])
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(line 2, byte 3\)"):
        train_tokenizer(truncated, vocab_size=300, show_progress=False)
    replaced = train_tokenizer([path], vocab_size=300, show_progress=False, encoding_errors="replace", min_frequency=1)
    assert replaced.decode(replaced.encode("caf\ufffd"), skip_special_tokens=True) == "caf\ufffd"


def test_a_list_of_texts_is_read_as_paths_and_the_error_says_so():
    with pytest.raises(FileNotFoundError, match=r"'some text' does not exist.*pass iter\(texts\)"):
        train_tokenizer(["some text"], vocab_size=300, show_progress=False)


def test_files_and_iterators_train_alike(corpus_file):
    from_file = train_tokenizer(corpus_file, vocab_size=400, show_progress=False)
    from_text = train_tokenizer(iter([corpus_file.read_text(encoding="utf-8")]), vocab_size=400, show_progress=False)
    assert from_file.get_vocab() == from_text.get_vocab()


# ----------------------------------------------------------------------------- padding and batches


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_and_attention_mask(tokenizer, side):
    texts = ["hi", "the order 12345 shipped", "a b"]
    batch = tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    for row, mask, text in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), texts):
        alone = tokenizer.encode(text)
        padding = [tokenizer.pad_token_id] * (len(row) - len(alone))
        assert row == (padding + alone if side == "left" else alone + padding)
        assert mask == [int(i != tokenizer.pad_token_id) for i in row]
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == texts


def test_default_padding_is_left_for_batched_generation(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None


# ----------------------------------------------------------------------------- chat template


CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And 2 * 21?"},
]


def test_chat_template_renders_roles_and_contents_in_order(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    position = 0
    for message in CHAT:
        marker = ROLE_MARKERS[["system", "user", "assistant"].index(message["role"])]
        marker_at = text.index(marker, position)
        content_at = text.index(message["content"], marker_at)
        assert content_at == marker_at + len(marker)
        position = content_at + len(message["content"])
    assert text.startswith(tokenizer.bos_token)
    assert not text.endswith("<|assistant|>")
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(text) and prompt.endswith("<|assistant|>")


def test_chat_template_tokenizes_markers_as_single_tokens(tokenizer):
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert ids.count(tokenizer.eos_token_id) == len(CHAT)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "".join(m["content"] for m in CHAT)


def test_chat_template_rejects_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="unknown chat role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ----------------------------------------------------------------------------- Auto classes and remote code


def save_with_model(tokenizer, directory: Path) -> None:
    config = HybridLMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            attn_layer_period=2, attn_layer_offset=1, num_experts=2, num_experts_per_tok=1,
                            num_attention_heads=4, num_key_value_heads=2)
    tokenizer.save_pretrained(directory)
    hybrid_lm.HybridLMForCausalLM(config).save_pretrained(directory)


def test_auto_tokenizer_loads_with_the_package(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    save_with_model(tokenizer, tmp_path / "model")
    saved = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "HybridLMTokenizer"
    assert "tokenization_hybrid_lm.HybridLMTokenizer" in saved["auto_map"]["AutoTokenizer"]
    assert (tmp_path / "tokenizer" / "tokenization_hybrid_lm.py").is_file()
    assert not (tmp_path / "tokenizer" / "config.json").exists()
    for directory in ("tokenizer", "model"):
        loaded = AutoTokenizer.from_pretrained(tmp_path / directory)
        assert type(loaded) is HybridLMTokenizer
        assert loaded(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
        assert loaded.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(CHAT, tokenize=False)
        assert loaded.all_special_ids == tokenizer.all_special_ids
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size == len(tokenizer)


def test_trust_remote_code_loads_without_the_package(tokenizer, tmp_path):
    tokenizer_dir, model_dir = tmp_path / "tokenizer", tmp_path / "model"
    tokenizer.save_pretrained(tokenizer_dir)
    save_with_model(tokenizer, model_dir)
    out = run_without_package(
        f"""
        import json
        from transformers import AutoModelForCausalLM, AutoTokenizer
        result = {{}}
        for directory in {[str(tokenizer_dir), str(model_dir)]!r}:
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
            ids = tokenizer({SAMPLE!r})["input_ids"]
            result[directory] = {{"class": type(tokenizer).__module__ + "." + type(tokenizer).__name__,
                                 "ids": ids, "decoded": tokenizer.decode(ids, skip_special_tokens=True)}}
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        result["model"] = type(model).__module__ + "." + type(model).__name__
        print(json.dumps(result))
        """,
        tmp_path,
    )
    result = json.loads(out.strip().splitlines()[-1])
    for directory in (tokenizer_dir, model_dir):
        loaded = result[str(directory)]
        assert loaded["class"].startswith("transformers_modules.")
        assert loaded["class"].endswith("tokenization_hybrid_lm.HybridLMTokenizer")
        assert loaded["ids"] == tokenizer(SAMPLE)["input_ids"]
        assert loaded["decoded"] == SAMPLE
    assert result["model"].startswith("transformers_modules.")
    assert result["model"].endswith("HybridLMForCausalLM")


def test_tokenizer_module_imports_only_transformers_tokenizers_stdlib_and_siblings():
    source = (REPO / "hybrid_lm" / "tokenization_hybrid_lm.py").read_text()
    imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    for module in imports:
        top = module.split(".")[0]
        assert module.startswith(".") or top in {"transformers", "tokenizers"} or top in sys.stdlib_module_names, (
            module)


# ----------------------------------------------------------------------------- command line


def cli(*args, output):
    return main(["train-tokenizer", *map(str, args), "--output", str(output)])


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_cli_trains_a_loadable_tokenizer_and_is_idempotent(corpus_file, tmp_path, capsys):
    output = tmp_path / "out"
    assert cli("--input", corpus_file, "--vocab-size", 400, "--model-max-length", 2048, output=output) == 0
    loaded = AutoTokenizer.from_pretrained(output)
    assert type(loaded) is HybridLMTokenizer
    assert len(loaded) == 400 and loaded.model_max_length == 2048
    assert loaded.decode(loaded.encode(SAMPLE), skip_special_tokens=True) == SAMPLE
    assert leftovers(tmp_path) == []
    assert "saved a 400-token tokenizer" in capsys.readouterr().out

    before = snapshot(output)
    assert cli("--input", corpus_file, "--vocab-size", 400, "--model-max-length", 2048, output=output) == 0
    assert "already holds this tokenizer" in capsys.readouterr().out
    assert snapshot(output) == before
    assert leftovers(tmp_path) == []


def test_cli_output_permissions_follow_the_umask(corpus_file, tmp_path):
    """The tokenizer is staged in a mkdtemp folder (0700): the folder it becomes gets what the umask gives."""
    old = os.umask(0o022)
    try:
        assert cli("--input", corpus_file, "--vocab-size", 400, output=tmp_path / "out") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    files = sorted((tmp_path / "out").iterdir())
    assert "tokenizer.json" in [path.name for path in files]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_cli_runs_as_a_module_and_is_declared_as_console_script(corpus_file, tmp_path):
    pyproject = (REPO / "pyproject.toml").read_text()
    entry_point = re.search(r'^\[project\.scripts\]\nhybrid-lm = "(.+)"$', pyproject, re.MULTILINE).group(1)
    module_name, function_name = entry_point.split(":")
    assert getattr(importlib.import_module(module_name), function_name) is main

    run = subprocess.run([sys.executable, "-m", "hybrid_lm.cli", "train-tokenizer", "--input", str(corpus_file),
                          "--vocab-size", "400", "--output", str(tmp_path / "sub")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert cli("--input", corpus_file, "--vocab-size", 400, output=tmp_path / "inproc") == 0
    assert snapshot(tmp_path / "sub") == snapshot(tmp_path / "inproc")  # training is deterministic


def unreadable(path: Path, monkeypatch) -> None:
    """Make `open(path)` fail with EACCES even as root, where chmod does not stop reads."""
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(tokenization, "open", fake_open, raising=False)


@pytest.mark.parametrize("case, message", [
    ("missing", "missing.txt' does not exist; check the path"),
    ("directory", "is a directory; pass the files inside it"),
    ("unreadable", "locked.txt' is not readable (permission denied); fix its permissions"),
    ("not_utf8", "latin1.txt' is not valid UTF-8 (line 1, byte 3); convert it"),
    ("tiny_vocab", "argument --vocab-size: 262 is too small"),
])
def test_cli_input_errors_exit_2_and_write_nothing(case, message, corpus_file, tmp_path, capsys, monkeypatch):
    inputs, vocab_size = [corpus_file], 400
    if case == "missing":
        inputs.append(tmp_path / "missing.txt")
    elif case == "directory":
        inputs.append(corpus_file.parent)
    elif case == "unreadable":
        locked = tmp_path / "locked.txt"
        locked.write_text("secret 123\n")
        unreadable(locked, monkeypatch)
        inputs.append(locked)
    elif case == "not_utf8":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
        inputs.append(tmp_path / "latin1.txt")
    else:
        vocab_size = 262
    output = tmp_path / "out"
    assert cli("--input", *inputs, "--vocab-size", vocab_size, output=output) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not output.exists()
    assert leftovers(tmp_path) == []


def test_cli_non_utf8_input_trains_with_replace(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café 123\n".encode("latin-1") * 50)
    assert cli("--input", tmp_path / "latin1.txt", "--vocab-size", 270, "--encoding-errors", "replace",
               output=tmp_path / "out") == 0
    assert "\ufffd" in AutoTokenizer.from_pretrained(tmp_path / "out").decode(list(range(6, 270)))


def test_cli_refuses_a_different_tokenizer_unless_overwrite(corpus_file, tmp_path, capsys):
    output = tmp_path / "out"
    assert cli("--input", corpus_file, "--vocab-size", 400, output=output) == 0
    (output / "notes.txt").write_text("kept unless --overwrite")
    before = snapshot(output)

    assert cli("--input", corpus_file, "--vocab-size", 300, output=output) == 2
    err = capsys.readouterr().err
    assert "already holds a different tokenizer" in err and "--overwrite" in err and "tokenizer.json" in err
    assert snapshot(output) == before
    assert leftovers(tmp_path) == []

    assert cli("--input", corpus_file, "--vocab-size", 300, "--overwrite", output=output) == 0
    assert len(AutoTokenizer.from_pretrained(output)) == 300
    assert not (output / "notes.txt").exists()
    assert leftovers(tmp_path) == []


def test_cli_refuses_an_unrelated_directory_or_file_unless_overwrite(corpus_file, tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the output was refused")

    output = tmp_path / "busy"
    output.mkdir()
    (output / "data.bin").write_bytes(b"\x00\x01")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with monkeypatch.context() as patch:
        patch.setattr("hybrid_lm.cli.train_tokenizer", no_training)
        assert cli("--input", corpus_file, "--vocab-size", 300, output=output) == 2
        assert "is not empty and holds no tokenizer" in capsys.readouterr().err
        assert cli("--input", corpus_file, "--vocab-size", 300, "--overwrite", output=a_file) == 2
        assert "exists and is not a directory" in capsys.readouterr().err
    assert snapshot(output) == {"data.bin": b"\x00\x01"}

    assert cli("--input", corpus_file, "--vocab-size", 300, "--overwrite", output=output) == 0
    assert not (output / "data.bin").exists()
    assert type(AutoTokenizer.from_pretrained(output)) is HybridLMTokenizer
    assert leftovers(tmp_path) == []


def test_cli_failure_while_saving_leaves_nothing(corpus_file, tmp_path, capsys, monkeypatch):
    def half_save(self, directory, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HybridLMTokenizer, "save_pretrained", half_save)
    output = tmp_path / "out"
    assert cli("--input", corpus_file, "--vocab-size", 300, output=output) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not output.exists()
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- a tokenizer is the one saved, or none


def foreign_tokenizer_json(path: Path) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (no digit split) saved as `path`/tokenizer.json alone; returns it loaded as-is."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>"], show_progress=False)
    backend.train_from_iterator(["hello world 2024 the world 2024 hello"] * 100, trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_a_folder_without_tokenizer_json_is_refused_not_byte_only(tmp_path):
    HybridLMConfig(vocab_size=300, num_hidden_layers=2).save_pretrained(tmp_path)
    with pytest.raises(OSError, match=r"has no tokenizer\.json, so it holds no trained HybridLMTokenizer"):
        AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("settings", [None, {"model_max_length": 100}], ids=["only-tokenizer.json", "no-class"])
def test_another_models_tokenizer_json_is_refused(tmp_path, settings):
    source = foreign_tokenizer_json(tmp_path)
    HybridLMConfig(vocab_size=400, num_hidden_layers=2).save_pretrained(tmp_path)
    if settings is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"tokenizer\.json was not saved by HybridLMTokenizer \(its pre-tokenizer is "
                                         r"ByteLevel, not Digits \+ ByteLevel\).*\"tokenizer_class\""):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    ids = AutoTokenizer.from_pretrained(tmp_path)("hello world 2024")["input_ids"]
    assert ids == source("hello world 2024")["input_ids"] and len(ids) == 3  # the fix the message names works


@pytest.mark.parametrize("content, state", [(b"", "is empty"), (b'{"version": "1.0", "trunc', "is not valid JSON")])
def test_a_damaged_tokenizer_json_is_named(tokenizer, tmp_path, content, state):
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.json")) + " " + state):
        AutoTokenizer.from_pretrained(tmp_path)


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist \(and is not a Hub repo id\); pass a folder"):
        HybridLMTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is an empty folder: nothing to load"):
        HybridLMTokenizer.from_pretrained(tmp_path / "empty")


# ----------------------------------------------------------------------------- the trainer says what it gave


def test_an_empty_corpus_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"the corpus is empty"):
        train_tokenizer(iter([]), vocab_size=300, show_progress=False)
    (tmp_path / "empty.txt").write_text("")
    assert cli("--input", tmp_path / "empty.txt", "--vocab-size", 300, output=tmp_path / "out") == 2
    assert "the corpus is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_vocabulary_smaller_than_asked_is_said(corpus_file, tmp_path, capsys, caplog):
    with caplog.at_level("WARNING"):
        small = train_tokenizer(iter(["abc abd abe"] * 10), vocab_size=10_000, show_progress=False)
    assert f"trained {len(small)} tokens, not the 10000 asked for" in caplog.text
    assert f"vocab_size to len(tokenizer) = {len(small)}" in caplog.text
    assert cli("--input", corpus_file, "--vocab-size", 10_000_000, output=tmp_path / "out") == 0
    assert "(not the 10000000 asked for: the corpus ran out of pairs)" in capsys.readouterr().out


def test_a_device_that_never_ends_is_refused(tmp_path, capsys):
    assert cli("--input", "/dev/zero", "--vocab-size", 300, output=tmp_path / "out") == 2
    assert "'/dev/zero' is not a regular file (a device, pipe or socket)" in capsys.readouterr().err
    with pytest.raises(OSError, match="is not a regular file"):
        train_tokenizer("/dev/zero", vocab_size=300, show_progress=False)


def test_cli_prints_its_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"hybrid-lm {hybrid_lm.__version__}\n"
