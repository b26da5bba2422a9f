import os

import pytest
import torch

# Each xdist worker gets one thread: two workers on two cores beat two threads fighting over them.
torch.set_num_threads(int(os.environ.get("ROBUSTKD_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
