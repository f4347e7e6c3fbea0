"""Every per-call kernel choice in one place: what a call is (``Call``), what runs it (``Plan``), how it is chosen.

A call is described by its device, dtype, rows M, K, N, rank (a mixed batch: the adapters' stacked rank and their
number), dropout on/off, which grads it needs, and torch's deterministic mode. A plan names the forward and the
backward *variant* that run it (``FORWARDS`` / ``BACKWARDS``; mixed batches ``MIXED_FORWARDS`` /
``MIXED_BACKWARDS``) and the launch parameters they need. Launchers take the variant as an argument and decide
nothing.

How a plan is chosen (``choose``), as cuDNN's benchmark mode and Triton's autotuner do it:

1. a forced choice: ``backend=`` (a backend family, or a plan spec such as ``"triton_fused+aten"``) or
   LORA_KERNELS_BACKEND; a forced plan that cannot run the call raises before any kernel, naming why;
2. the cache: in memory, and on disk (JSON, one file per GPU model and software versions, ``cache_path``);
3. on CUDA, the first call of a new key times every eligible candidate on scratch inputs of that shape (fresh
   tensors from a private generator: the caller's tensors and torch's random stream are untouched) with CUDA events
   around back-to-back calls after a warm-up, so host launch cost counts as the user pays it, and keeps the
   fastest. The candidates always include ``aten``, which computes every product with ATen (cuBLAS) as PEFT's eager
   layer does: the chosen plan is never slower than that composition beyond timing noise;
4. otherwise the static defaults (``default_plan``): the best guesses from the H100 measurements (docs/design.md).

Nothing is timed while torch.compile traces or in what it compiled (the ops hold the backend name and look the cached
or default plan up for their concrete shapes when they run), during CUDA graph capture, in deterministic mode (a fixed
choice), under Triton's interpreter or on CPU. As with
``torch.backends.cudnn.benchmark``, a measured choice can differ between runs and machines (results then differ in
the last bits); ``LORA_KERNELS_TUNE=off`` uses the static defaults only (and Triton's first config per kernel) for
bitwise-repeatable runs.

The modules, one concern each: ``calls`` (Call, Plan, the names), ``rules`` (fit rules, static defaults, candidates,
launch parameters), ``cache`` (the disk cache), ``measure`` (timing candidates), ``lookup`` (the memo and ``choose``),
``report`` (``describe``). The knobs are read by ``lora_kernels.settings``.

Knobs (read once per process; ``reset()`` reads them again):
    LORA_KERNELS_BACKEND    force a backend family (torch, aten, triton, cuda) or a plan spec for backend="auto"
    LORA_KERNELS_TUNE       on (default: measure new keys on CUDA) | cached (use the cache, never measure) | off
    LORA_KERNELS_CACHE_DIR  where the plan cache lives (default: $XDG_CACHE_HOME/lora_kernels, ~/.cache/...)
"""

from __future__ import annotations

from ..settings import Settings, TUNE_MODES, apply_autotune_setting, settings
from . import cache, calls, lookup, measure, report, rules
from .cache import cache_path, context, entry_key
from .calls import (AUTO_FAMILIES, BACKWARDS, CUBLAS_MIN_ROWS, CUDA_MAX_RANK, DECODE_MAX_ROWS, FAMILIES, FORWARDS,
                    FUSED_MAX_RANK, MIXED_BACKWARDS, MIXED_FORWARDS, NAMES, SPLIT_MIN_N, TRITON_MAX_RANK, Call, Plan,
                    bucket, check_name, padded_rank, parse_spec)
from .lookup import choose, choose_uncached, memo_key, reset, resolve_spec, tune, why_not_measure
from .measure import cuda_event_timer, run_backward, run_forward, tune_call
from .report import TYPICAL, describe
from .rules import (SPLITTING, aux_kernels_for, backward_unfit, candidates, check_forced,
                    cuda_unavailable_without_build, default_plan, family_of, family_unavailable, forward_unfit,
                    launch_splits, plan_unfit, preferences, sm_count, static_plan, xa_split_target)

__all__ = ["Call", "Plan", "choose", "default_plan", "static_plan", "tune", "tune_call", "parse_spec", "check_name",
           "cache_path", "context", "entry_key", "memo_key", "describe", "reset", "resolve_spec", "settings",
           "Settings", "candidates", "forward_unfit", "backward_unfit", "plan_unfit", "check_forced",
           "aux_kernels_for", "family_of", "family_unavailable", "preferences", "launch_splits", "xa_split_target",
           "bucket", "FORWARDS", "BACKWARDS", "MIXED_FORWARDS", "MIXED_BACKWARDS", "FAMILIES", "NAMES"]
