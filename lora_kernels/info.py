"""``python -m lora_kernels.info``: versions, devices, and which backends can run here and why not."""

from ._report import info

if __name__ == "__main__":
    info()
