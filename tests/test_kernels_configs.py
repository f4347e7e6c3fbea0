"""Autotuning setup of the Triton kernels (lora_kernels/kernels/configs.py), as a GPU process sees it."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json
from lora_kernels import plan, backends
from lora_kernels.kernels import backward, configs, forward
backends.triton_import_error()
kernels = (forward.lora_fwd_kernel, forward.lora_xa_kernel, backward.lora_bwd_dx_kernel,
           backward.lora_bwd_lowrank_kernel)
print(json.dumps([[k.cache_results for k in kernels], configs.AUTOTUNE]))
"""


@pytest.mark.parametrize("tune, autotune", [(None, True), ("cached", True), ("off", False)])
def test_autotune_is_cached_on_disk_and_off_with_the_planner(tune, autotune):
    """Outside the interpreter every autotuned kernel keeps its timings in Triton's disk cache (a restarted process
    does not time every config again); LORA_KERNELS_TUNE=off also turns Triton's autotuning off (first config)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORA_KERNELS_TUNE")}
    if tune is not None:
        env["LORA_KERNELS_TUNE"] = tune
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    cached, on = json.loads(out.stdout.strip().splitlines()[-1])
    assert cached == [True] * 4 and on is autotune


def test_every_padded_rank_has_a_row():
    """Every table serves every padded rank its kernels can be launched with (the fused forward up to 64, the
    others up to 256), so the fallback to the widest row, whose spills at that rank aot_check does not bound,
    is never taken for r <= 256; and every row serves rank 16 (the narrowest)."""
    from lora_kernels.kernels.configs import TABLES

    widest = {"gemm": 64, "dx": 256, "thin": 256, "quant": 256}
    for kind, by_arch in TABLES.items():
        for arch, by_size in by_arch.items():
            for elem_bytes, rows in by_size.items():
                caps = [row[5] for row in rows]
                assert max(caps) >= widest[kind], (kind, arch, elem_bytes, caps)
                assert min(caps) >= 16 and all(c & (c - 1) == 0 for c in caps), (kind, arch, elem_bytes, caps)
