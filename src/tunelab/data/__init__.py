"""The data pipeline: files -> records (load) -> token examples (templates) -> batches."""

from tunelab.data.batching import (
    Batches,
    cache_path,
    cached_encode,
    collate,
    file_fingerprint,
    pack,
    tokenizer_fingerprint,
)
from tunelab.data.load import load_records, load_split, require_fields, split_records, where
from tunelab.data.templates import (
    IGNORE,
    EncodeStats,
    chat_example,
    detect_kind,
    encode_chats,
    encode_instructions,
    encode_records,
    encode_texts,
)

__all__ = [
    "IGNORE",
    "Batches",
    "EncodeStats",
    "cache_path",
    "cached_encode",
    "chat_example",
    "collate",
    "detect_kind",
    "encode_chats",
    "encode_instructions",
    "encode_records",
    "encode_texts",
    "file_fingerprint",
    "load_records",
    "load_split",
    "pack",
    "require_fields",
    "split_records",
    "tokenizer_fingerprint",
    "where",
]
