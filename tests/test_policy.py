"""Where backend="auto" runs the CUDA C++ kernels (lora_kernels/policy.py): derived from bench.decode's rows, read
from the measured-policy file, applied only to eager inference calls without dropout."""

import json

import pytest
import torch

import lora_kernels
from conftest import DEVICE
from lora_kernels import backends, policy

DEVICE_NAME = "NVIDIA Test GPU"


def _rows(wins_up_to):
    """bench.decode-style rows at M = 1, 4, 16 for two layer sizes; CUDA 20% faster up to `wins_up_to` rows,
    2% faster (inside the margin) beyond."""
    rows = []
    for K, N in ((4096, 4096), (4096, 14336)):
        for M in (1, 4, 16):
            triton = 20.0 + M
            cuda = triton * (0.8 if M <= wins_up_to else 0.98)
            rows.append({"M": M, "K": K, "N": N, "r": 16, "triton_us": triton, "cuda_us": cuda})
    return rows


def test_derive_takes_the_rows_where_cuda_won_everywhere():
    entry = policy.derive(_rows(4), DEVICE_NAME, "bfloat16", "2026-12-02", "bench/results/x")
    assert entry == {"device": DEVICE_NAME, "dtype": "bfloat16", "max_rows": 4, "max_rank": 16, "min_K": 4096,
                     "min_N": 4096, "speedup": {"1": 1.25, "4": 1.25}, "measured": "2026-12-02",
                     "source": "bench/results/x"}
    assert policy.derive(_rows(0), DEVICE_NAME, "bfloat16", "d", "s") is None  # lost (within margin) at M = 1
    rows = _rows(16)
    rows[-1]["cuda_us"] = rows[-1]["triton_us"]  # one layer size where CUDA does not win at M = 16
    assert policy.derive(rows, DEVICE_NAME, "bfloat16", "d", "s")["max_rows"] == 4
    assert policy.derive([{"M": 1, "K": 8, "N": 8, "r": 1, "triton_us": 1.0}], DEVICE_NAME, "bf16", "d", "s") is None


def test_write_replaces_and_removes_the_entry_of_a_gpu(tmp_path, monkeypatch):
    path = str(tmp_path / "policy.json")
    other = dict(policy.derive(_rows(16), "Other GPU", "bfloat16", "d", "s"))
    policy.write(other, path)
    policy.write(policy.derive(_rows(1), DEVICE_NAME, "bfloat16", "d", "s"), path)
    policy.write(policy.derive(_rows(4), DEVICE_NAME, "bfloat16", "d", "s"), path)
    data = json.load(open(path))
    assert [(e["device"], e["max_rows"]) for e in data["entries"]] == [("Other GPU", 16), (DEVICE_NAME, 4)]
    monkeypatch.setattr(policy, "MEASURED_FILE", path)
    assert len(policy.entries(path)) == 2
    policy.write(None, path, DEVICE_NAME, "bfloat16")  # a later run measured no advantage
    assert [e["device"] for e in json.load(open(path))["entries"]] == ["Other GPU"]


def test_prefers_cuda_only_inside_the_measured_bounds(monkeypatch):
    entry = policy.derive(_rows(4), DEVICE_NAME, "bfloat16", "d", "s")
    monkeypatch.setattr(policy, "entries", lambda path=None: (entry,))
    ok = dict(device_name=DEVICE_NAME, dtype=torch.bfloat16, M=4, K=4096, N=4096, r=16)
    assert policy.prefers_cuda(**ok)
    for change in (dict(M=5), dict(M=0), dict(r=17), dict(K=2048), dict(N=1024), dict(dtype=torch.float16),
                   dict(device_name="Another GPU"), dict(M=4.0)):  # 4.0: not a plain int (symbolic)
        assert not policy.prefers_cuda(**{**ok, **change}), change


def test_the_shipped_policy_file_is_valid():
    keys = {"device", "dtype", "max_rows", "max_rank", "min_K", "min_N", "speedup", "measured", "source"}
    with open(policy.MEASURED_FILE) as f:
        data = json.load(f)
    assert isinstance(data["entries"], list)
    for e in data["entries"]:
        assert set(e) == keys and e["max_rows"] >= 1 and e["dtype"] in ("bfloat16", "float16", "float32")
    assert policy.entries() == tuple(data["entries"])


def test_measured_choice_needs_a_measurement_a_usable_extension_and_no_override(monkeypatch):
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(policy, "choose", lambda device, dtype, M, K, N, r: "cuda" if M <= 4 else None)
    monkeypatch.setattr(backends.CudaBackend, "unavailable_reason", staticmethod(lambda device, dtype: None))
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    assert backends.measured_choice("triton", cuda0, torch.bfloat16, 4, 64, 64, 8) == "cuda"
    assert backends.measured_choice("triton", cuda0, torch.bfloat16, 5, 64, 64, 8) == "triton"
    assert backends.measured_choice("torch", cuda0, torch.float64, 1, 64, 64, 8) == "torch"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    assert backends.measured_choice("triton", cuda0, torch.bfloat16, 4, 64, 64, 8) == "triton"
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    monkeypatch.setattr(backends.CudaBackend, "unavailable_reason", staticmethod(lambda device, dtype: "not built"))
    assert backends.measured_choice("triton", cuda0, torch.bfloat16, 4, 64, 64, 8) == "triton"


@pytest.mark.parametrize("call", ["inference", "grad", "dropout", "explicit"])
def test_lora_linear_asks_for_the_measured_choice_on_inference_calls_only(call, monkeypatch):
    asked = []
    monkeypatch.setattr(backends, "measured_choice", lambda default, *args: asked.append(args[2:]) or default)
    x = torch.randn(2, 3, 16, device=DEVICE)
    w, a, b = torch.randn(12, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE), torch.randn(12, 4, device=DEVICE)
    a.requires_grad_(call == "grad")
    with torch.set_grad_enabled(call == "grad"):
        lora_kernels.lora_linear(x, w, None, a, b, 2.0, 0.1 if call == "dropout" else 0.0,
                                 backend="torch" if call == "explicit" else "auto")
    assert asked == ([(6, 16, 12, 4)] if call == "inference" else [])
