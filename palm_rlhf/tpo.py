"""`palm_rlhf.tpo.RLHFTrainer`: the reference's TPO trainer (palm-rlhf-pytorch 0.8.0,
`palm_rlhf_pytorch.tpo`) as a front door onto `RLHFTrainer(algorithm="tpo")`.

TPO (Kaddour 2026) fits the policy to a target distribution over each group: each prompt is
sampled `num_times_sample_rewards + 1` times, q_i = softmax_group(log pi_old(y_i) + z_i / eta)
with z the group z-score of the rewards, and the loss is the cross-entropy from q to the
policy's group-renormalised sequence probabilities. The reference keeps no frozen reference
policy, so here `kl_coef = 0`; `beta_s` weighs an entropy bonus, as there. Its
`minibatch_size` counts groups (prompts), ours responses: the map multiplies by the group
size. The keyword map is `to_config`; `train` counts as the reference does
(`rl/reference_keywords.py`).
"""

from __future__ import annotations

from typing import Optional

from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl import reference_keywords as ref

NAME = "palm_rlhf.tpo.RLHFTrainer"


class RLHFTrainer(ref.ReferenceTrainer):
    """`RLHFTrainer(palm=..., reward_model=..., prompt_token_ids=..., **reference keywords)`;
    see the module docstring and the porting table."""

    name, algorithm = NAME, "tpo"
    reference_defaults = dict(
        ref.SHARED_DEFAULTS,
        num_times_sample_rewards=10,
        tpo_eta=1.0,
    )

    @staticmethod
    def to_config(keywords: dict, given: dict, palm: PaLM) -> dict:
        group = ref.group_size(
            NAME, "num_times_sample_rewards", keywords["num_times_sample_rewards"]
        )
        return dict(
            {name: keywords[name] for name in ref.SAME_MEANING},
            group_size=group,
            minibatch_size=keywords["minibatch_size"] * group,  # theirs counts groups
            tpo_eta=keywords["tpo_eta"],
            beta_s=keywords["beta_s"],
            kl_coef=0.0,  # no frozen reference policy there
        )

    def train(
        self,
        num_episodes: int = 50000,
        max_timesteps: int = 500,
        update_timesteps: int = 5000,
        max_seq_len: int = 2048,
        eos_token: Optional[int] = None,
        temperature: float = 1.0,
        max_episodes: int = 4,
        **ours,
    ) -> list[dict]:
        """The reference TPO's `train` (no `max_batch_size`; `max_episodes`, the capacity of
        its on-disk replay buffer, is accepted and unused: rollouts stay in memory here)."""
        del max_episodes
        return self.reference_train(
            num_episodes,
            max_timesteps,
            update_timesteps,
            max_seq_len,
            eos_token,
            temperature,
            **ours,
        )
