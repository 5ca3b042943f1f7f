"""Our byte-level BPE against Hugging Face `tokenizers`: round trip, parity, training rules."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tunelab.errors import ConfigError, DataError, ModelError
from tunelab.tokenizer.bpe import (
    BYTE_TO_CHAR,
    SPLIT_PATTERN,
    BPETokenizer,
    bytes_to_unicode,
    fallback_split_pattern,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "general_english"
EOT = "<|endoftext|>"

# Pieces hypothesis would rarely hit on its own: ZWJ emoji, CJK, combining marks, odd spaces.
FRAGMENTS = ["👩‍👩‍👧", "🙂", "漢字", "かな", "e\u0301", "a\u0308\u0323", "\u00a0", "\u3000"]
FRAGMENTS += ["  \t\n\n   ", "\r\n", " ", "   x", "I'm", "don't", "'ll", "1234", "ﬁ", EOT]


def text_strategy(exclude: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Unicode text mixed with FRAGMENTS; exclude lists Unicode categories left out."""
    chars = st.text(st.characters(exclude_categories=exclude), max_size=12)
    return st.lists(st.one_of(chars, st.sampled_from(FRAGMENTS)), max_size=12).map("".join)


ANY_TEXT = text_strategy(("Cs",))  # every string that can be UTF-8 encoded
# Code points unassigned in Python's Unicode tables (Cn) are left out of parity checks: `regex`,
# Oniguruma (inside tokenizers) and Python ship different Unicode versions and disagree there.
ASSIGNED_TEXT = text_strategy(("Cs", "Cn"))


def make_corpus(seed: int, lines: int) -> list[str]:
    """Deterministic multilingual text with Zipf-ish repeats, numbers, punctuation and EOT."""
    rng = random.Random(seed)
    syllables = ["th", "e", "an", "in", "er", "on", "re", "at", "st", "ou", "ing", "tion", "qu"]
    extras = ["👩‍👩‍👧", "🙂", "漢字", "かな", "한국어", "e\u0301", "naïve", "мир", "שלום", "١٢٣"]
    extras += ["don't", "I'm", "we'll", "3.14", "1,000"]
    punct = [".", ",", "!", "?", ";", ":", "(", ")", '"', "--", "..."]
    spaces = [" "] * 20 + ["  ", "\t", "\n", "   ", "\u00a0", "\n\n"]
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(3, 20)):
            r = rng.random()
            if r < 0.75:
                word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
            elif r < 0.9:
                word = rng.choice(extras)
            else:
                word = str(rng.randint(0, 10 ** rng.randint(1, 6)))
            parts.append(word + (rng.choice(punct) if rng.random() < 0.15 else ""))
            parts.append(rng.choice(spaces))
        if rng.random() < 0.2:
            parts.append(EOT)
        out.append("".join(parts))
    return out


CORPUS = make_corpus(0, 2000)
HELD_OUT = "".join(make_corpus(1, 200))


def spelled_words(pattern, text: str) -> list[str]:
    """Pre-tokens of text in byte-level spelling, as tokenizers' pre_tokenize_str gives them."""
    return ["".join(BYTE_TO_CHAR[b] for b in w.encode()) for w in pattern.findall(text)]


def hf_from(tok: BPETokenizer, directory: Path) -> Tokenizer:
    """tokenizers' Tokenizer reading the tokenizer.json that ours saves into directory."""
    return Tokenizer.from_file(str(tok.save(directory)))


@pytest.fixture(scope="module")
def small() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, 600)


@pytest.fixture(scope="module")
def small_hf(small, tmp_path_factory) -> Tokenizer:
    return hf_from(small, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def fallback():
    return fallback_split_pattern()


HF_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def test_bytes_to_unicode_is_gpt2s():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")]) == ("Ġ", "Ċ", "A")


@settings(max_examples=300, deadline=None)
@given(ASSIGNED_TEXT)
def test_split_matches_tokenizers(fallback, text):
    expected = [w for w, _ in HF_BYTE_LEVEL.pre_tokenize_str(text)]
    assert spelled_words(SPLIT_PATTERN, text) == expected
    assert spelled_words(fallback, text) == expected  # the `re` version used without `regex`


def test_split_falls_back_without_regex():
    code = "import json, sys; sys.modules['regex'] = None\nfrom tunelab.tokenizer import bpe\n"
    code += "p = bpe.SPLIT_PATTERN\nprint(json.dumps([type(p).__module__, p.findall(sys.argv[1])]))"
    text = "I'm 12 ab!?  x \u3000 漢字\u0301²  "
    args = [sys.executable, "-c", code, text]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["re", SPLIT_PATTERN.findall(text)]


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_round_trip(small, text):
    assert small.decode(small.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(ASSIGNED_TEXT)
def test_parity_on_generated_corpus(small, small_hf, text):
    ids = small.encode(text)
    assert ids == small_hf.encode(text).ids
    assert small.decode(ids) == small_hf.decode(ids, skip_special_tokens=False)


def test_parity_on_held_out_text(small, small_hf, tmp_path):
    ids = small.encode(HELD_OUT)
    assert len(ids) < len(HELD_OUT.encode()) / 2  # the merges really are in use
    assert ids == small_hf.encode(HELD_OUT).ids
    reloaded = BPETokenizer.load(small.save(tmp_path).parent)  # a directory works too
    assert reloaded.merges == small.merges and reloaded.encode(HELD_OUT) == ids


@pytest.mark.parametrize(
    ("name", "vocab_size"), [("the-verdict.txt", 1000), ("wikitext2_test_part_a.txt", 4000)]
)
def test_parity_on_real_corpus(name, vocab_size, tmp_path):
    if not (DATA / name).exists():
        pytest.skip(f"{DATA / name} is missing (shared data not checked out next to the repo)")
    text = (DATA / name).read_text(encoding="utf-8")
    cut = int(len(text) * 0.8)
    tok = BPETokenizer.train(text[:cut].splitlines(keepends=True), vocab_size)
    assert tok.vocab_size == vocab_size
    held_out = text[cut:] + EOT + "naïve café 漢字 🙂"
    assert tok.encode(held_out) == hf_from(tok, tmp_path).encode(held_out).ids


@pytest.fixture(scope="module", params=[True, False], ids=["full-alphabet", "seen-bytes-only"])
def hf_trained(request, tmp_path_factory) -> tuple[BPETokenizer, Tokenizer]:
    """A ByteLevel BPE trained by tokenizers itself, and ours loading its tokenizer.json."""
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if request.param else []
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=[EOT, "<pad>"], initial_alphabet=alphabet
    )
    hf.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    hf.save(str(path))
    return BPETokenizer.load(path), Tokenizer.from_file(str(path))


@settings(max_examples=150, deadline=None)
@given(ASSIGNED_TEXT)
def test_load_tokenizers_trained_file(hf_trained, text):
    ours, hf = hf_trained
    text = text + "<pad>" + HELD_OUT[:300]
    ids = ours.encode(text)
    assert ids == hf.encode(text).ids
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert ours.vocab_size == hf.get_vocab_size()


def test_training_is_deterministic_across_hash_seeds(tmp_path):
    # A child with another string-hash seed must learn the same thing: no set or dict order leaks.
    (tmp_path / "corpus.json").write_text(json.dumps(CORPUS))
    code = "import json, sys\nfrom tunelab.tokenizer.bpe import BPETokenizer\n"
    code += "texts = json.load(open(sys.argv[1]))\nBPETokenizer.train(texts, 500).save(sys.argv[2])"
    args = [sys.executable, "-c", code, str(tmp_path / "corpus.json"), str(tmp_path / "child")]
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    subprocess.run(args, env=os.environ | {"PYTHONHASHSEED": seed}, check=True)
    first, second = BPETokenizer.train(CORPUS, 500), BPETokenizer.train(CORPUS, 500)
    assert first.merges == second.merges and first.encoder == second.encoder
    saved = first.save(tmp_path / "here").read_text()
    assert (tmp_path / "child" / "tokenizer.json").read_text() == saved


def test_ties_go_to_the_pair_whose_bytes_sort_first():
    # "ab cd" pre-tokenises to "ab", " cd": three pairs seen once each; b" " sorts before b"a".
    assert BPETokenizer.train(["ab cd"], 258, special_tokens=()).merges == [
        ("Ġ", "c"),
        ("Ġc", "d"),
    ]
    # Frequency wins over byte order: "zz" occurs twice.
    assert BPETokenizer.train(["zz zz ab"], 257, special_tokens=()).merges == [("z", "z")]


def test_special_tokens_are_atomic(small, small_hf):
    eot = small.token_to_id(EOT)
    assert small.encode(EOT) == [eot] and small.id_to_token(eot) == EOT
    assert small.encode(f"ab{EOT}cd") == small.encode("ab") + [eot] + small.encode("cd")
    # The corpus is full of EOT, yet training never learned pieces of it.
    plain = [small.id_to_token(i) for i in range(small.vocab_size) if i != eot]
    assert not any("endoftext" in t or "<|" in t for t in plain)
    assert small.decode(small.encode(f"x{EOT}y"), skip_special_tokens=True) == "xy"


def test_overlapping_special_tokens_match_longest_first(tmp_path):
    tok = BPETokenizer.train(CORPUS[:200], 400, special_tokens=["<s>", "<s></s>", "</s>"])
    text = "x<s></s>y<s> </s><s></s></s>"
    ids = tok.encode(text)
    assert ids[1] == tok.token_to_id("<s></s>")
    assert ids == hf_from(tok, tmp_path).encode(text).ids


@pytest.mark.parametrize("vocab_size", [257, 300, 1000])
def test_vocab_size_is_honoured(vocab_size, tmp_path):
    tok = BPETokenizer.train(CORPUS, vocab_size)
    assert tok.vocab_size == vocab_size
    assert sorted(tok.id_to_token(i) is not None for i in range(vocab_size)) == [True] * vocab_size
    assert all(tok.token_to_id(BYTE_TO_CHAR[b]) == b for b in range(256))  # id b is byte b
    assert hf_from(tok, tmp_path).get_vocab_size() == vocab_size


def test_training_stops_when_no_pair_is_left():
    tok = BPETokenizer.train(["ab"], 1000)
    assert (tok.vocab_size, tok.merges) == (258, [("a", "b")])


@pytest.mark.parametrize("texts", [[], [""], iter([]), [EOT, EOT + EOT]])
def test_empty_input_raises(texts):
    with pytest.raises(DataError):
        BPETokenizer.train(texts, 300)


def test_bad_vocab_size_raises():
    with pytest.raises(ConfigError):
        BPETokenizer.train(CORPUS, 256)  # no room left for the special token


def test_decode_replaces_broken_utf8_and_rejects_unknown_ids(small, small_hf):
    assert small.decode([0xE6, 0xBC]) == small_hf.decode([0xE6, 0xBC]) == "\ufffd"
    with pytest.raises(DataError):
        small.decode([small.vocab_size + 5])


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["model"].update(type="WordPiece"),
        lambda d: d.update(normalizer={"type": "NFC"}),
        lambda d: d.update(pre_tokenizer={"type": "Whitespace"}),
        lambda d: d["added_tokens"][0].update(lstrip=True),
        lambda d: d["model"]["merges"].append("a b c"),
    ],
    ids=["wordpiece", "normalizer", "whitespace", "lstrip", "bad-merge"],
)
def test_load_rejects_what_it_cannot_reproduce(small, tmp_path, change):
    data = json.loads(small.save(tmp_path).read_text())
    change(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError):
        BPETokenizer.load(tmp_path)


def test_load_missing_or_broken_file_raises(tmp_path):
    with pytest.raises(ModelError):
        BPETokenizer.load(tmp_path / "nothing.json")
    for broken in ("{not json", "[1, 2]"):
        (tmp_path / "tokenizer.json").write_text(broken)
        with pytest.raises(ModelError):
            BPETokenizer.load(tmp_path)
