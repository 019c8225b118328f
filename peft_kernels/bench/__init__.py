"""Benchmark harness and CLI: ``python -m peft_kernels.bench --help``."""

from peft_kernels.bench.harness import (
    Case,
    Row,
    Settings,
    Skip,
    Workload,
    peak_memory_mb,
    run_cases,
    time_callable,
)


def main(argv: list[str] | None = None) -> int:
    # Imported on call: importing __main__ here would make `python -m peft_kernels.bench` load it twice.
    from peft_kernels.bench.__main__ import main as _main

    return _main(argv)


__all__ = ["Case", "Row", "Settings", "Skip", "Workload", "main", "peak_memory_mb", "run_cases",
           "time_callable"]
