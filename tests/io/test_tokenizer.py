"""Tokenizers from GGUF metadata and HF folders: a tiny synthetic GGUF checked against the
`tokenizers` BPE it was written from, and the real SmolLM2 GGUF checked against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lcm.io.tokenizer import (
    GGUF_PRE_TOKENIZERS,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_USER_DEFINED,
    TextTokenizer,
    load_tokenizer,
    text_tokenizer_from_gguf,
    tokenizer_from_gguf,
    tokenizer_from_hf_folder,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]
USER_DEFINED = "<think>"
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b  # 12 + 345\n",
    "héllo wörld, naïve café 😀",
] * 3
TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Strings where our GGUF tokenizer and transformers' GGUF conversion agree id for id.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n\treturn a + b\n\n\nclass  Foo:\n    pass   # trailing  ",
    "12345 67890",
    "héllo wörld — naïve café 你好，世界 🤗🚀👩‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>lcm<file_sep>x",
    "I'm here, they've gone; we'll see. DON'T",
    "",
    "  leading and trailing  \n\n\r\n\t",
    "<|im_start|><|im_end",
]
# Where they differ: SmolLM2 isolates every \p{N} character before the GPT-2 split (its tokenizer.json
# has Digits(individual_digits=True); llama.cpp's "smollm" pre-tokenizer splits on \p{N} first), while
# transformers' GGUF conversion applies only the GPT-2 split. So whitespace before a digit and
# non-ASCII numerals tokenize differently; we follow SmolLM2/llama.cpp.
DIVERGENT = ["if x  >  1:\n\t\treturn  2", "x² ½ ① Ⅻ ٣٤"]
CONVERSATIONS = [
    [{"role": "user", "content": "hi 🤗"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And\ttabs\n  and spaces?"},
    ],
]


# ----------------------------------------------------------------------------------------------------
# A tiny synthetic GGUF, from a byte-level BPE trained here


def _train_bpe(pre_tokenizer: pre_tokenizers.PreTokenizer) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_tokens([USER_DEFINED])
    return tokenizer


def _write_gguf(path: Path, reference: Tokenizer, pre: str | None, model: str = "gpt2", **flags: bool) -> Path:
    spec = json.loads(reference.to_str())["model"]
    tokens = [reference.id_to_token(i) for i in range(reference.get_vocab_size(with_added_tokens=True))]
    types = [
        TOKEN_TYPE_CONTROL if t in SPECIALS else TOKEN_TYPE_USER_DEFINED if t == USER_DEFINED else 1 for t in tokens
    ]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(merge) for merge in spec["merges"]])
    writer.add_bos_token_id(SPECIALS.index("<|im_start|>"))
    writer.add_eos_token_id(SPECIALS.index("<|im_end|>"))
    writer.add_eot_token_id(SPECIALS.index("<|eot|>"))
    writer.add_pad_token_id(SPECIALS.index("<|endoftext|>"))
    writer.add_add_bos_token(flags.get("add_bos", False))
    writer.add_chat_template(TINY_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False)
SMOLLM_SPLIT = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
)
SAMPLES = [*CORPUS[:3], *DIVERGENT, "<|im_start|>user\nthe fox<|im_end|><think>x", "new words 42 zebra\t\t  "]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer]:
    reference = _train_bpe(SMOLLM_SPLIT)
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", reference, "smollm"), reference


@pytest.mark.parametrize(("pre", "split"), [("gpt2", GPT2_SPLIT), ("smollm", SMOLLM_SPLIT), (None, GPT2_SPLIT)])
def test_gguf_tokenizer_matches_the_bpe_it_was_written_from(tmp_path: Path, pre: str | None, split) -> None:
    reference = _train_bpe(split)
    ours = tokenizer_from_gguf(_write_gguf(tmp_path / "tiny.gguf", reference, pre))
    for text in SAMPLES:
        ids = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)


def test_special_and_user_defined_tokens_are_atomic(tiny_gguf: tuple[Path, Tokenizer]) -> None:
    tokenizer = text_tokenizer_from_gguf(tiny_gguf[0])
    ids = tokenizer.encode("<|im_start|>user<|im_end|><think>")
    im_start, im_end, think = (tokenizer.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<think>"))
    assert ids[0] == im_start and ids[-2:] == [im_end, think]
    # Special (CONTROL) tokens are dropped on decode; USER_DEFINED ones are ordinary text.
    assert tokenizer.decode(ids) == "user<think>"
    assert tokenizer.decode(ids, skip_special=False) == "<|im_start|>user<|im_end|><think>"


def test_gguf_special_ids_flags_and_template(tiny_gguf: tuple[Path, Tokenizer]) -> None:
    tokenizer = text_tokenizer_from_gguf(gguf.GGUFReader(tiny_gguf[0]))  # a reader works as well as a path
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    assert tokenizer.eos_ids == (2, 3)  # end-of-turn also stops generation
    assert not tokenizer.add_bos and tokenizer.chat_template == TINY_TEMPLATE
    assert tokenizer.vocab_size == tiny_gguf[1].get_vocab_size(with_added_tokens=True)
    assert tokenizer.special_tokens() == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }


def test_add_bos(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bos.gguf", _train_bpe(GPT2_SPLIT), "gpt2", add_bos=True)
    tokenizer = text_tokenizer_from_gguf(path)
    plain = tokenizer.encode("the fox", add_special=False)
    assert tokenizer.add_bos and tokenizer.encode("the fox") == [tokenizer.bos_id, *plain]
    # The bare tokenizers object adds it too, through its post-processor.
    assert tokenizer_from_gguf(path).encode("the fox").ids == [tokenizer.bos_id, *plain]


def test_chat_template(tiny_gguf: tuple[Path, Tokenizer]) -> None:
    tokenizer = text_tokenizer_from_gguf(tiny_gguf[0])
    messages = [{"role": "user", "content": "hi"}]
    expected = "<|im_start|><|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tokenizer.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(messages, bos_token="") == expected[len("<|im_start|>") :] + (
        "<|im_start|>assistant\n"
    )
    with pytest.raises(jinja2.TemplateError, match="no tools"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="no chat template"):
        TextTokenizer(tokenizer.tokenizer).apply_chat_template(messages)


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "wpm.gguf", _train_bpe(GPT2_SPLIT), "gpt2", model="bert")
    with pytest.raises(ValueError, match=r"unsupported GGUF tokenizer model 'bert'; supported: \['gpt2', 'llama'\]"):
        tokenizer_from_gguf(path)
    # SentencePiece ('llama') vocabularies are built for Gemma's files only
    path = _write_gguf(tmp_path / "spm.gguf", _train_bpe(GPT2_SPLIT), "gpt2", model="llama")
    with pytest.raises(ValueError, match="is built for Gemma files only; this file's architecture is 'llama'"):
        tokenizer_from_gguf(path)


def test_unknown_pre_tokenizer_warns_and_uses_gpt2_split(tmp_path: Path) -> None:
    reference = _train_bpe(GPT2_SPLIT)
    path = _write_gguf(tmp_path / "odd.gguf", reference, "no-such-split")
    with pytest.warns(UserWarning, match="no-such-split"):
        tokenizer = tokenizer_from_gguf(path)
    assert tokenizer.encode(SAMPLES[1]).ids == reference.encode(SAMPLES[1]).ids
    assert {"smollm", "gpt2", "llama-bpe", "qwen2"} <= set(GGUF_PRE_TOKENIZERS)


@pytest.mark.parametrize(
    ("pre", "words"),
    [
        ("smollm", ["abc", "Ġ", "1", "2", "3", "4", "5", "ĠĠ", "Ġx"]),
        ("llama-bpe", ["abc", "Ġ", "123", "45", "ĠĠ", "Ġx"]),
        ("qwen2", ["abc", "Ġ", "1", "2", "3", "4", "5", "ĠĠ", "Ġx"]),
        ("gpt2", ["abc", "Ġ12345", "ĠĠ", "Ġx"]),
    ],
)
def test_pre_tokenizer_registry(tmp_path: Path, pre: str, words: list[str]) -> None:
    tokenizer = tokenizer_from_gguf(_write_gguf(tmp_path / "t.gguf", _train_bpe(GPT2_SPLIT), pre))
    assert [word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str("abc 12345   x")] == words


def test_gguf_without_tokenizer(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="has no tokenizer metadata"):
        tokenizer_from_gguf(tmp_path / "bare.gguf")


# ----------------------------------------------------------------------------------------------------
# Hugging Face folders


def test_hf_folder(tmp_path: Path) -> None:
    reference = _train_bpe(GPT2_SPLIT)
    reference.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},  # the AddedToken form
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": [
            {"name": "default", "template": "{{ eos_token }}"},
            {"name": "rag", "template": "x"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    tokenizer = tokenizer_from_hf_folder(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.eos_ids) == (1, 2, 0, (2, 3))
    for text in SAMPLES:
        assert tokenizer.encode(text) == [1, *reference.encode(text).ids]
    assert tokenizer.apply_chat_template([]) == "<|im_end|>"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}")  # takes precedence, as in transformers
    assert load_tokenizer(tmp_path).apply_chat_template([]) == "<|im_start|>"


def test_hf_folder_reads_add_bos_off_the_post_processor(tmp_path: Path) -> None:
    reference = _train_bpe(GPT2_SPLIT)
    text_tokenizer_from_gguf(_write_gguf(tmp_path / "t.gguf", reference, "gpt2", add_bos=True)).tokenizer.save(
        str(tmp_path / "tokenizer.json")
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    tokenizer = tokenizer_from_hf_folder(tmp_path)
    assert tokenizer.add_bos and tokenizer.encode("fox") == [1, *reference.encode("fox").ids]


def test_save_round_trip(tiny_gguf: tuple[Path, Tokenizer], tmp_path: Path) -> None:
    ours = text_tokenizer_from_gguf(tiny_gguf[0])
    loaded = tokenizer_from_hf_folder(ours.save(tmp_path / "saved"))
    assert _comparable_fields(loaded) == _comparable_fields(ours)
    for text in SAMPLES:
        assert loaded.encode(text) == ours.encode(text)


def _comparable_fields(tokenizer: TextTokenizer) -> tuple:
    return (
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.eos_ids[:1],  # generation_config.json is not written, so only the EOS itself survives
        tokenizer.pad_id,
        tokenizer.add_bos,
        tokenizer.add_eos,
        tokenizer.chat_template,
        tokenizer.vocab_size,
    )


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a .gguf file nor"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> TextTokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_smollm2_metadata(smollm2: TextTokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.unk_id, smollm2.add_bos) == (
        1,
        2,
        2,
        0,
        False,
    )
    assert smollm2.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert smollm2.encode("12345 67890") == [33, 34, 35, 36, 37, 216, 38, 39, 40, 41, 32]  # one id per digit


@pytest.mark.parametrize("text", TEXTS + DIVERGENT)
def test_smollm2_decode_round_trip(smollm2: TextTokenizer, text: str) -> None:
    assert smollm2.decode(smollm2.encode(text), skip_special=False) == text


@pytest.mark.parity
def test_smollm2_ids_match_transformers(smollm2: TextTokenizer, smollm2_transformers) -> None:
    for text in TEXTS:
        ids = smollm2_transformers(text)["input_ids"]
        assert smollm2.encode(text) == ids, text
        assert smollm2.decode(ids) == smollm2_transformers.decode(ids, skip_special_tokens=True)
        assert smollm2.decode(ids, skip_special=False) == smollm2_transformers.decode(ids)


@pytest.mark.parity
def test_smollm2_ids_match_transformers_vocab_with_smollm2_split(smollm2: TextTokenizer, smollm2_transformers) -> None:
    # transformers' vocabulary, merges and added tokens, with SmolLM2's own pre-tokenizer put back.
    reference = Tokenizer.from_str(smollm2_transformers.backend_tokenizer.to_str())
    reference.pre_tokenizer = SMOLLM_SPLIT
    for text in TEXTS + DIVERGENT:
        assert smollm2.encode(text) == reference.encode(text).ids, text


@pytest.mark.parity
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(
    smollm2: TextTokenizer, smollm2_transformers, add_generation_prompt: bool
) -> None:
    for messages in CONVERSATIONS:
        expected = smollm2_transformers.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parity
def test_smollm2_saved_folder_loads_in_transformers(smollm2: TextTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = smollm2.save(tmp_path / "smollm2")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = tokenizer_from_hf_folder(folder)
    for text in TEXTS + DIVERGENT:
        assert ours.encode(text) == smollm2.encode(text) == theirs(text)["input_ids"], text
    assert theirs.apply_chat_template(CONVERSATIONS[1], tokenize=False) == ours.apply_chat_template(
        CONVERSATIONS[1], add_generation_prompt=False
    )
