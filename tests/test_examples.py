"""The examples run end to end (few steps here; the full runs are documented in the README)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_finetune_tiny_llama_example(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "finetune_tiny_llama.py"), "--steps", "3",
                          "--out", str(tmp_path / "adapter")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "same generation" in out.stdout, out.stdout
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_accelerate_example_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          os.path.join(ROOT, "examples", "accelerate_finetune.py"), "--steps", "3",
                          "--out", str(tmp_path / "adapter")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(2 processes)" in out.stdout and "adapter saved" in out.stdout
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_mixed_batch_serving_example():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "mixed_batch_serving.py"), "--steps", "4"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mixed batch rows equal their adapter alone: True" in out.stdout, out.stdout
