"""MergeMix training losses (docs/METHOD.md section 5), pure torch, usable from any trainer.

A step scores the same prompt and answer twice: once with the clean image (winner) and once
with the mixed image (loser). With `s(x)` the mean log-probability of the answer tokens,

    L_pref = -log sigmoid(beta * (s(winner) - s(loser)) - gamma),   gamma = 1 - lam_hat per sample
    L_sft  = token cross-entropy of the answer given the clean image
    L      = sft_weight * L_sft + pref_weight * L_pref               (default (L_sft + L_pref) / 2)

Labels follow the Hugging Face convention: the label at position t is the token the model
should predict from positions < t, and -100 marks everything that is not answer (prompt,
image tokens, padding). The shift happens here, once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class SequenceLogps:
    """Per-sample answer log-probabilities: `total` (summed), `mean` (divided by the number
    of answer tokens, 0 where there are none) and `tokens` (that number)."""

    total: torch.Tensor
    mean: torch.Tensor
    tokens: torch.Tensor


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on batch/sequence")
    # Position t predicts token t + 1: drop the last logit and the first label.
    return logits[:, :-1, :], labels[:, 1:]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every labelled token (B x T-1, 0 where ignored) and the 0/1 mask."""
    logits, labels = _shift(logits, labels)
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    # gather - logsumexp in fp32 avoids materialising a full log-softmax copy of the logits.
    logits = logits.float()
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
    """Summed and length-normalised answer log-probabilities per sample (labels -100 elsewhere)."""
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    tokens = mask.sum(-1)
    return SequenceLogps(total=total, mean=total / tokens.clamp(min=1), tokens=tokens)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy over all answer tokens of the batch (as a causal-LM loss)."""
    logits, labels = _shift(logits, labels)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # keeps the graph; no answer token, no signal
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def mixed_simpo_loss(
    winner_logps: torch.Tensor,
    loser_logps: torch.Tensor,
    margin: torch.Tensor | float,
    beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixed SimPO on length-normalised log-probs. `margin` is gamma, per sample (the shards
    store `margin = 1 - lam_hat`) or one number. Returns per-sample losses and the chosen and
    rejected rewards (beta * s, detached) for logging."""
    margin = torch.as_tensor(margin, dtype=winner_logps.dtype, device=winner_logps.device)
    losses = -F.logsigmoid(beta * (winner_logps - loser_logps) - margin)
    return losses, beta * winner_logps.detach(), beta * loser_logps.detach()


@dataclass
class LossOutput:
    """The combined loss (backpropagate this) and detached numbers to log."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def mergemix_loss(
    winner_logits: torch.Tensor,
    winner_labels: torch.Tensor,
    loser_logits: torch.Tensor,
    loser_labels: torch.Tensor,
    margin: torch.Tensor | float,
    *,
    has_image: torch.Tensor | None = None,
    beta: float = 1.0,
    sft_weight: float = 0.5,
    pref_weight: float = 0.5,
    two_sided: bool = False,
) -> LossOutput:
    """SFT on the winner plus mixed SimPO between winner and loser, weighted.

    The loser side is detached unless `two_sided` (the reference trainer runs the loser forward
    without gradient; run it under `torch.no_grad()` yourself to also save the memory).
    Rows with `has_image` False contribute SFT only: a text-only sample has no mixed image.
    Rows without a labelled token (an answer cut off by truncation) leave SimPO too: their
    score would be 0/0. Metrics count both (`counts/*`: pairs in SimPO, SFT-only rows, rows
    without an answer token)."""
    winner_scores = sequence_logps(winner_logits, winner_labels)
    loser_scores = sequence_logps(loser_logits, loser_labels)
    winner, loser = winner_scores.mean, loser_scores.mean
    if not two_sided:
        loser = loser.detach()
    sft = sft_loss(winner_logits, winner_labels)
    image = torch.ones_like(winner, dtype=torch.bool) if has_image is None else has_image.to(winner.device).bool()
    answered = (winner_scores.tokens > 0) & (loser_scores.tokens > 0)
    keep = image & answered
    margin = torch.as_tensor(margin, dtype=winner.dtype, device=winner.device).expand_as(winner)
    losses, chosen, rejected = mixed_simpo_loss(winner, loser, torch.where(keep, margin, torch.zeros_like(margin)), beta)
    simpo = losses[keep].mean() if keep.any() else losses.sum() * 0.0
    loss = sft_weight * sft + pref_weight * simpo
    chosen, rejected = chosen[keep], rejected[keep]
    metrics = {"loss": loss.item(), "sft": sft.item(), "simpo": simpo.item(), "counts/pairs": int(keep.sum()),
               "counts/sft_only": int((~image).sum()), "counts/no_answer": int((~answered).sum())}
    if keep.any():
        metrics.update(
            {
                "rewards/chosen": chosen.mean().item(),
                "rewards/rejected": rejected.mean().item(),
                "rewards/margins": (chosen - rejected).mean().item(),
                "rewards/accuracies": (chosen > rejected).float().mean().item(),
            }
        )
    return LossOutput(loss=loss, metrics=metrics)
