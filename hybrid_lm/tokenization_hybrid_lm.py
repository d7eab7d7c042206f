"""HybridLM tokenizer: a byte-level BPE whose pre-tokenizer puts every digit in a token of its own.

A BPE that merges "2024" or "365" into one token hides the place-value structure of numbers from the
model; splitting digits (as Llama and PaLM do) keeps arithmetic and code learnable. Everything else is
GPT-2's byte-level BPE without the leading-space trick: the 256 byte symbols form the initial
alphabet, so any Unicode text encodes without an unknown token and decodes back exactly.

Pipeline (the class builds it, `tokenizer.json` only carries the vocabulary and merges):
    normalizer:     none (decode(encode(s)) == s needs the text untouched)
    pre-tokenizer:  Digits(individual_digits=True), then ByteLevel(add_prefix_space=False, use_regex=True)
    model:          BPE over byte symbols
    post-processor: `<|bos|>` before each sequence (`add_bos_token=True`), no `<|eos|>` (`add_eos_token=False`)
    decoder:        ByteLevel (bytes back to UTF-8; adds and strips no space)
"""

import codecs
import json
import os
from collections.abc import Iterable, Iterator, Mapping

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.utils import cached_file, logging

from .configuration_hybrid_lm import HybridLMConfig
from .loading_checks import local_folder, read_json_file

logger = logging.get_logger(__name__)

# Ids follow this order (pad 0, bos 1, eos 2: HybridLMConfig's default pad/bos/eos_token_id).
DEFAULT_SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "system_token": "<|system|>",
    "user_token": "<|user|>",
    "assistant_token": "<|assistant|>",
}
ROLE_TOKENS = {"system": "system_token", "user": "user_token", "assistant": "assistant_token"}
NUM_BYTES = 256
# Files are fed to the trainer in blocks of this many bytes; a word cut at a block edge costs nothing measurable.
READ_BLOCK_BYTES = 1 << 20


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """The backend pipeline around a BPE model with the given vocabulary and merges (empty for training)."""
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_alphabet() -> list[str]:
    """The 256 symbols that ByteLevel maps bytes to (GPT-2's `bytes_to_unicode`), sorted."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_chat_template(system_token: str, user_token: str, assistant_token: str) -> str:
    """Jinja chat template: `<bos>` then `<role marker>content<eos>` per message.

    `add_generation_prompt=True` ends the text with the assistant marker, so the model writes the reply and
    stops at `<eos>`. Roles other than system/user/assistant raise. Example with the default markers:
    `<|bos|><|system|>Be brief.<|eos|><|user|>Hi<|eos|><|assistant|>Hello!<|eos|>`.
    """
    markers = json.dumps({"system": system_token, "user": user_token, "assistant": assistant_token})
    return (
        "{%- set markers = " + markers + " -%}"
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in markers -%}"
        "{{- raise_exception('unknown chat role ' + message['role'] + '; use system, user or assistant') -}}"
        "{%- endif -%}"
        "{{- markers[message['role']] + message['content'] + eos_token -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- markers['assistant'] -}}{%- endif -%}"
    )


class HybridLMTokenizer(PreTrainedTokenizerFast):
    """
    Byte-level BPE tokenizer with one token per digit (see the module docstring for the pipeline).

    Build one with [`train_tokenizer`] or load one with `AutoTokenizer.from_pretrained`. Without `vocab`, the
    tokenizer holds only the given special tokens and the 256 byte symbols (no merges): valid, but untrained.

    Args:
        vocab (`dict[str, int]`, *optional*): byte-symbol string -> id, special tokens included.
        merges (`list[tuple[str, str]]`, *optional*): BPE merges, highest priority first.
        pad_token / bos_token / eos_token (`str`): special tokens; default `<|pad|>`, `<|bos|>`, `<|eos|>`.
        add_bos_token (`bool`, *optional*): start every encoded sequence with `bos_token`, so a causal LM
            always sees a fixed first token (attention sink, document start); decode with
            `skip_special_tokens=True` to drop it. Defaults to `True` for a new tokenizer and to what the saved
            `tokenizer.json` does for a loaded one.
        add_eos_token (`bool`, *optional*): end every sequence with `eos_token`. Defaults to `False` (or the
            saved choice) so that an encoded prompt does not tell the model to stop; for pretraining documents,
            append `eos_token_id` when packing or pass `add_eos_token=True`.
        clean_up_tokenization_spaces (`bool`, defaults to `False`): must stay off for exact round trips.

    Shapes: `tokenizer(texts, padding=True, return_tensors="pt")` gives `input_ids` and `attention_mask` of
    shape (batch, longest sequence), padded on `padding_side` (default left, as batched generation needs).
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    model = BPE

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | None = None,
        pad_token: str = DEFAULT_SPECIAL_TOKENS["pad_token"],
        bos_token: str = DEFAULT_SPECIAL_TOKENS["bos_token"],
        eos_token: str = DEFAULT_SPECIAL_TOKENS["eos_token"],
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        if vocab is None:
            vocab = {token: i for i, token in enumerate([str(pad_token), str(bos_token), str(eos_token)])}
            vocab.update({symbol: len(vocab) + i for i, symbol in enumerate(_byte_alphabet())})
        # `from_pretrained` with trust_remote_code passes `tokenizer_file` instead, which the parent loads over this.
        self._tokenizer = _byte_level_bpe(vocab, [tuple(merge) for merge in merges or []])
        # transformers drops add_bos/eos_token from a saved config: the saved post-processor is the record.
        saved_bos, saved_eos = _bos_eos_flags(_saved_post_processor(kwargs))
        super().__init__(
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos_token=saved_bos if add_bos_token is None else add_bos_token,
            add_eos_token=saved_eos if add_eos_token is None else add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )


    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *init_inputs, **kwargs):
        """transformers' loader, after a check that the folder holds a `tokenizer.json` this class saved.

        transformers reads only the vocabulary and merges of a `tokenizer.json` into this class's pipeline, so a
        missing file would give an untrained byte-only tokenizer, and another model's file (a converted
        checkpoint without `tokenizer_class`) its vocabulary split the hybrid_lm way: both are refused.
        """
        folder = local_folder(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        path = cached_file(
            pretrained_model_name_or_path, "tokenizer.json", subfolder=kwargs.get("subfolder", ""),
            cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"), token=kwargs.get("token"),
            local_files_only=kwargs.get("local_files_only", False), _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if path is None:
            where = folder or pretrained_model_name_or_path
            raise OSError(
                f"{where} has no tokenizer.json, so it holds no trained HybridLMTokenizer (without one you would get "
                f"a byte-only tokenizer); save it there with tokenizer.save_pretrained, or pass the folder that holds it"
            )
        saved = read_json_file(path).get("pre_tokenizer")
        if _pipeline_signature(saved) != _pipeline_signature(_byte_level_bpe({}, []).pre_tokenizer):
            steps = [step[0] for step in _pipeline_signature(saved)] or ["none"]
            raise ValueError(
                f"{path} was not saved by HybridLMTokenizer (its pre-tokenizer is {' + '.join(map(str, steps))}, not "
                f"Digits + ByteLevel): read here it would give other ids than the tokenizer it belongs to. Load it with "
                f'its own class: set "tokenizer_class" in tokenizer_config.json (e.g. "PreTrainedTokenizerFast"), or '
                f"call PreTrainedTokenizerFast.from_pretrained"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)


def _pipeline_signature(pre_tokenizer: dict | pre_tokenizers.PreTokenizer | None) -> list[tuple]:
    """The steps of a (serialised) pre-tokenizer with the options that change how text is split."""
    if isinstance(pre_tokenizer, pre_tokenizers.PreTokenizer):
        pre_tokenizer = json.loads(pre_tokenizer.__getstate__())
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    return [(s.get("type"), s.get("individual_digits"), s.get("add_prefix_space"), s.get("use_regex")) for s in steps]


def _saved_post_processor(init_kwargs: dict) -> dict | None:
    """The post-processor (as JSON) of the tokenizer being loaded, if `from_pretrained` passed one along."""
    if init_kwargs.get("post_processor") is not None:
        return json.loads(init_kwargs["post_processor"].__getstate__())
    if init_kwargs.get("tokenizer_object") is not None:
        return json.loads(init_kwargs["tokenizer_object"].to_str())["post_processor"]
    if init_kwargs.get("tokenizer_file") is not None and os.path.isfile(init_kwargs["tokenizer_file"]):
        with open(init_kwargs["tokenizer_file"], encoding="utf-8") as file:
            return json.load(file)["post_processor"]
    return None


def _bos_eos_flags(post_processor: dict | None) -> tuple[bool, bool]:
    """(add_bos_token, add_eos_token) of a TemplateProcessing post-processor; (True, False) without one."""
    if post_processor is None or post_processor.get("type") != "TemplateProcessing":
        return True, False
    single = post_processor["single"]
    return "SpecialToken" in single[0], "SpecialToken" in single[-1]


def _resolve_special_tokens(special_tokens: Mapping[str, str] | None) -> dict[str, str]:
    tokens = dict(DEFAULT_SPECIAL_TOKENS)
    for key, value in (special_tokens or {}).items():
        if key not in DEFAULT_SPECIAL_TOKENS:
            raise ValueError(
                f"special_tokens has an unknown key {key!r}; use some of {list(DEFAULT_SPECIAL_TOKENS)} (add other "
                f"special tokens after training with tokenizer.add_special_tokens)"
            )
        if not isinstance(value, str) or not value:
            raise ValueError(f"special_tokens[{key!r}] is {value!r}; give a non-empty string such as '<|{key[:-6]}|>'")
        tokens[key] = value
    if len(set(tokens.values())) != len(tokens):
        raise ValueError(f"special tokens must be distinct, got {tokens}; give each role its own string")
    return tokens


def _check_int_at_least(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} ({value!r}) must be an integer >= {minimum}")


def check_input_files(paths: list[str | os.PathLike]) -> None:
    """Raise an `OSError` naming the first path that is missing, a directory or unreadable, and the fix."""
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input file {os.fspath(path)!r} does not exist; check the path")
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"input {os.fspath(path)!r} is a directory; pass the files inside it (e.g. {os.fspath(path)}/*.txt)"
            )
        if not os.path.isfile(path):  # a device such as /dev/zero, or a pipe, may never end
            raise OSError(
                f"input {os.fspath(path)!r} is not a regular file (a device, pipe or socket); save the text to a "
                f"file and pass that"
            )
        try:
            open(path, "rb").close()
        except PermissionError as error:
            raise PermissionError(
                f"input file {os.fspath(path)!r} is not readable (permission denied); fix its permissions "
                f"(chmod +r) or leave it out"
            ) from error
        except OSError as error:
            raise OSError(
                f"input file {os.fspath(path)!r} cannot be opened ({error.strerror}); leave it out"
            ) from error


def _read_utf8(paths: list[str | os.PathLike], errors: str) -> Iterator[str]:
    """Yield the text of `paths` in blocks of about `READ_BLOCK_BYTES`, exactly as stored ("\\r\\n" kept)."""
    for path in paths:
        decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
        offset = lines = 0
        with open(path, "rb") as file:
            while block := file.read(READ_BLOCK_BYTES):
                pending = decoder.getstate()[0]
                try:
                    yield decoder.decode(block)
                except UnicodeDecodeError as error:
                    position = error.start - len(pending)
                    line = lines + block[: max(position, 0)].count(b"\n") + 1
                    raise _not_utf8(path, offset + position, line) from error
                offset += len(block)
                lines += block.count(b"\n")
            pending = decoder.getstate()[0]
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as error:
                raise _not_utf8(path, offset - len(pending), lines + 1) from error


def _not_utf8(path: str | os.PathLike, offset: int, line: int) -> ValueError:
    return ValueError(
        f"input file {os.fspath(path)!r} is not valid UTF-8 (line {line}, byte {offset}); convert it "
        f"(e.g. iconv -f latin1 -t utf-8), or train on it with U+FFFD in place of the bad bytes "
        f"(encoding_errors='replace'; on the command line --encoding-errors replace)"
    )


def train_tokenizer(
    files_or_iterator: str | os.PathLike | list[str | os.PathLike] | tuple[str | os.PathLike, ...] | Iterable[str],
    vocab_size: int = HybridLMConfig.vocab_size,
    special_tokens: Mapping[str, str] | None = None,
    min_frequency: int = 2,
    show_progress: bool = True,
    model_max_length: int = HybridLMConfig.max_position_embeddings,
    encoding_errors: str = "strict",
) -> HybridLMTokenizer:
    """Train a [`HybridLMTokenizer`] (byte-level BPE, one token per digit) on files or in-memory text.

    Args:
        files_or_iterator: a path, a list or tuple of paths (UTF-8 text files, read byte for byte: "\\r\\n" and
            every other character are kept), or any other iterable of strings (or of lists of strings), such as
            a generator or a `datasets` column. To train on a list of texts, pass `iter(texts)`.
        vocab_size: size of the final vocabulary, special tokens and the 256 byte symbols included; defaults to
            `HybridLMConfig().vocab_size`. Training stops below it, with a warning, when the corpus runs out of
            pairs; a corpus that gives no merge at all is a `ValueError`.
        special_tokens: overrides for `DEFAULT_SPECIAL_TOKENS` (keys `pad_token`, `bos_token`, `eos_token`,
            `system_token`, `user_token`, `assistant_token`); they get ids 0..5 in that order and the last three
            are the chat template's role markers.
        min_frequency: a pair must occur at least this often to be merged.
        show_progress: show the `tokenizers` progress bars.
        model_max_length: the tokenizer's `model_max_length`; pass your config's `max_position_embeddings`
            (defaults to `HybridLMConfig().max_position_embeddings`).
        encoding_errors: how to treat bytes in the files that are not UTF-8: `"strict"` raises a `ValueError`
            naming the file, line and byte; `"replace"` trains on U+FFFD in their place.

    Raises `ValueError` for bad arguments or non-UTF-8 files, and `OSError` for input files that are missing,
    directories or unreadable, all before training starts (UTF-8 errors surface as the file is read).
    """
    tokens = _resolve_special_tokens(special_tokens)
    _check_int_at_least("vocab_size", vocab_size, minimum=NUM_BYTES + len(tokens) + 1)
    _check_int_at_least("min_frequency", min_frequency, minimum=0)
    _check_int_at_least("model_max_length", model_max_length, minimum=1)
    if encoding_errors not in ("strict", "replace"):
        raise ValueError(f"encoding_errors ({encoding_errors!r}) must be 'strict' or 'replace'")

    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    if isinstance(files_or_iterator, (list, tuple)) and all(
        isinstance(path, (str, os.PathLike)) for path in files_or_iterator
    ):
        paths = list(files_or_iterator)
        if not paths:
            raise ValueError("files_or_iterator is an empty list; give at least one input file")
        try:
            check_input_files(paths)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error} (a list of strings is read as file paths: to train on in-memory text, pass iter(texts))"
            ) from None
        texts = _read_utf8(paths, encoding_errors)
        num_blocks = sum(max(1, -(-os.path.getsize(path) // READ_BLOCK_BYTES)) for path in paths)
        logger.info(f"training a {vocab_size}-token tokenizer on {len(paths)} file(s)")
    else:
        texts = files_or_iterator
        num_blocks = len(files_or_iterator) if hasattr(files_or_iterator, "__len__") else None

    backend = _byte_level_bpe({}, [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=list(tokens.values()),
        initial_alphabet=_byte_alphabet(),
    )
    characters = 0

    def counted(blocks):
        nonlocal characters
        for block in blocks:
            characters += len(block)
            yield block

    backend.train_from_iterator(counted(texts), trainer=trainer, length=num_blocks)
    if characters == 0:
        raise ValueError("the corpus is empty: there is no text to train on; pass files or texts that hold some")
    trained = json.loads(backend.to_str())["model"]
    if len(trained["vocab"]) < vocab_size:
        logger.warning(
            f"trained {len(trained['vocab'])} tokens, not the {vocab_size} asked for: no more pairs of symbols occur "
            f"min_frequency ({min_frequency}) times in the corpus; train on more text, or set your config's "
            f"vocab_size to len(tokenizer) = {len(trained['vocab'])}"
        )
    return HybridLMTokenizer(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        pad_token=tokens["pad_token"],
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
        extra_special_tokens=[tokens[key] for key in ROLE_TOKENS.values()],
        chat_template=build_chat_template(*(tokens[key] for key in ROLE_TOKENS.values())),
        model_max_length=model_max_length,
    )


__all__ = ["HybridLMTokenizer", "build_chat_template", "train_tokenizer"]
