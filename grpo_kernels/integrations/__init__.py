"""Drop-ins for existing trainers. Each lives in its own module and imports its framework only when imported itself.

- :mod:`grpo_kernels.integrations.trl` — ``GRPOTrainer``, TRL's trainer with the policy loss computed by
  :func:`grpo_kernels.grpo_loss` (needs ``pip install "grpo-kernels[trl]"``).
- :mod:`grpo_kernels.integrations.adapter` — ``grpo_loss_from_batch`` for any other trainer (verl-style batches):
  model outputs + a batch dict in, loss and metrics out. Needs nothing beyond torch.
"""
