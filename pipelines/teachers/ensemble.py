"""An ensemble of teachers: the members' distributions averaged (``ensemble_log_probs``), in log space.
"""

from __future__ import annotations

import math

import torch


def ensemble_log_probs(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """The ensemble's logits: ``log mean_m softmax(t_m)``, computed in log space (``logsumexp`` of the members'
    log-probabilities minus ``log M``), so the smallest probabilities of the tail keep their value instead
    of underflowing. One member: its own logits."""
    if len(member_logits) == 1:
        return member_logits[0].float()
    log_probs = torch.stack([m.float().log_softmax(-1) for m in member_logits])
    return torch.logsumexp(log_probs, 0) - math.log(len(member_logits))
