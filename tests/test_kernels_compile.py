"""Every shipped Triton kernel specialization compiles to a GPU binary for sm_80 and sm_90, on any machine.

Runs `python -m lora_kernels.kernels.aot_check` in a subprocess without TRITON_INTERPRET (the interpreter
replaces the kernels' JIT functions, which the compiler needs).
"""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("arch", [80, 90])
def test_all_specializations_compile(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    out = subprocess.run([sys.executable, "-m", "lora_kernels.kernels.aot_check", "--arch", str(arch), "--jobs", jobs],
                         capture_output=True, text=True, env=env, timeout=1800)
    summary = out.stdout.strip().splitlines()[-1:] or ["(no output)"]
    failures = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
    assert out.returncode == 0, f"{summary[0]}\n" + "\n".join(failures[:10]) + out.stderr[-3000:]
    assert " 0 failed" in summary[0]
