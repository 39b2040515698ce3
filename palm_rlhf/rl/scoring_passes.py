"""Which of a rollout's scoring passes an update reads, so that a rollout can skip the rest.

After sampling, a rollout runs the actor once more (the old log-probs, log pi_old) and the
frozen reference once (log pi_ref). Some settings read neither: with no KL to the reference
(`kl_coef` 0, no `target_kl`, no `kl_div_loss_weight`, not FlowRL, whose loss holds the
reference) and an update that is one on-policy pass (one epoch, one minibatch: every row's
loss is taken before the first step), the old log-probs are the update's own, detached. TRL's
`GRPOTrainer` makes the same saving at beta 0 with one iteration. The rollout's KL to the
reference is then not measured, and its record says `nan`.
"""

from __future__ import annotations


def reads_reference(config) -> bool:
    """Whether the update (or its KL controller) reads the reference policy's log-probs."""
    return (
        config.kl_coef > 0
        or config.target_kl is not None
        or config.kl_div_loss_weight > 0
        or config.algorithm == "flowrl"
    )


def one_on_policy_pass(config, rows_per_process: int, num_processes: int) -> bool:
    """One epoch over one minibatch (of whole groups, as `rollout.group_minibatches` cuts them):
    the policy that computes every row's loss is the one that sampled it."""
    group = config.responses_per_prompt
    per_step = max(1, config.minibatch_size // num_processes)
    groups_per_step = max(1, per_step // group)
    return config.epochs == 1 and groups_per_step * group >= rows_per_process


def skips_scoring(config, rows_per_process: int, num_processes: int) -> bool:
    """True when a rollout of `rows_per_process` rows on each process needs neither pass."""
    return not reads_reference(config) and one_on_policy_pass(
        config, rows_per_process, num_processes
    )
