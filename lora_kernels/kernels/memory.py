"""Output allocation for the kernel launchers.

``POISON = True`` (the tests set it) fills every output with NaN before the kernel runs, so an element a
kernel forgets to write fails the parity checks instead of passing with stale memory.
"""

import torch

POISON = False


def empty(shape, device, dtype):
    out = torch.empty(shape, device=device, dtype=dtype)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out
