"""The data layer: tokenizers, JSON Lines records, collation, pretraining corpora and
fine-tuning examples. Imports nothing from `model`, `train` or `rl`."""
