"""Benchmarks and the demo of lora-kernels: `python -m bench.demo`."""
