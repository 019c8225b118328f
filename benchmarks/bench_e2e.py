"""End-to-end training-step benchmark (the code lives in peft_kernels.bench.e2e):

    python benchmarks/bench_e2e.py [--device cuda|cpu] [--json PATH] [--quick] [--variants GLOB ...]
    python -m peft_kernels.bench e2e --device cuda --json e2e.json      # the same, through the bench CLI
"""

import sys

from peft_kernels.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
