"""Training: one loop (`loop.py`) that pretraining, SFT, DPO, Chain of Hindsight and
reward-model training plug into, and the pieces PPO's own outer loop shares with it.

Words, each with one meaning:
- a *stage* is a step of the pipeline, run by one command: pretrain, sft, dpo, coh, reward,
  ppo (its config is the stage's options; `TrainingInterrupted.stage` names it);
- a *method* is what a fine-tuning stage brings to the loop (`finetune.FinetuneMethod`: its
  examples and its loss);
- a *run* is one stage's training in one `out_dir`: its step-N checkpoints and history.

Modules: `run_options.py` (the options every stage shares, declared once), `accelerator.py`,
`optim.py` (the optimiser builder and the schedule), `step.py` (the guarded step),
`checkpointing.py` (save, load, resume), `progress.py`, `history.py`, `stopping.py` (Ctrl-C),
`continuing.py` (the command that continues a run), `sharding.py` (FSDP2), `loading.py`
(a stage's model and tokenizer from the previous stage's checkpoint), then the stages."""
