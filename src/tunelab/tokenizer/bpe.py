"""Byte-level BPE like GPT-2's: train, encode, decode, and read/write HF `tokenizer.json`."""

from __future__ import annotations

import heapq
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from tunelab.errors import ConfigError, DataError, ModelError

# GPT-2's pre-tokenisation: contractions, letter runs, digit runs, other symbols, whitespace.
# Merges never cross these boundaries, so " the" and "the." are learned as separate pieces.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Unicode White_Space, which is what `\s` means to `regex` and to tokenizers' Oniguruma;
# Python's own `re` also counts \x1c-\x1f as space, so the fallback spells the set out.
_WHITE_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _category_class(prefix: str) -> str:
    """Body of a `re` character class holding every code point whose category starts with prefix."""
    ranges: list[str] = []
    start = None
    for cp in range(0x110001):
        inside = cp < 0x110000 and unicodedata.category(chr(cp)).startswith(prefix)
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    return "".join(ranges)


def fallback_split_pattern() -> re.Pattern[str]:
    """GPT2_SPLIT for the standard `re` module, with \\p{L}, \\p{N} and \\s expanded by hand."""
    letters, numbers, space = _category_class("L"), _category_class("N"), _WHITE_SPACE
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"
        rf"|[{space}]+(?![^{space}])|[{space}]+"
    )


try:  # `regex` knows \p{...}; it is not a tunelab dependency, so fall back to plain `re`.
    import regex

    SPLIT_PATTERN = regex.compile(GPT2_SPLIT)
except ImportError:  # pragma: no cover - exercised directly by the tests via the function
    SPLIT_PATTERN = fallback_split_pattern()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to one printable character, so every token is a visible string."""
    # Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP, ...)
    # are moved to U+0100 and up, which is why a leading space shows up as "Ġ".
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# Settings that change which ids come out and that this copy does not implement.
_UNSUPPORTED_MODEL_KEYS = ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk")
_UNSUPPORTED_MODEL_KEYS += ("byte_fallback", "ignore_merges")
_STRIP_KEYS = ("lstrip", "rstrip", "single_word")
_NO_STRIP = dict.fromkeys(_STRIP_KEYS, False) | {"normalized": False}
_CACHE_LIMIT = 200_000  # words; bounds the encode cache's memory on endless streams of new words


def _spell(data: bytes) -> str:
    """Byte-level spelling of some bytes: one printable character per byte."""
    return "".join(BYTE_TO_CHAR[b] for b in data)


def _special_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """A splitter that captures special tokens, longest first (tokenizers matches leftmost-longest)."""
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None


def _merge(seq: list[int], a: int, b: int, new: int) -> list[int]:
    """seq with every non-overlapping (a, b), left to right, replaced by new."""
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


class BPETokenizer:
    """GPT-2 pre-tokenisation, then merges applied by rank; special tokens are matched whole."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        special_tokens: dict[str, int] | None = None,
        *,
        add_prefix_space: bool = False,
        unk_token: str | None = None,
    ) -> None:
        self.special_tokens = dict(special_tokens or {})
        self.encoder = dict(vocab) | self.special_tokens  # token string -> id
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.merges = [tuple(m) for m in merges]
        # A repeated pair keeps its last rank: tokenizers builds its merge map the same way.
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        for a, b in self.merges:
            if a + b not in self.encoder:
                raise ModelError(f"merge {a!r} + {b!r} makes {a + b!r}, which is not in the vocab")
        self.add_prefix_space = add_prefix_space  # GPT-2 style files leave this off
        self.unk_token = unk_token
        self._special_ids = set(self.special_tokens.values())
        self._special_re = _special_pattern(self.special_tokens)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids, special tokens included."""
        return len(self.decoder)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token in its byte-level spelling (" the" is "Ġthe"), or None."""
        return self.encoder.get(token)

    def id_to_token(self, id: int) -> str | None:
        """Byte-level spelling of the token with this id, or None."""
        return self.decoder.get(id)

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token given as byte-level characters, merging the best pair each step."""
        # Characters missing from the vocab become unk, or vanish when there is none (as in HF).
        parts = [c if c in self.encoder else self.unk_token for c in word]
        parts = [p for p in parts if p is not None]
        no_merge = len(self.ranks)
        while len(parts) > 1:
            # Lowest rank first, leftmost on ties: exactly the order of tokenizers' BPE model.
            pairs = zip(parts, parts[1:])
            rank, i = min((self.ranks.get(pair, no_merge), i) for i, pair in enumerate(pairs))
            if rank == no_merge:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [self.encoder[p] for p in parts]

    def _word_ids(self, word: str) -> list[int]:
        """Ids of one pre-token word, cached: real text repeats a few thousand words endlessly."""
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            ids = self._bpe(_spell(word.encode("utf-8")))
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids for text; special tokens are single ids and never split or merged."""
        ids: list[int] = []
        # With a capturing group, split() puts plain text at even indices and specials at odd.
        chunks = self._special_re.split(text) if self._special_re else [text]
        for n, chunk in enumerate(chunks):
            if n % 2:
                ids.append(self.special_tokens[chunk])
                continue
            if self.add_prefix_space and chunk and not chunk.startswith(" "):
                chunk = " " + chunk
            for word in SPLIT_PATTERN.findall(chunk):
                ids.extend(self._word_ids(word))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ids; byte sequences that are not valid UTF-8 become U+FFFD."""
        out = bytearray()
        for i in ids:
            token = self.decoder.get(i)
            if token is None:
                raise DataError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
            if i in self._special_ids:
                out += b"" if skip_special_tokens else token.encode("utf-8")
            elif all(c in CHAR_TO_BYTE for c in token):
                out += bytes(CHAR_TO_BYTE[c] for c in token)
            else:  # not a byte-level spelling (e.g. "<unk>"): its text as is, like HF's decoder
                out += token.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
    ) -> BPETokenizer:
        """Learn merges until vocab_size ids (256 bytes + merges + specials) or no pair is left."""
        specials = list(dict.fromkeys(special_tokens))
        if any(not s for s in specials):
            raise ConfigError("special tokens must be non-empty strings")
        if vocab_size < 256 + len(specials):
            raise ConfigError(f"vocab_size {vocab_size} < 256 bytes + {len(specials)} specials")
        if isinstance(texts, str):  # a lone string would otherwise be iterated char by char
            texts = [texts]
        splitter = _special_pattern(specials)
        words: Counter[str] = Counter()
        for text in texts:  # special tokens are cut out first, so merges never reach into them
            for chunk in splitter.split(text)[::2] if splitter else [text]:
                words.update(SPLIT_PATTERN.findall(chunk))
        if not words:
            raise DataError("no text to train on: the input is empty or only special tokens")

        # Work on ints: id b is byte b, and each new token takes the next id.
        vocab = [bytes([b]) for b in range(256)]
        id_of = {t: i for i, t in enumerate(vocab)}
        seqs = [list(w.encode("utf-8")) for w in words]
        freqs = list(words.values())
        counts: Counter[tuple[int, int]] = Counter()
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> word indices
        for i, seq in enumerate(seqs):
            for pair in zip(seq, seq[1:]):
                counts[pair] += freqs[i]
                where[pair].add(i)

        # Each step merges the most frequent pair; ties go to the pair whose tokens' bytes sort
        # first, so the result depends only on the text, never on dict or set order.
        def entry(pair: tuple[int, int], count: int) -> tuple:
            return (-count, vocab[pair[0]], vocab[pair[1]], pair)  # heapq pops the smallest

        heap = [entry(p, c) for p, c in counts.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while heap and len(vocab) < vocab_size - len(specials):
            neg, _, _, pair = heapq.heappop(heap)
            if counts.get(pair, 0) != -neg:  # stale: the count fell since this was pushed
                if counts.get(pair, 0) > 0:
                    heapq.heappush(heap, entry(pair, counts[pair]))
                continue
            token = vocab[pair[0]] + vocab[pair[1]]
            new = id_of.get(token)  # two merges can spell the same bytes; they share one id
            if new is None:
                new = id_of[token] = len(vocab)
                vocab.append(token)
            merges.append(pair)
            # Recount only the words holding the pair: the step that makes training fast.
            delta: Counter[tuple[int, int]] = Counter()
            for i in where.pop(pair):
                seq = seqs[i]
                merged = _merge(seq, *pair, new)
                if len(merged) == len(seq):  # stale index: an earlier merge took the pair away
                    continue
                for p in zip(seq, seq[1:]):
                    delta[p] -= freqs[i]
                for p in zip(merged, merged[1:]):
                    delta[p] += freqs[i]
                    where[p].add(i)
                seqs[i] = merged
            for p, d in delta.items():
                counts[p] += d
                if counts[p] <= 0:
                    del counts[p]
                elif d > 0:  # counts that fell are fixed lazily when popped; risen ones need a push
                    heapq.heappush(heap, entry(p, counts[p]))

        str_vocab = {_spell(t): i for i, t in enumerate(vocab)}
        for s in specials:
            if s in str_vocab:
                raise ConfigError(f"special token {s!r} is also a plain token; try <|{s}|>")
        str_merges = [(_spell(vocab[a]), _spell(vocab[b])) for a, b in merges]
        return cls(str_vocab, str_merges, {s: len(vocab) + n for n, s in enumerate(specials)})

    def save(self, directory: str | Path) -> Path:
        """Write directory/tokenizer.json in the Hugging Face tokenizers format; return its path."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        byte_level = {
            "type": "ByteLevel",
            "add_prefix_space": self.add_prefix_space,
            "trim_offsets": True,
            "use_regex": True,
        }
        specials = sorted(self.special_tokens.items(), key=lambda kv: kv[1])
        added = [{"id": i, "content": t, "special": True} | _NO_STRIP for t, i in specials]
        data = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": byte_level | {"trim_offsets": False},
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": self.unk_token,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": dict(sorted(self.encoder.items(), key=lambda kv: kv[1])),
                # "a b" strings, not pairs: every tokenizers version reads them, and byte-level
                # tokens never hold a space (it is spelled "Ġ"), so the split is unambiguous.
                "merges": [f"{a} {b}" for a, b in self.merges],
            },
        }
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a byte-level BPE tokenizer.json (ours, GPT-2's, or one trained by tokenizers)."""
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{path}: not found; pass a tokenizer.json or its directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{path}: not a readable tokenizer.json ({e})") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: not a tokenizer.json (the top level is not an object)")
        model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
        if model.get("type", "BPE" if "merges" in model else None) != "BPE":
            raise ModelError(f"{path}: model type {model.get('type')!r} is not BPE")
        if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
            raise ModelError(f"{path}: only the GPT-2 ByteLevel pre-tokenizer is supported")
        added_tokens = data.get("added_tokens") or []
        bad = [f"model.{k}" for k in _UNSUPPORTED_MODEL_KEYS if model.get(k)]
        bad += ["normalizer"] if data.get("normalizer") else []
        bad += [f"{k} on {t['content']!r}" for t in added_tokens for k in _STRIP_KEYS if t.get(k)]
        if bad:
            raise ModelError(f"{path}: unsupported tokenizer.json setting {bad[0]}")
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
        if any(len(m) != 2 for m in merges):
            raise ModelError(f"{path}: a merge is not two tokens separated by one space")
        added = {t["content"]: t["id"] for t in added_tokens}
        return cls(
            model.get("vocab", {}),
            [tuple(m) for m in merges],
            added,
            add_prefix_space=bool(pre.get("add_prefix_space", False)),
            unk_token=model.get("unk_token"),
        )
