"""Online RL wiring: algorithm-neutral rollouts, the actor/critic/reference policies, KL control,
best-of-n, the registry of algorithms (`algorithms.py`) and the trainer (`ppo/`). The math they
call lives in `palm_rlhf.functional`."""
