"""Generation against transformers: greedy tokens, batched rows, bf16, the decoding kernels, the
embedded SmolLM2 (sampling, stops and EOS: test_sampling.py)."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.generate import Sampling, generate_ids
from tunelab.model.checkpoint import load_model_dir
from tunelab.model.transformer import KVCache

transformers = pytest.importorskip("transformers")

VOCAB = 96
PROMPTS = [[5, 17, 33, 2, 71, 9, 40], [12, 88], [60, 3, 3, 45, 90]]  # different lengths


def _configs():
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    t = transformers
    return {
        "gpt2": (
            t.GPT2Config(
                vocab_size=VOCAB,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=128,
                bos_token_id=None,
                eos_token_id=None,
                pad_token_id=0,
            ),
            t.GPT2LMHeadModel,
        ),
        "llama": (
            t.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False),
            t.LlamaForCausalLM,
        ),
        "mistral": (
            t.MistralConfig(**common, num_key_value_heads=2, sliding_window=8),
            t.MistralForCausalLM,
        ),
        "qwen2": (
            t.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
            t.Qwen2ForCausalLM,
        ),
        "gemma": (t.GemmaConfig(**common, num_key_value_heads=1, head_dim=32), t.GemmaForCausalLM),
    }


FAMILIES = list(_configs())


def _tiny(name, tmp_path, peaky=True):
    """A random HF model, its directory and ours loaded from it (logits scaled: no argmax ties)."""
    cfg, cls = _configs()[name]
    torch.manual_seed(sum(map(ord, name)))
    hf = cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:  # randomise norms and biases too, so a mis-mapped one shows
                p.add_(torch.randn_like(p) * 0.1)
        if peaky:
            hf.get_output_embeddings().weight.mul_(8.0)
    hf.generation_config.eos_token_id = None  # never stop early: both make max_new_tokens
    hf.generation_config.pad_token_id = 0
    hf.generation_config.bos_token_id = None
    path = tmp_path / name
    hf.save_pretrained(path)
    _word_tokenizer().save(str(path / "tokenizer.json"))
    ours, tokenizer = load_model_dir(path)
    return hf, ours, tokenizer


def _word_tokenizer():
    """Token i is the word 'wNNN': decode is plain words, so stop strings are easy to place."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i:03d}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w000"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _hf_greedy(hf, prompts, new):
    """transformers' greedy tokens for left-padded prompts (pad 0, attention mask)."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0
        )
    assert out.shape[1] == width + new  # no early stop: a fair comparison
    return out[:, width:].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_matches_transformers(name, tmp_path):
    hf, ours, _ = _tiny(name, tmp_path)
    new = 20  # past mistral's sliding window of 8, so the window is exercised while decoding
    for prompts in (PROMPTS[:1], PROMPTS):
        got = generate_ids(ours, prompts, Sampling(max_new_tokens=new), eos_ids=set(), pad_id=0)
        want = _hf_greedy(hf, prompts, new)
        assert got == want, f"{name}, batch {len(prompts)}"
        assert len({tuple(r) for r in got}) == len(got)  # rows differ: not a degenerate model


def test_batched_rows_equal_single_rows(tmp_path):
    _, ours, _ = _tiny("llama", tmp_path)
    s = Sampling(max_new_tokens=12)
    batched = generate_ids(ours, PROMPTS, s, eos_ids=set(), pad_id=0)
    assert batched == [generate_ids(ours, [p], s, eos_ids=set(), pad_id=0)[0] for p in PROMPTS]


def test_bf16_decoding_keeps_an_fp32_cache_and_follows_the_full_forward(tmp_path, monkeypatch):
    """bf16 on CPU: keys and values are cached in fp32 (attention runs in fp32); greedy tokens
    equal those of re-running the whole bf16 sequence each step, with attention in bf16."""
    from tunelab import generate as gen

    _, ours, _ = _tiny("llama", tmp_path)
    ours = ours.to(torch.bfloat16)
    made = []
    monkeypatch.setattr(gen, "KVCache", lambda *a: made.append(a[-1]) or KVCache(*a))
    got = generate_ids(ours, PROMPTS[:1], Sampling(max_new_tokens=6), eos_ids=set(), pad_id=0)
    assert made == [torch.float32]
    seq = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(ours(torch.tensor([seq]))[0, -1].argmax()))
    assert got[0] == seq[len(PROMPTS[0]) :]


@pytest.mark.parametrize("kind", ["packed+fused", "onednn+fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_computes_the_same_and_leaves_the_model_alone(tmp_path, dtype, kind):
    """Decoding runs the linears on oneDNN (reordered copies, or siblings joined as they are)
    where the model was prepared so and the CPU has the kernels: same outputs as F.linear, the
    model's weights untouched, nothing held after."""
    from tunelab.runtime.kernels import decode_kernel, decoding, onednn_works, prepare_linears

    _, ours, _ = _tiny("llama", tmp_path)
    ours = ours.to(dtype)
    if not onednn_works(dtype):
        pytest.skip("no oneDNN linear in this torch build")
    prepare_linears(ours, {"decode-fp32": kind, "decode-bf16": kind})
    alone = kind.removesuffix("+fused")  # the head has no sibling
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    layer = ours.transformer.layers[0].mlp.up_proj
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for rows in (1, 2):
        with torch.inference_mode(), decoding(ours, rows=rows):
            assert decode_kernel(layer) == kind and decode_kernel(ours.lm_head) == alone
            mlp = ours.transformer.layers[0].mlp  # gate and up run as one product
            for shape in ((rows, 1, 64), (3, 5, 64)):  # the decoding rows, and the prefill
                x = torch.randn(shape, dtype=dtype)
                for m in (mlp.gate_proj, mlp.up_proj, mlp.up_proj, mlp.gate_proj):
                    want = F.linear(x, m.weight)
                    torch.testing.assert_close(m(x), want, atol=tol, rtol=tol)
        assert layer.decoder is None and ours.lm_head.decoder is None
    generate_ids(ours, PROMPTS, Sampling(max_new_tokens=3), eos_ids=set(), pad_id=0)
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_decoding_leaves_big_models_and_own_forwards_alone(tmp_path, monkeypatch):
    from tunelab.runtime import kernels

    if not kernels.onednn_works(torch.float32):
        pytest.skip("no oneDNN linear in this torch build")
    _, ours, _ = _tiny("llama", tmp_path)
    layer, head = ours.transformer.layers[0].mlp.up_proj, ours.lm_head

    def own(x):  # a forward someone else set stays theirs: the layer is not prepared
        return F.linear(x, head.weight)

    head.forward = own
    kernels.prepare_linears(ours, {"decode-fp32": "packed"})
    layer = ours.transformer.layers[0].mlp.up_proj
    assert vars(ours.lm_head)["forward"] is own and isinstance(layer, kernels.FastLinear)
    monkeypatch.setattr(kernels, "free_memory", lambda: 1000.0)  # the copies would not fit
    with kernels.decoding(ours, rows=8):
        assert kernels.decode_kernel(layer) == "torch"
    monkeypatch.undo()
    with kernels.decoding(ours, rows=8):
        assert kernels.decode_kernel(layer) == "packed" and kernels.decode_kernel(head) == "other"
    assert vars(head)["forward"] is own and layer.decoder is None


CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
]


@pytest.fixture(scope="module")
def smollm2():
    import tunelab
    from tunelab.errors import ModelError

    try:
        lm = tunelab.load("smollm2-135m-instruct")
    except ModelError as e:
        pytest.skip(f"SmolLM2 not available: {e}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    tok = transformers.AutoTokenizer.from_pretrained(lm.path)
    return lm, hf, tok


def _hf_chat_ids(tok, content):
    ids = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(smollm2):
    lm, _, tok = smollm2
    for content in CHATS + ["", "Ünïcødé 🙂 and\nnew lines"]:
        ours = lm.tokenizer.apply_chat_template([{"role": "user", "content": content}])
        assert ours == _hf_chat_ids(tok, content)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert lm.tokenizer.apply_chat_template(system) == list(
        tok.apply_chat_template(
            system, tokenize=True, add_generation_prompt=True, return_dict=False
        )
    )


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2):
    lm, hf, tok = smollm2
    prompts = [_hf_chat_ids(tok, c) for c in CHATS]
    for batch in (prompts[:1], prompts):
        got = generate_ids(lm.model, batch, Sampling(max_new_tokens=32), eos_ids=set(), pad_id=0)
        assert got == _hf_greedy(hf, batch, 32), f"batch {len(batch)}"
    text = lm.generate(CHATS[0], chat=True, max_new_tokens=12)
    assert "Paris" in text


def test_responses_reorder_the_weights_once_for_all_their_batches(tmp_path, monkeypatch):
    """IFEval-style generation runs many batches under one `decoding`: the reordered copies
    are made once (150 ms a batch for SmolLM2 before), the inner generate calls reuse them,
    the answers are those of separate calls, and nothing is held after."""
    from tunelab.evaluate.instructions import generate_responses
    from tunelab.runtime import kernels

    if not kernels.onednn_works(torch.float32):
        pytest.skip("no oneDNN linear in this torch build")
    _, ours, tok = _tiny("llama", tmp_path)
    kernels.prepare_linears(ours, {"decode-fp32": "packed"})
    # no chat template in the tiny tokenizer: the user turn's words are the prompt
    monkeypatch.setattr(tok, "apply_chat_template", lambda turns: tok.encode(turns[0]["content"]))
    calls = []
    real = kernels.reorder
    monkeypatch.setattr(kernels, "reorder", lambda w, rows: calls.append(rows) or real(w, rows))
    prompts = ["w005 w017", "w012 w088 w003", "w060", "w003 w045 w090 w009", "w071"]
    s = Sampling(max_new_tokens=4)
    texts, _ = generate_responses(ours, tok, prompts, s, batch_size=2)
    per_layer = sum(isinstance(m, kernels.FastLinear) for m in ours.modules())
    assert len(calls) == per_layer  # one copy per layer for the 3 batches
    for p, t in zip(prompts, texts):
        alone, _ = generate_responses(ours, tok, [p], s, batch_size=1)
        assert alone == [t]
    assert all(m.decoder is None for m in ours.modules() if isinstance(m, kernels.FastLinear))
