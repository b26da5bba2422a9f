import copy
import os

import pytest
import torch
from torch import nn

# Each xdist worker gets one thread: two workers on two cores beat two threads fighting over them.
torch.set_num_threads(int(os.environ.get("ROBUSTKD_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def pair():
    """A small MLP teacher and a noisy copy as student (mostly agreeing, so searches have work to do); 60 points,
    the first 6 relabelled so the teacher is wrong there (P is a proper subset)."""
    g = torch.Generator().manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.8)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.25)
    x = torch.rand(60, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    y[:6] = (y[:6] + 1) % 4  # some teacher-wrong points: P is a proper subset
    return teacher.eval(), student.eval(), x, y
