"""Preference losses against TRL's formulas, and a pair scored in one row against scoring
each sequence alone."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.preference import collate_pairs, pair_logps
from tunelab.model.config import ModelConfig
from tunelab.model.heads import build_model
from tunelab.train.objectives import preference_loss

# ---- losses: TRL's documented formulas, written out, on fresh random log-probs ----------------


def _pairs(seed: int, b: int = 8):
    """Summed response log-probs (policy, reference; chosen row 0, rejected row 1) and
    response lengths for b pairs; margins reach both sides of the hinge's kink."""
    g = torch.Generator().manual_seed(seed)
    policy = (-30 * torch.rand(2, b, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -30 * torch.rand(2, b, generator=g, dtype=torch.float64)
    return policy, ref, torch.randint(1, 30, (2, b), generator=g)


def _documented(name, beta, eps, policy, ref, tokens):
    """TRL's DPO losses as its documentation states them, per pair. With h the log-ratio
    margin (pc - rc) - (pr - rr): sigmoid -logsigmoid(beta h), with label smoothing eps the
    conservative -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h); hinge relu(1 - beta h);
    IPO (h' - 1/(2 beta))^2, h' from log-probs averaged over each response's tokens."""
    (pc, pr), (rc, rr) = policy, ref
    if name == "ipo":
        h = (pc - rc) / tokens[0] - (pr - rr) / tokens[1]
        return (h - 1 / (2 * beta)) ** 2
    h = (pc - rc) - (pr - rr)
    if name == "hinge":
        return torch.relu(1 - beta * h)
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _ours(name, beta, eps, policy, ref, tokens):
    return preference_loss(
        name,
        policy[0],
        policy[1],
        ref[0],
        ref[1],
        beta=beta,
        label_smoothing=eps,
        chosen_tokens=tokens[0],
        rejected_tokens=tokens[1],
    )


LOSSES = [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0), ("hinge", 0.0)]


@pytest.mark.parametrize("name,eps", LOSSES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_and_gradients_match_trls_documented_formulas(name, eps, beta):
    policy, ref, tokens = _pairs(seed=LOSSES.index((name, eps)) + int(beta * 10))
    ours, theirs = (f(name, beta, eps, policy, ref, tokens) for f in (_ours, _documented))
    assert ours.shape == theirs.shape == (8,)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    if name == "hinge":  # both sides of the kink: some pairs past the margin, some not
        assert 0 < int((theirs == 0).sum()) < len(theirs)
    (g_ours,) = torch.autograd.grad(ours.sum(), policy)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), policy)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,eps", LOSSES)
def test_losses_match_trls_public_cpo_loss_fed_log_ratios(name, eps):
    """CPOTrainer.cpo_loss is DPO without a reference: given the log-ratios instead of the
    log-probs, its sigmoid (with label smoothing), hinge and IPO losses are DPO's."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    beta = 0.3
    policy, ref, tokens = _pairs(seed=10 + LOSSES.index((name, eps)))
    chosen, rejected = policy[0] - ref[0], policy[1] - ref[1]
    if name == "ipo":  # TRL's DPO averages IPO's log-probs over tokens; CPO leaves that to us
        chosen, rejected = chosen / tokens[0], rejected / tokens[1]
    trainer = SimpleNamespace(
        alpha=0.0,
        accelerator=SimpleNamespace(device="cpu"),
        beta=beta,
        loss_type={"dpo": "sigmoid"}.get(name, name),
        label_smoothing=eps,
    )
    theirs = cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)[0]
    assert torch.allclose(_ours(name, beta, eps, policy, ref, tokens), theirs, rtol=1e-12, atol=0)


# ---- scoring pairs: one row per pair equals scoring each sequence alone ----------------------


FAMILIES = {
    "llama": dict(family="llama", n_kv_head=2),
    "gpt2": dict(family="gpt2", pos="learned", norm="layernorm", mlp="gelu", act="gelu_tanh",
                 qkv_bias=True, tie_embeddings=True),
    "mistral": dict(family="mistral", n_kv_head=2, sliding_window=5),
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pair_logps_equal_hand_computation(family):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            vocab_size=50,
            n_layer=2,
            n_head=4,
            d_model=32,
            d_ff=64,
            max_seq_len=64,
            **FAMILIES[family],
        )
    ).eval()
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, 50, (n,), generator=g).tolist()  # noqa: E731
    pairs = [
        {"prompt": ids(p), "chosen": ids(c), "rejected": ids(r)}
        for p, c, r in ((5, 3, 6), (1, 4, 1), (9, 2, 2))
    ]
    with torch.no_grad():
        chosen, rejected = pair_logps(model, collate_pairs(pairs, pad_id=0))
        for i, pair in enumerate(pairs):
            for side, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
                seq = pair["prompt"] + pair[side]
                logp = torch.log_softmax(model(torch.tensor([seq])).float(), -1)[0]
                # every response token, the last (EOS) included; no prompt token
                hand = sum(float(logp[j - 1, seq[j]]) for j in range(len(pair["prompt"]), len(seq)))
                assert abs(float(got) - hand) < 1e-4, (family, i, side)
