"""Online RL: algorithm-neutral rollouts, the actor/critic/reference policies, KL control,
best-of-n, advantage estimators, and the algorithms built on them (`ppo/`)."""
