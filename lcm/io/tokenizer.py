"""Tokenizers from a GGUF file's metadata or a Hugging Face folder, behind one small wrapper.

A GGUF has no `tokenizer.json`: it stores the vocabulary, the merges, the token types and the special
ids as metadata under llama.cpp's key names (`tokenizer.ggml.*`). We rebuild a `tokenizers.Tokenizer`
from those, following transformers' GGUF conversion (`integrations/gguf/gguf_tokenizer_mapping.py`):
byte-level BPE with the file's merges, CONTROL tokens added as special tokens and USER_DEFINED ones as
plain added tokens, so both are matched whole in text.

Deviations from transformers, each towards llama.cpp (`src/llama-vocab.cpp`) and the original
`tokenizer.json` files:
- `tokenizer.ggml.pre` values llama.cpp splits digits for (smollm, starcoder, ...) get
  `Digits(individual_digits=True)` before the GPT-2 split, as SmolLM2's own `tokenizer.json` does;
  transformers uses the plain GPT-2 split. The ids agree whenever the vocabulary has no merges
  that start with a digit (true of SmolLM2), which is what those vocabularies were trained with.
- the llama3 family gets `ignore_merges=True`, as Llama 3's `tokenizer.json` and llama.cpp do.
- `tokenizer.ggml.add_space_prefix` is honoured (ByteLevel's `add_prefix_space`).
- an unknown `tokenizer.ggml.pre` falls back to the GPT-2 split like transformers, but with a warning.

Gemma's files (`tokenizer.ggml.model == "llama"`, architecture gemma*) hold a SentencePiece BPE vocabulary
without merges: as transformers does, tokens of only spaces are respelled with "▁", the merges are rebuilt
from the vocabulary in file order (Gemma's scores do not follow its merge order; the order of the tokens does),
and the tokenizer is `GemmaTokenizer`'s: BPE with byte fallback, spaces normalised to "▁", no prefix space.

    tok = load_tokenizer(model_path("smollm2"))         # a .gguf file or an HF folder
    ids = tok.encode("Hello")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lcm.io.chat_template import compile_chat_template

# llama.cpp's `llama_token_type` values in `tokenizer.ggml.token_type`.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_GPT2_SPLIT = None  # ByteLevel(use_regex=True) applies GPT-2's own pattern
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class ByteLevelSplit:
    """How a byte-level BPE vocabulary cuts text into words before merging."""

    regex: str | None = _GPT2_SPLIT  # isolating split pattern; None is GPT-2's
    individual_digits: bool = False  # every digit its own word, before the pattern
    ignore_merges: bool = False  # a word that is itself a token is not merged further


_DIGITS_THEN_GPT2 = ByteLevelSplit(individual_digits=True)
_LLAMA3 = ByteLevelSplit(regex=_LLAMA3_SPLIT, ignore_merges=True)
_QWEN2 = ByteLevelSplit(regex=_QWEN2_SPLIT)

# `tokenizer.ggml.pre` -> split, after llama.cpp's `llama_vocab::impl::load`.
GGUF_PRE_TOKENIZERS: dict[str, ByteLevelSplit] = {
    "default": ByteLevelSplit(),
    "gpt-2": ByteLevelSplit(),
    "gpt2": ByteLevelSplit(),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _DIGITS_THEN_GPT2
    ),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2),
}


# ----------------------------------------------------------------------------------------------------
# GGUF metadata


def _field_value(field: gguf.ReaderField) -> Any:
    """A GGUF metadata value as Python: str, int, float, bool, or a list of those."""
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if len(field.types) == 1:  # an empty array records no item type
            return []
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [field.parts[index].tobytes().decode("utf-8") for index in field.data]
        return [value for index in field.data for value in field.parts[index].tolist()]
    if kind == gguf.GGUFValueType.STRING:
        return field.parts[field.data[0]].tobytes().decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def _tokenizer_metadata(reader_or_path: gguf.GGUFReader | str | os.PathLike[str]) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF, keys without the `tokenizer.` prefix."""
    reader = reader_or_path if isinstance(reader_or_path, gguf.GGUFReader) else gguf.GGUFReader(reader_or_path)
    metadata = {
        key.removeprefix("tokenizer."): _field_value(field)
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.")
    }
    if "general.architecture" in reader.fields:  # a SentencePiece vocabulary's layout depends on it
        metadata["architecture"] = _field_value(reader.fields["general.architecture"])
    if "ggml.model" not in metadata or "ggml.tokens" not in metadata:
        raise ValueError(f"{reader.data.filename!r} has no tokenizer metadata (tokenizer.ggml.model/tokens)")
    return metadata


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the `bytes_to_unicode` of its encoder.py)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in spelling:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def _byte_level_bpe(metadata: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`): GPT-2, SmolLM, Llama 3, Qwen2, ..."""
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; one that is not (a raw-text added token) is respelled.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode("utf-8")): index
        for index, token in enumerate(metadata["ggml.tokens"])
    }
    merges = [tuple(merge.split(" ")) for merge in metadata.get("ggml.merges", [])]
    pre = metadata.get("ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        warnings.warn(
            f"unknown tokenizer.ggml.pre {pre!r}, using GPT-2's split; known: {sorted(GGUF_PRE_TOKENIZERS)}",
            stacklevel=4,
        )
    split = GGUF_PRE_TOKENIZERS.get(pre, ByteLevelSplit())
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=split.ignore_merges,
        )
    )
    add_prefix_space = bool(metadata.get("ggml.add_space_prefix", False))
    steps: list[pre_tokenizers.PreTokenizer] = []
    if split.individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split.regex is not None:
        steps.append(pre_tokenizers.Split(Regex(split.regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=split.regex is None))
    tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    # A token typed CONTROL or USER_DEFINED but spelled outside the byte alphabet is a llama.cpp
    # mislabel (transformers skips it too): the vocabulary holds it respelled, so adding its raw
    # spelling would create an id past the model's vocabulary.
    token_types = metadata.get("ggml.token_type", [])
    added = [
        (token, token_type)
        for token, token_type in zip(metadata["ggml.tokens"], token_types, strict=False)
        if token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED) and set(token) <= alphabet
    ]
    tokenizer.add_special_tokens(
        [AddedToken(token, normalized=False, special=True) for token, kind in added if kind == TOKEN_TYPE_CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(token, normalized=False, special=False) for token, kind in added if kind != TOKEN_TYPE_CONTROL]
    )
    return tokenizer


def _merges_in_vocabulary_order(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best first: earlier tokens first, and a token's splits by longer
    left piece (transformers' ``generate_merges`` with score = -index)."""
    index = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, rank in index.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in index and right in index:
                merges.append((-rank, cut, len(token) - cut, left, right))
    merges.sort(key=lambda m: m[:3], reverse=True)
    return [(left, right) for *_, left, right in merges]


def _gemma_bpe(metadata: dict[str, Any]) -> Tokenizer:
    """Gemma's SentencePiece BPE (`tokenizer.ggml.model == "llama"`, architecture gemma*): see the module notes."""
    architecture = metadata.get("architecture", "")
    if not str(architecture).startswith("gemma"):
        raise ValueError(
            f"GGUF tokenizer 'llama' (SentencePiece) is built for Gemma files only; this file's architecture is "
            f"{architecture!r}"
        )
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in metadata["ggml.tokens"]]
    unk = metadata.get("ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            vocab={token: i for i, token in enumerate(tokens)},
            merges=_merges_in_vocabulary_order(tokens),
            fuse_unk=True,
            unk_token=tokens[unk] if unk is not None else None,
            byte_fallback=True,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # as transformers: the file's spellings, CONTROL ones special, USER_DEFINED ones found in the vocabulary plain
    typed = list(zip(metadata["ggml.tokens"], metadata.get("ggml.token_type", []), strict=False))
    vocab = tokenizer.get_vocab()
    control = [t for t, k in typed if k == TOKEN_TYPE_CONTROL]
    user = [t for t, k in typed if k == TOKEN_TYPE_USER_DEFINED and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tokenizer


# `tokenizer.ggml.model` -> builder.
GGUF_TOKENIZER_MODELS: dict[str, Callable[[dict[str, Any]], Tokenizer]] = {"gpt2": _byte_level_bpe, "llama": _gemma_bpe}


def _build_from_metadata(metadata: dict[str, Any]) -> Tokenizer:
    model = metadata["ggml.model"]
    if model not in GGUF_TOKENIZER_MODELS:
        raise ValueError(f"unsupported GGUF tokenizer model {model!r}; supported: {sorted(GGUF_TOKENIZER_MODELS)}")
    tokenizer = GGUF_TOKENIZER_MODELS[model](metadata)
    _set_bos_eos_post_processor(
        tokenizer,
        metadata.get("ggml.bos_token_id") if metadata.get("ggml.add_bos_token", False) else None,
        metadata.get("ggml.eos_token_id") if metadata.get("ggml.add_eos_token", False) else None,
    )
    return tokenizer


def _set_bos_eos_post_processor(tokenizer: Tokenizer, bos_id: int | None, eos_id: int | None) -> None:
    """So that the bare `Tokenizer.encode(..., add_special_tokens=True)` adds what the file asks for."""
    if bos_id is None and eos_id is None:
        return
    prefix = [tokenizer.id_to_token(bos_id)] if bos_id is not None else []
    suffix = [tokenizer.id_to_token(eos_id)] if eos_id is not None else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=[*prefix, "$A", *suffix],
        pair=[*prefix, "$A", *suffix, *prefix, "$B:1", *suffix],
        special_tokens=[(tokenizer.id_to_token(i), i) for i in dict.fromkeys([bos_id, eos_id]) if i is not None],
    )


def tokenizer_from_gguf(reader_or_path: gguf.GGUFReader | str | os.PathLike[str]) -> Tokenizer:
    """A `tokenizers.Tokenizer` rebuilt from a GGUF's `tokenizer.*` metadata.

    Raises ValueError if the file has no tokenizer or one of a kind we do not build.
    """
    return _build_from_metadata(_tokenizer_metadata(reader_or_path))


def text_tokenizer_from_gguf(reader_or_path: gguf.GGUFReader | str | os.PathLike[str]) -> TextTokenizer:
    """`tokenizer_from_gguf` with the file's special ids, BOS/EOS flags and chat template."""
    metadata = _tokenizer_metadata(reader_or_path)
    eos_id = metadata.get("ggml.eos_token_id")
    # End-of-turn / end-of-message ids also end generation (llama.cpp's `llama_vocab_is_eog`).
    stop_ids = [metadata.get(f"ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    return TextTokenizer(
        tokenizer=_build_from_metadata(metadata),
        bos_id=metadata.get("ggml.bos_token_id"),
        eos_id=eos_id,
        eos_ids=tuple(dict.fromkeys(i for i in stop_ids if i is not None)),
        pad_id=metadata.get("ggml.padding_token_id"),
        unk_id=metadata.get("ggml.unknown_token_id"),
        add_bos=bool(metadata.get("ggml.add_bos_token", False)),
        add_eos=bool(metadata.get("ggml.add_eos_token", False)),
        chat_template=metadata.get("chat_template"),
    )


# ----------------------------------------------------------------------------------------------------
# Hugging Face folders


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """A special token as `tokenizer_config.json` writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template_of(folder: Path, config: dict[str, Any]) -> str | None:
    """`chat_template.jinja` if present (transformers >= 4.43 saves it), else the config's entry,
    which may be a list of named templates."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default", next(iter(named.values())) if len(named) == 1 else None)
    return template


def tokenizer_from_hf_folder(path: str | os.PathLike[str]) -> TextTokenizer:
    """A `TextTokenizer` from a Hugging Face folder: `tokenizer.json`, plus `tokenizer_config.json`
    (special tokens, `add_bos_token`, chat template), `special_tokens_map.json` (overrides the
    config's special tokens, as in transformers) and `generation_config.json` (extra EOS ids), each if
    present. Without an explicit `add_bos_token`/`add_eos_token`, they are read off the post-processor.
    """
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no tokenizer.json; expected a Hugging Face tokenizer folder")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = _read_json(folder / "tokenizer_config.json")
    config |= {key: value for key, value in _read_json(folder / "special_tokens_map.json").items() if value}

    def token_id(name: str) -> int | None:
        content = _token_content(config.get(f"{name}_token"))
        return tokenizer.token_to_id(content) if content is not None else None

    bos_id, eos_id = token_id("bos"), token_id("eos")
    probe = tokenizer.encode("a", add_special_tokens=True).ids
    add_bos = config.get("add_bos_token", bool(probe) and probe[0] == bos_id)
    add_eos = config.get("add_eos_token", bool(probe) and probe[-1] == eos_id)
    generation_eos = _read_json(folder / "generation_config.json").get("eos_token_id", [])
    generation_eos = [generation_eos] if isinstance(generation_eos, int) else generation_eos
    return TextTokenizer(
        tokenizer=tokenizer,
        bos_id=bos_id,
        eos_id=eos_id,
        eos_ids=tuple(dict.fromkeys(i for i in [eos_id, *generation_eos] if i is not None)),
        pad_id=token_id("pad"),
        unk_id=token_id("unk"),
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        chat_template=_chat_template_of(folder, config),
    )


def load_tokenizer(path: str | os.PathLike[str]) -> TextTokenizer:
    """A `TextTokenizer` from a `.gguf` file or a Hugging Face folder (see `lcm.io.fetch.resolve_model`)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return text_tokenizer_from_gguf(path)
    if path.is_dir():
        return tokenizer_from_hf_folder(path)
    raise FileNotFoundError(f"{str(path)!r} is neither a .gguf file nor a Hugging Face tokenizer folder")


# ----------------------------------------------------------------------------------------------------
# The wrapper


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` with the special ids and flags a model's generation needs."""

    tokenizer: Tokenizer  # the HF tokenizers object; its post-processor is not used by `encode`
    bos_id: int | None = None  # beginning of sequence
    eos_id: int | None = None  # end of sequence
    eos_ids: tuple[int, ...] = ()  # every id that ends generation (EOS, end-of-turn, ...); eos_id first
    pad_id: int | None = None  # padding
    unk_id: int | None = None  # unknown token
    add_bos: bool = False  # whether `encode(add_special=True)` prepends BOS
    add_eos: bool = False  # whether `encode(add_special=True)` appends EOS
    chat_template: str | None = None  # jinja2 source

    def __post_init__(self) -> None:
        if self.eos_id is not None and self.eos_id not in self.eos_ids:
            object.__setattr__(self, "eos_ids", (self.eos_id, *self.eos_ids))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def special_tokens(self) -> dict[str, str]:
        """`{"bos_token": ..., "eos_token": ..., "unk_token": ..., "pad_token": ...}`, those that are set."""
        named = {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id}
        return {f"{name}_token": self.tokenizer.id_to_token(i) for name, i in named.items() if i is not None}

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special`, BOS/EOS as `add_bos`/`add_eos` say.

        Special tokens written in the text (e.g. `<|im_start|>`) are always matched whole.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_special and self.add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def token_at(self, ids: Sequence[int], char: int, text: str | None = None) -> int:
        """The index in ``ids`` of the token that holds character ``char`` of their text (``decode(ids,
        skip_special=False)``, or ``text`` where the caller has it already), or the first token after it; a
        ValueError when the text does not encode back to ``ids`` (then no character maps to a token)."""
        text = self.decode(ids, skip_special=False) if text is None else text
        if not 0 <= char <= len(text):
            raise ValueError(f"char={char} lies outside the prompt's text of {len(text)} characters")
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids = list(ids)
        shift = 0 if encoding.ids == ids else 1 if ids[:1] == [self.bos_id] and encoding.ids == ids[1:] else None
        if shift is None:
            raise ValueError("the prompt's text does not encode back to its ids: cannot map a character to a token")
        ends = [end for _, end in encoding.offsets]
        return shift + next((i for i, end in enumerate(ends) if end > char), len(ends))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The text of `ids`; special tokens dropped when `skip_special`."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The chat rendered as a prompt string, as transformers' `apply_chat_template(tokenize=False)`.

        The template sees `messages`, `add_generation_prompt`, `tools=None`, `documents=None`, the
        special tokens as strings (`bos_token`, `eos_token`, `unk_token`, `pad_token`) and
        `template_kwargs`, which override all of these.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; set TextTokenizer.chat_template")
        variables = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": None,
            "documents": None,
            **self.special_tokens(),
            **template_kwargs,
        }
        return compile_chat_template(self.chat_template).render(**variables)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `folder`, loadable by
        `tokenizer_from_hf_folder` and transformers' `AutoTokenizer.from_pretrained`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            **self.special_tokens(),
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return folder
