"""Triton kernels, one module per op family (run natively on CUDA, or on CPU under TRITON_INTERPRET=1)."""
