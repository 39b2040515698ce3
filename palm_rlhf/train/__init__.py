"""Training recipes: pretraining, the fine-tuning loop (SFT, DPO, Chain of Hindsight),
reward-model training, and loading a stage's checkpoint for the next. Each recipe is
self-contained and shares small helpers from `run.py` (Accelerator, resume, guarded steps)."""
