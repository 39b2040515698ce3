"""The math of alignment as pure tensor functions: no modules, no devices, no Accelerate.

A bottom layer beside `model/` and `data/`: it imports only torch, einops and the beartype
configuration (`palm_rlhf.typecheck`); `model/`, `train/` and `rl/` import it. One file per job:

    masked.py         masked sum / mean / variance, whitening (optionally global over processes),
                      the last True of each row
    logprobs.py       log-probs of chosen tokens, entropy, sequence log-probs
    kl.py             per-token KL estimators (k1, k2, k3, abs) and the KL statistics logged
    advantages.py     per-token rewards, GAE, discounted returns, group / leave-one-out / MaxRL
                      baselines, REINFORCE++ returns, pooled-critic advantages, DAPO's overlong
                      penalty
    policy_losses.py  the clipped policy gradient (PPO, GRPO, RLOO, REINFORCE++) and its token
                      reductions, ratio levels (GSPO), clip variants and SPO, the drift KL and
                      entropy bonus on the advantage, score centering, FlowRL, TPO
    value_losses.py   the clipped value loss and explained variance
    hl_gauss.py       HL-Gauss value bins (regression as classification)
    preference.py     Bradley-Terry / InstructGPT ranking losses and DPO

Shapes: b = batch, n = sequence positions, v = vocabulary, K = responses per prompt,
p = prompts, g = responses per prompt (the group, rows laid out contiguously, b = p * g).
Every mask is a bool tensor where True means "this entry counts"; masked-out entries never
reach a result, even when they hold inf or NaN (they are selected away, not multiplied by 0).
"""
