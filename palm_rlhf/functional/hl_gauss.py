"""HL-Gauss: regression as classification over value bins (Imani & White 2018; Farebrother
et al. 2024, "Stop Regressing", appendix A).

A scalar target y becomes a histogram over `num_bins` bins of the support [lo, hi]: the mass a
Gaussian N(y, sigma^2) puts in each bin, renormalised to the support,

    p_i(y) = (erf((b_{i+1} - y) / (sqrt 2 sigma)) - erf((b_i - y) / (sqrt 2 sigma))) / Z,

and a head predicting logits over the bins is trained with cross-entropy against p(y). The
predicted value is the expectation over bin centres, softmax(logits) . centres.

The keywords are those of the reference project's `HLGaussLoss` (hl-gauss-pytorch 0.3.0), with
its meanings: `min_max_value_on_bin_center` widens the support by half a bin on each side so
that min and max are bin centres; `sigma` defaults to `sigma_to_bin_ratio` (default 2) times
the bin width; `clamp_to_range` clamps targets into the support first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor

from palm_rlhf.functional.masked import masked_mean
from palm_rlhf.functional.value_losses import clip_values

# what the reference's RLHFTrainer passes by default (`hl_gauss_loss_kwargs`): rewards 0..5
REFERENCE_HL_GAUSS_KWARGS = dict(
    min_value=0.0,
    max_value=5.0,
    min_max_value_on_bin_center=True,
    clamp_to_range=True,
    sigma_to_bin_ratio=1.0,
)


@dataclass(frozen=True)
class HLGauss:
    """The bins of one HL-Gauss head; every method is a pure function of tensors."""

    support: tuple[float, ...]  # num_bins + 1 increasing bin edges
    sigma: float
    clamp_to_range: bool = False
    eps: float = 1e-10

    @classmethod
    def build(
        cls,
        num_bins: int,
        min_value: float,
        max_value: float,
        sigma: Optional[float] = None,
        sigma_to_bin_ratio: Optional[float] = None,
        eps: float = 1e-10,
        clamp_to_range: bool = False,
        min_max_value_on_bin_center: bool = False,
    ) -> HLGauss:
        """The reference's `HLGaussLoss(min_value, max_value, num_bins, ...)` keywords."""
        if num_bins < 2:
            raise ValueError(f"HL-Gauss needs at least 2 bins, got {num_bins}")
        if not max_value > min_value:
            raise ValueError(f"HL-Gauss needs max_value > min_value, got {min_value}, {max_value}")
        if sigma is not None and sigma_to_bin_ratio is not None:
            raise ValueError("HL-Gauss takes sigma or sigma_to_bin_ratio, not both")
        if min_max_value_on_bin_center:
            half_bin = (max_value - min_value) / ((num_bins - 1) * 2)
            min_value, max_value = min_value - half_bin, max_value + half_bin
        edges = torch.linspace(min_value, max_value, num_bins + 1)
        width = (max_value - min_value) / num_bins
        sigma = sigma if sigma is not None else (sigma_to_bin_ratio or 2.0) * width
        if sigma <= 0:
            raise ValueError(f"HL-Gauss sigma must be > 0, got {sigma}")
        return cls(tuple(edges.tolist()), float(sigma), clamp_to_range, eps)

    @classmethod
    def from_kwargs(cls, num_bins: int, kwargs: Optional[dict]) -> HLGauss:
        """`RLHFTrainer(critic_num_pred_bins=, hl_gauss_loss_kwargs=)`: None means the
        reference trainer's defaults; a dict replaces them (as there), unknown keys refused."""
        kwargs = dict(REFERENCE_HL_GAUSS_KWARGS if kwargs is None else kwargs)
        known = {"min_value", "max_value", "sigma", "sigma_to_bin_ratio", "eps"}
        known |= {"clamp_to_range", "min_max_value_on_bin_center"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"hl_gauss_loss_kwargs: unsupported key(s) {unknown}; known: {sorted(known)}"
            )
        missing = {"min_value", "max_value"} - set(kwargs)
        if missing:
            raise ValueError(f"hl_gauss_loss_kwargs needs {sorted(missing)}")
        return cls.build(num_bins, **kwargs)

    @property
    def num_bins(self) -> int:
        return len(self.support) - 1

    def edges(self, like: Tensor) -> Tensor:
        return torch.tensor(self.support, device=like.device, dtype=torch.float64)

    def centers(self, like: Tensor) -> Tensor:
        edges = self.edges(like)
        return ((edges[1:] + edges[:-1]) / 2).to(like.dtype)

    def probs(self, target: Tensor) -> Tensor:
        """Target values (...) -> histogram (..., num_bins), float32 (computed in float64)."""
        edges = self.edges(target)
        target = target.double()
        if self.clamp_to_range:
            target = target.clamp(edges[0], edges[-1])
        cdf = torch.erf((edges - rearrange(target, "... -> ... 1")) / (math.sqrt(2) * self.sigma))
        mass = cdf[..., 1:] - cdf[..., :-1]
        total = (cdf[..., -1] - cdf[..., 0]).clamp(min=self.eps)
        return (mass / rearrange(total, "... -> ... 1")).float()

    def value(self, logits: Tensor) -> Tensor:
        """Logits (..., num_bins) -> expected value (...): softmax . bin centres."""
        return (logits.float().softmax(dim=-1) * self.centers(logits.float())).sum(dim=-1)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of logits (..., num_bins) against the histogram of target (...),
        per element (...), no reduction."""
        log_probs = logits.float().log_softmax(dim=-1)
        return -(self.probs(target) * log_probs).sum(dim=-1)

    def value_loss(self, value: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of the histogram of a *value* (...) against that of target (...): how
        the reference scores a clipped value, log p(value) standing in for logits."""
        log_probs = self.probs(value).clamp(min=1e-20).log()
        return -(self.probs(target) * log_probs).sum(dim=-1)


def hl_gauss_clipped_loss(
    hl: HLGauss,
    logits: Tensor,
    old_values: Tensor,
    targets: Tensor,
    mask: Tensor,
    clip_eps: Optional[float],
) -> Tensor:
    """PPO's pessimistic clipped value loss for a binned critic: logits (b, n, k), old values,
    targets and mask (b, n) -> scalar. With clip_eps, the larger of the plain cross-entropy and
    the cross-entropy at V_clip = V_old + clamp(V - V_old, -eps, eps), as the reference trains
    its critic; masked mean over tokens."""
    loss = hl.loss(logits, targets)
    if clip_eps is not None:
        values = hl.value(logits)
        clipped = clip_values(values, old_values, clip_eps)
        loss = torch.maximum(loss, hl.value_loss(clipped, targets))
    return masked_mean(loss, mask)
