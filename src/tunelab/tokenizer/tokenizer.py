"""The tokenizer every command uses: tokenizer.json through the `tokenizers` library,
plus the special tokens and chat template kept beside it."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from tunelab.errors import ModelError
from tunelab.tokenizer.chat import CHATML, render_chat

_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "cls_token",
    "sep_token",
    "mask_token",
)


def _token_str(value) -> str | None:
    """tokenizer_config.json writes a token either as a string or as {'content': ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Encode/decode text and render chat; ids match transformers' tokenizer on the same files."""

    def __init__(self, backend: _HFTokenizer, config: dict | None = None):
        self.backend = backend
        # tokenizer.json may carry fixed padding/truncation settings; batching is ours to do.
        self.backend.no_padding()
        self.backend.no_truncation()
        self.config = dict(config or {})
        self.special = {k: _token_str(self.config.get(k)) for k in _SPECIAL_KEYS}
        self.chat_template = self.config.get("chat_template")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise ModelError(f"{path}: no tokenizer.json (tunelab reads fast-tokenizer files only)")
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise ModelError(f"{file}: cannot read tokenizer: {str(e).splitlines()[0]}") from None
        config = {}
        if (path / "tokenizer_config.json").exists():
            config = json.loads((path / "tokenizer_config.json").read_text())
        if not config.get("chat_template") and (path / "chat_template.jinja").exists():
            config["chat_template"] = (path / "chat_template.jinja").read_text()
        return cls(backend, config)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special["bos_token"])

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special["eos_token"])

    @property
    def pad_id(self) -> int | None:
        """The pad id, never confused with EOS when the model has a pad token of its own."""
        return self.token_id(self.special["pad_token"])

    @property
    def batch_pad_id(self) -> int:
        """What batches are padded with: the pad id, else EOS (labels are -100 there), else 0."""
        return self.pad_id if self.pad_id is not None else self.eos_id or 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [
            e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        ]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        tokens = {k: v for k, v in self.special.items() if v is not None}
        return render_chat(self.chat_template or CHATML, messages, add_generation_prompt, **tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation; the template writes BOS itself, so none is added twice."""
        return self.encode(
            self.render_chat(messages, add_generation_prompt), add_special_tokens=False
        )
