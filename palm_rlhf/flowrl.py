"""`palm_rlhf.flowrl.FlowRLTrainer`: the reference's FlowRL trainer (palm-rlhf-pytorch 0.8.0,
`palm_rlhf_pytorch.flowrl`) as a front door onto `RLHFTrainer(algorithm="flowrl")`.

FlowRL (Zhu et al. 2025) matches the reward-tilted reference distribution instead of maximising
reward: each prompt is sampled `flowrl_num_times_sample + 1` times, rewards are z-scored within
the group, and the loss is the importance-weighted squared trajectory balance
(log Z(x) + log pi / |y| - beta * r_hat - log ref / |y|)^2 with a learned log Z(x) head
(`partition_function_lr`). As in the reference, `beta_s` and `kl_div_loss_weight` are accepted
and have no effect. The keyword map is `to_config`; `train` counts as the reference does
(`rl/reference_keywords.py`); the porting table lists where the math differs (theirs puts
probabilities where the paper has log-probabilities).
"""

from __future__ import annotations

from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl import reference_keywords as ref

NAME = "palm_rlhf.flowrl.FlowRLTrainer"
REFERENCE_HIDDEN_DIM = 768  # the reference's default partition_function_hidden_dim


class FlowRLTrainer(ref.ReferenceTrainer):
    """`FlowRLTrainer(palm=..., reward_model=..., prompt_token_ids=..., **reference keywords)`;
    see the module docstring and the porting table."""

    name, algorithm = NAME, "flowrl"
    reference_defaults = dict(
        ref.SHARED_DEFAULTS,
        flowrl_num_times_sample=8,
        beta=15.0,
        eps_clip=0.2,
        kl_div_loss_weight=0.1,
        partition_function_hidden_dim=REFERENCE_HIDDEN_DIM,
        partition_function_lr=1e-4,
    )

    @staticmethod
    def to_config(keywords: dict, given: dict, palm: PaLM) -> dict:
        # log Z reads the PaLM's hidden states, so its width is the PaLM's (the reference
        # crashes on any other); its default 768 is taken to mean "not chosen"
        hidden = keywords["partition_function_hidden_dim"]
        if hidden not in (palm.dim, REFERENCE_HIDDEN_DIM):
            raise ValueError(
                f"{NAME}: partition_function_hidden_dim={hidden} must equal the PaLM's dim "
                f"{palm.dim} (the log Z head reads its hidden states)"
            )
        return dict(
            {name: keywords[name] for name in ref.SAME_MEANING},
            group_size=ref.group_size(
                NAME, "flowrl_num_times_sample", keywords["flowrl_num_times_sample"]
            ),
            minibatch_size=keywords["minibatch_size"],
            eps_clip=keywords["eps_clip"],  # clip of the sequence importance weight
            flowrl_beta=keywords["beta"],
            critic_lr=keywords["partition_function_lr"],  # our log Z head's optimiser
            beta_s=0.0,  # the reference stores beta_s and never reads it
        )
