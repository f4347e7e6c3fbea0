"""Triton kernels: forward.py (fused forward), backward.py (fused backward), dropout.py (in-kernel mask),
configs.py (autotune lists per GPU generation). Importing this package imports triton."""
