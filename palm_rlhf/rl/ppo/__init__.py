"""PPO (Schulman et al. 2017) the InstructGPT way: `RLHFTrainer`, its config, objective and
command-line stage."""
