import os
import sys

import pytest

# Tests import the packages from the checkout, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Real S3 (moto server mode) and HTTP servers on 127.0.0.1, shared by the storage, reader, prep and train tests.
pytest_plugins = ["tests.servers"]


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask inside one test; the one before the test is restored after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a shared 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    import torch  # here, not at the top: prep and shards tests must run without importing torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
