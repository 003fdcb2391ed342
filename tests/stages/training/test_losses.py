"""Losses against hand-computed values, and against TRL's SimPO (CPO) code where TRL is installed."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from stages.training.losses import IGNORE_INDEX, mergemix_loss, mixed_simpo_loss, sequence_logps, sft_loss

LN = math.log


def hand_batch():
    """One sample, 5 positions, vocabulary 3. Labels: prompt, answer 2, answer 0, padding.
    Position 0 predicts label 1 with p(2) = 2/4; position 1 predicts label 2 with p(0) = 3/5.
    Positions 2-4 carry huge logits that must not count (no label follows them)."""
    logits = torch.tensor(
        [[[0.0, 0.0, LN(2)], [LN(3), 0.0, 0.0], [50.0, -50.0, 0.0], [0.0, 50.0, 0.0], [9.0, 9.0, -9.0]]]
    )
    labels = torch.tensor([[IGNORE_INDEX, 2, 0, IGNORE_INDEX, IGNORE_INDEX]])
    return logits, labels


def test_sequence_logps_hand_values_and_shift():
    logits, labels = hand_batch()
    out = sequence_logps(logits, labels)
    expected = LN(0.5) + LN(0.6)
    assert out.tokens.tolist() == [2]
    assert out.total.item() == pytest.approx(expected, abs=1e-6)
    assert out.mean.item() == pytest.approx(expected / 2, abs=1e-6)


def test_sequence_logps_uniform_logits_and_empty_answer():
    logits = torch.zeros(2, 6, 7)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 2:5] = torch.tensor([1, 4, 6])  # three answer tokens
    out = sequence_logps(logits, labels)
    assert out.tokens.tolist() == [3, 0]
    assert out.total[0].item() == pytest.approx(-3 * LN(7), abs=1e-5)
    assert out.mean[0].item() == pytest.approx(-LN(7), abs=1e-6)
    assert out.mean[1].item() == 0.0 and out.total[1].item() == 0.0  # no answer: no NaN


def test_sequence_logps_rejects_misaligned_shapes():
    with pytest.raises(ValueError):
        sequence_logps(torch.zeros(1, 5, 3), torch.zeros(1, 4, dtype=torch.long))


def test_sft_loss_is_token_mean_cross_entropy():
    logits, labels = hand_batch()
    assert sft_loss(logits, labels).item() == pytest.approx(-(LN(0.5) + LN(0.6)) / 2, abs=1e-6)
    # Token mean over the batch: one sample with 1 token and one with 3 tokens weigh 1:3.
    logits = torch.zeros(2, 5, 4)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1] = 0
    labels[1, 1:4] = 0
    logits[0, 0, 0] = 5.0  # the lone token of sample 0 is confident
    lp0 = 5.0 - LN(math.exp(5.0) + 3)
    expected = -(lp0 + 3 * -LN(4)) / 4
    assert sft_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_mixed_simpo_hand_values():
    w = torch.tensor([-1.0, -3.0, -0.5])
    l = torch.tensor([-2.0, -1.0, -0.5])
    gamma = torch.tensor([0.5, 0.0, 1.0])
    losses, chosen, rejected = mixed_simpo_loss(w, l, gamma)
    # -log sigmoid(x) = log(1 + exp(-x)) with x = (w - l) - gamma
    expected = [LN(1 + math.exp(-0.5)), LN(1 + math.exp(2.0)), LN(1 + math.exp(1.0))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == w.tolist() and rejected.tolist() == l.tolist()
    losses, chosen, _ = mixed_simpo_loss(w, l, 0.5, beta=2.0)
    assert losses[0].item() == pytest.approx(LN(1 + math.exp(-(2.0 * 1.0 - 0.5))), abs=1e-6)
    assert chosen.tolist() == (2 * w).tolist()


def pair_batch(seed=0, batch=4, seq=9, vocab=11):
    g = torch.Generator().manual_seed(seed)
    winner = torch.randn(batch, seq, vocab, generator=g)
    loser = torch.randn(batch, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[0, -2:] = IGNORE_INDEX  # padding on one row
    return winner, loser, labels


def test_combined_loss_default_is_half_sft_plus_half_simpo():
    winner, loser, labels = pair_batch()
    margin = torch.tensor([0.1, 0.4, 0.7, 1.0])
    out = mergemix_loss(winner, labels, loser, labels, margin)
    w, l = sequence_logps(winner, labels).mean, sequence_logps(loser, labels).mean
    simpo = (-F.logsigmoid((w - l) - margin)).mean()
    sft = F.cross_entropy(winner[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert out.loss.item() == pytest.approx(((sft + simpo) / 2).item(), abs=1e-6)
    assert out.metrics["sft"] == pytest.approx(sft.item(), abs=1e-6)
    assert out.metrics["simpo"] == pytest.approx(simpo.item(), abs=1e-6)
    assert out.metrics["rewards/margins"] == pytest.approx((w - l).mean().item(), abs=1e-6)
    assert out.metrics["rewards/accuracies"] == pytest.approx((w > l).float().mean().item())
    weighted = mergemix_loss(winner, labels, loser, labels, margin, sft_weight=1.0, pref_weight=0.0)
    assert weighted.loss.item() == pytest.approx(sft.item(), abs=1e-6)


def test_loser_is_stop_gradient_unless_two_sided():
    winner, loser, labels = pair_batch()
    winner.requires_grad_(True)
    loser.requires_grad_(True)
    mergemix_loss(winner, labels, loser, labels, 0.5).loss.backward()
    assert winner.grad.abs().sum() > 0
    assert loser.grad is None
    winner.grad = None
    mergemix_loss(winner, labels, loser, labels, 0.5, two_sided=True).loss.backward()
    assert loser.grad.abs().sum() > 0


def test_samples_without_image_contribute_sft_only():
    winner, loser, labels = pair_batch()
    margin = torch.full((4,), 0.3)
    has_image = torch.tensor([True, False, True, False])
    out = mergemix_loss(winner, labels, loser, labels, margin, has_image=has_image)
    w, l = sequence_logps(winner, labels).mean, sequence_logps(loser, labels).mean
    simpo = (-F.logsigmoid((w - l) - margin))[has_image].mean()
    assert out.metrics["simpo"] == pytest.approx(simpo.item(), abs=1e-6)
    assert out.metrics["rewards/chosen"] == pytest.approx(w[has_image].mean().item(), abs=1e-6)
    none = mergemix_loss(winner, labels, loser, labels, margin, has_image=torch.zeros(4, dtype=torch.bool))
    assert none.loss.item() == pytest.approx(0.5 * sft_loss(winner, labels).item(), abs=1e-6)
    assert "rewards/accuracies" not in none.metrics


# --- against TRL (test-only dependency; skipped when TRL is absent) ------------------------


def _trl_cpo():
    pytest.importorskip("trl")
    try:
        from trl.experimental.cpo.cpo_trainer import CPOTrainer  # trl >= 0.2x moved CPO here
    except ImportError:
        from trl import CPOTrainer
    return CPOTrainer


@pytest.mark.filterwarnings("ignore")
def test_sequence_logps_matches_trl_average_log_prob():
    CPOTrainer = _trl_cpo()
    winner, _, labels = pair_batch(seed=3)
    ours = sequence_logps(winner, labels)
    assert torch.allclose(ours.mean, CPOTrainer.get_batch_logps(winner, labels, average_log_prob=True), atol=1e-5)
    assert torch.allclose(ours.total, CPOTrainer.get_batch_logps(winner, labels, average_log_prob=False), atol=1e-5)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_mixed_simpo_matches_trl_simpo_per_sample(beta):
    """TRL's CPO loss with loss_type='simpo' has one gamma per run; ours has one per sample.
    Run TRL's real cpo_loss once per sample with that sample's gamma: the numbers must agree."""
    CPOTrainer = _trl_cpo()
    g = torch.Generator().manual_seed(7)
    w, l = -3 * torch.rand(6, generator=g), -3 * torch.rand(6, generator=g)
    gamma = torch.rand(6, generator=g)
    losses, chosen, rejected = mixed_simpo_loss(w, l, gamma, beta=beta)
    for i in range(6):
        # cpo_loss only reads these attributes of the trainer
        trainer = SimpleNamespace(
            alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=gamma[i].item(), label_smoothing=0.0,
            accelerator=SimpleNamespace(device=torch.device("cpu")),
        )
        trl_loss, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, w[i : i + 1], l[i : i + 1])
        assert losses[i].item() == pytest.approx(trl_loss.item(), abs=1e-6)
        assert chosen[i].item() == pytest.approx(trl_chosen.item(), abs=1e-6)
        assert rejected[i].item() == pytest.approx(trl_rejected.item(), abs=1e-6)


def test_rows_without_an_answer_token_leave_simpo_and_are_counted():
    """A row whose answer was cut off has no score (0/0): it must not count as a pair with
    s = 0, and neither its loss nor its gradient may be NaN."""
    winner, loser, labels = pair_batch()
    labels = labels.clone()
    labels[1] = IGNORE_INDEX  # row 1: no answer token left
    winner.requires_grad_(True)
    margin = torch.tensor([0.2, float("nan"), 0.4, 0.1])  # the margin of a row left out may be anything
    has_image = torch.tensor([True, True, True, False])
    out = mergemix_loss(winner, labels, loser, labels, margin, has_image=has_image)
    w, l = sequence_logps(winner, labels).mean, sequence_logps(loser, labels).mean
    margin[1] = margin[3] = 0.0
    keep = torch.tensor([True, False, True, False])
    simpo = (-F.logsigmoid((w - l) - margin))[keep].mean()
    assert out.metrics["simpo"] == pytest.approx(simpo.item(), abs=1e-6)
    assert (out.metrics["counts/pairs"], out.metrics["counts/no_answer"], out.metrics["counts/sft_only"]) == (2, 1, 1)
    out.loss.backward()
    assert torch.isfinite(winner.grad).all() and torch.isfinite(out.loss)
