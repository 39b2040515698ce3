"""`palm_rlhf.grpo.RLHFTrainer`: the reference's GRPO trainer (palm-rlhf-pytorch 0.8.0,
`palm_rlhf_pytorch.grpo`) as a front door onto `RLHFTrainer(algorithm="grpo")`.

GRPO (Shao et al. 2024) without a critic: each prompt is sampled
`grpo_num_times_sample_rewards + 1` times and every response's advantage is its reward's
z-score within that group, A_i = (r_i - mean) / std (Bessel std); the clipped policy gradient,
averaged over each response's tokens, then over responses, is the loss. The reference keeps no
frozen reference policy, so here `kl_coef = 0` (no KL-to-reference term). `use_dr_grpo` drops
the std (Dr. GRPO, Liu et al. 2025); `use_score_centering` swaps in the centred-score gradient.
The keyword map is `to_config`; `train` counts as the reference does (`rl/reference_keywords.py`).
"""

from __future__ import annotations

import torch

from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl import reference_keywords as ref
from palm_rlhf.rl.reference_keywords import score_centering_loss

NAME = "palm_rlhf.grpo.RLHFTrainer"
__all__ = ["RLHFTrainer", "score_centering_loss"]


class RLHFTrainer(ref.ReferenceTrainer):
    """`RLHFTrainer(palm=..., reward_model=..., prompt_token_ids=..., **reference keywords)`;
    see the module docstring and the porting table."""

    name, algorithm = NAME, "grpo"
    reference_defaults = dict(
        ref.SHARED_DEFAULTS,
        grpo_num_times_sample_rewards=10,
        eps_clip=0.2,
        kl_div_loss_weight=0.1,
        use_simple_policy_optimization=False,
        use_dr_grpo=False,
        dr_grpo_constant=None,
        use_max_rl=False,
        use_score_centering=False,
        score_centering_topk=None,
        score_centering_weight_fn=torch.ones_like,
        add_entropy_to_advantage=False,
        entropy_to_advantage_kappa=2.0,
        entropy_to_advantage_scale=0.4,
    )

    @staticmethod
    def to_config(keywords: dict, given: dict, palm: PaLM) -> dict:
        dr_grpo = keywords["use_dr_grpo"] or keywords["dr_grpo_constant"] is not None
        if dr_grpo and keywords["use_max_rl"]:
            raise ValueError(f"{NAME}: cannot use both Dr. GRPO and MaxRL")
        spo, centering = keywords["use_simple_policy_optimization"], keywords["use_score_centering"]
        if spo and centering:
            raise ValueError(f"{NAME}: cannot use both SPO and Score Centering")
        if keywords["use_max_rl"]:
            ref.pending(NAME, "use_max_rl", True, "max_rl (MaxRL, arXiv 2602.02710)")
        if spo:
            ref.pending(
                NAME,
                "use_simple_policy_optimization",
                True,
                "simple_policy_optimization (SPO, Xie et al., arXiv 2401.16025)",
            )
        if keywords["add_entropy_to_advantage"]:
            ref.pending(
                NAME,
                "add_entropy_to_advantage",
                True,
                "entropy_to_advantage_kappa / entropy_to_advantage_scale (Cheng et al. 2025)",
            )
        if keywords["score_centering_topk"] is not None:
            topk = keywords["score_centering_topk"]
            ref.pending(NAME, "score_centering_topk", topk, "score_centering_topk")
        if keywords["score_centering_weight_fn"] is not torch.ones_like:
            weight_fn = keywords["score_centering_weight_fn"]
            ref.pending(NAME, "score_centering_weight_fn", weight_fn, "score_centering_weight_fn")
        if dr_grpo and keywords["max_norm"] is not None:
            # A_i / c is a constant factor of the loss, which Adam-type updates cancel unless
            # the gradient is clipped
            ref.pending(
                NAME, "use_dr_grpo", True, "dr_grpo_constant (the advantage divisor) with max_norm"
            )
        ref.unapplied_defaults(NAME, keywords, given, ("beta_s", "kl_div_loss_weight"))
        return dict(
            {name: keywords[name] for name in ref.SAME_MEANING},
            group_size=ref.group_size(
                NAME, "grpo_num_times_sample_rewards", keywords["grpo_num_times_sample_rewards"]
            ),
            minibatch_size=keywords["minibatch_size"],
            eps_clip=keywords["eps_clip"],
            scale_by_std=not dr_grpo,
            score_centering=centering,
            length_norm="sequence",  # their masked mean over each response, then the batch mean
            kl_coef=0.0,  # no frozen reference policy there
        )
