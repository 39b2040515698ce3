"""`palm_rlhf.grpo.RLHFTrainer`: the reference's GRPO trainer (palm-rlhf-pytorch 0.8.0,
`palm_rlhf_pytorch.grpo`) as a front door onto `RLHFTrainer(algorithm="grpo")`.

GRPO (Shao et al. 2024) without a critic: each prompt is sampled
`grpo_num_times_sample_rewards + 1` times and every response's advantage is its reward's
z-score within that group, A_i = (r_i - mean) / std (Bessel std); the clipped policy gradient,
averaged over each response's tokens, then over responses, is the loss. The reference keeps no
frozen reference policy, so here `kl_coef = 0` (no KL-to-reference term); `kl_div_loss_weight`
subtracts each response's KL to the rollout policy from its advantage and `beta_s` weighs an
entropy bonus, as there. `use_dr_grpo` drops the std (Dr. GRPO, Liu et al. 2025: the centred
rewards over `dr_grpo_constant`, the group size by default); `use_max_rl` divides by the
group's mean reward (MaxRL); `use_simple_policy_optimization` swaps the clip for SPO's
penalty; `add_entropy_to_advantage` adds the capped entropy to the advantage (Cheng et al.
2025); `use_score_centering` swaps in the centred-score gradient.
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
        group = ref.group_size(
            NAME, "grpo_num_times_sample_rewards", keywords["grpo_num_times_sample_rewards"]
        )
        weight_fn = keywords["score_centering_weight_fn"]
        entropy = keywords["add_entropy_to_advantage"]  # else the reference never reads the two
        return dict(
            {name: keywords[name] for name in ref.SAME_MEANING},
            group_size=group,
            minibatch_size=keywords["minibatch_size"],
            eps_clip=keywords["eps_clip"],
            beta_s=keywords["beta_s"],
            kl_div_loss_weight=keywords["kl_div_loss_weight"],
            scale_by_std=not dr_grpo,
            # theirs divides by the constant, the group size by default
            dr_grpo_constant=(keywords["dr_grpo_constant"] or group) if dr_grpo else None,
            max_rl=keywords["use_max_rl"],
            simple_policy_optimization=spo,
            score_centering=centering,
            # read by score centering only, as there
            score_centering_topk=keywords["score_centering_topk"] if centering else None,
            score_centering_weight_fn=(
                weight_fn if centering and weight_fn is not torch.ones_like else None
            ),
            entropy_to_advantage_scale=keywords["entropy_to_advantage_scale"] if entropy else 0.0,
            entropy_to_advantage_kappa=keywords["entropy_to_advantage_kappa"],
            # their masked mean over each response, then the batch mean
            loss_agg_mode="seq-mean-token-mean",
            kl_coef=0.0,  # no frozen reference policy there
        )
