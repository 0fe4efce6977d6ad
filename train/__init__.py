"""The training job for tp_attention's GPT: `python -m train [hydra overrides]`."""
