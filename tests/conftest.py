"""Fixtures shared by the whole suite."""

import pytest
import torch


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thread")
def threads(request):
    """Run a parity test at 1 and at 2 intra-op threads (PyTorch and ONNX Runtime alike):
    reductions split differently, so the two runtimes' floats differ differently."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)
