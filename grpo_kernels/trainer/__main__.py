"""``python -m grpo_kernels.trainer`` (and ``torchrun -m grpo_kernels.trainer``): the ``grpo-train`` command."""

import sys

from .cli import main

sys.exit(main())
