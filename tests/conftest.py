import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_suite.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(int(os.environ.get("PEFT_KERNELS_TEST_SEED", "0")))
    yield


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
