"""Sliding-window perplexity against the transformers docs' loop run with transformers models."""

import math

import pytest
import torch

from tunelab.errors import DataError, ModelError
from tunelab.evaluate.perplexity import perplexity, perplexity_of_ids, read_texts
from tunelab.model.checkpoint import load_model_dir

transformers = pytest.importorskip("transformers")

VOCAB = 96


def hf_sliding_window(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """(mean NLL, scored tokens): the loop of transformers' 'Perplexity of fixed-length models'.

    The docs weight each window's mean loss by `num_valid_tokens - batch_size`; that is the
    number of scored tokens only when a window's first label is not -100. We weight by the
    tokens the shifted loss really scored, which is what the docs mean to compute.
    """
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        trg_len = end - prev_end  # may differ from stride on the last loop
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())  # the model shifts labels inside
        if scored:
            nll_sum += loss.item() * scored
            n_tokens += scored
        prev_end = end
        if end == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


def _tiny(name, tmp_path):
    t = transformers
    cfgs = {
        "gpt2": (
            t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
            t.GPT2LMHeadModel,
        ),
        "llama": (
            t.LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=112,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
            ),
            t.LlamaForCausalLM,
        ),
        "mistral": (
            t.MistralConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=112,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                sliding_window=6,
            ),
            t.MistralForCausalLM,
        ),
    }
    cfg, cls = cfgs[name]
    torch.manual_seed(sum(map(ord, name)))
    hf = cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # a model further from uniform, so context matters
            p.mul_(3.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / name)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(
        str(tmp_path / name / "tokenizer.json")
    )
    ours, _ = load_model_dir(tmp_path / name)
    return hf, ours


# (window, stride): overlapping, uneven, stride == window, stride 1, and longer than the text
COMBOS = [(16, 8), (16, 5), (16, 16), (10, 1), (64, 32)]


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral"])
def test_matches_transformers_sliding_window(name, tmp_path):
    hf, ours = _tiny(name, tmp_path)
    ids = torch.randint(0, VOCAB, (1, 45), generator=torch.Generator().manual_seed(1))
    results = {}
    for window, stride in COMBOS:
        got = perplexity_of_ids(ours, ids[0].tolist(), window, stride)
        nll, n = hf_sliding_window(hf, ids, window, stride)
        # each token is scored once, but the first of a window that does not overlap is not
        first_of_window = math.ceil(45 / window) if stride == window else 1
        assert got["tokens"] == n == 45 - first_of_window
        assert got["nll"] == pytest.approx(nll, rel=1e-4)
        assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
        assert (got["window"], got["stride"]) == (window, stride)
        results[window, stride] = got["nll"]
    # context matters: windows that overlap less give a different number
    assert results[16, 16] != pytest.approx(results[64, 32], rel=1e-3)


def test_batching_windows_does_not_change_the_result(tmp_path):
    _, ours = _tiny("llama", tmp_path)
    ids = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    one = perplexity_of_ids(ours, ids, 12, 5, batch_size=1)
    many = perplexity_of_ids(ours, ids, 12, 5, batch_size=3)  # a last group with a short window
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-5)


@pytest.mark.parametrize("window,stride", [(16, 0), (16, 17), (16, -1)])
def test_bad_stride_is_a_data_error(window, stride, tmp_path):
    _, ours = _tiny("llama", tmp_path)
    with pytest.raises(DataError, match="stride"):
        perplexity_of_ids(ours, list(range(20)), window, stride)


def test_too_few_tokens_and_bad_window_are_data_errors(tmp_path):
    _, ours = _tiny("gpt2", tmp_path)
    with pytest.raises(DataError):
        perplexity_of_ids(ours, [5], 16, 8)
    with pytest.raises(DataError, match="window"):
        perplexity_of_ids(ours, list(range(20)), 1, 1)  # no window scores any token
    with pytest.raises(DataError, match="window"):
        perplexity_of_ids(ours, list(range(80)), 65, 32)  # past GPT-2's 64 learned positions


def test_encoders_are_refused():
    from tunelab.model.config import ModelConfig
    from tunelab.model.heads import build_model

    cfg = ModelConfig(family="bert", vocab_size=VOCAB, d_model=32, d_ff=64, causal=False)
    with pytest.raises(ModelError):
        perplexity_of_ids(build_model(cfg), list(range(20)), 8, 4)


def test_read_texts(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "skip.json").write_text("{}")
    assert read_texts([tmp_path]) == "first\n\nsecond"
    with pytest.raises(DataError, match="no such file"):
        read_texts([tmp_path / "missing.txt"])
    (tmp_path / "bad.txt").write_bytes(b"ok\nline two \xff\n")
    with pytest.raises(DataError, match="bad.txt:2"):
        read_texts([tmp_path / "bad.txt"])


TEXT = (
    "The quick brown fox jumps over the lazy dog. Perplexity measures how well a language "
    "model predicts a text: the exponent of the mean negative log-likelihood per token. "
    "Paris is the capital of France, and Berlin is the capital of Germany."
)


@pytest.mark.slow
def test_smollm2_matches_transformers():
    import tunelab

    try:
        lm = tunelab.load("smollm2-135m-instruct")
    except ModelError as e:
        pytest.skip(f"SmolLM2 not available: {e}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(lm.path)
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert lm.tokenizer.encode(TEXT) == ids[0].tolist()
    for window, stride in [(32, 16), (24, 24), (256, 128)]:
        got = lm.perplexity(TEXT, window=window, stride=stride)
        nll, n = hf_sliding_window(hf, ids, window, stride)
        assert got["tokens"] == n
        assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert 1 < got["perplexity"] < 200  # a real model finds real text predictable
    assert perplexity(lm.model, lm.tokenizer, TEXT)["window"] == 1024  # default window
