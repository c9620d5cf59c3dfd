"""torch.library custom ops: where autograd and ``torch.compile`` meet the backends. One module per op:

    logprobs.py         token_logprobs (+ the backward pass over the logits that every op shares)
    grpo_loss.py        the fused loss from logits
    grad_in_forward.py  the fused loss that writes the logits' gradient in its forward (loss_scale)
    advantages.py       group-relative advantages
    _define.py          how a structure (TokenBatch, LossConfig, ...) crosses the op boundary

(the fused-linear loss's ops live with it, in :mod:`grpo_kernels.fused_linear.op`). Every op takes the backend's
name and forwards to that backend's method, so Triton, CUDA and torch share one set of op schemas, fake (meta)
implementations and backward formulas; the fakes let ``torch.compile(fullgraph=True)`` trace the public API.
"""
