"""``python -m peft_kernels.info``: versions, the GPU (or none), and which backend serves which op."""

from peft_kernels._info import info

if __name__ == "__main__":
    info()
