"""Shared test fixtures: tiny configs, few threads, offline."""

import os

import pytest
import torch

os.environ.setdefault("HYDRA_FULL_ERROR", "0")
torch.set_num_threads(2)


@pytest.fixture
def smoke_overrides(tmp_path):
    """Overrides for a seconds-long end-to-end run on the built-in data."""
    return [
        "protocol=smoke",
        f"output_dir={tmp_path / 'run'}",
        "data.num_train=160",
        "data.num_test=60",
        "method.proj_hidden_dim=64",
        "method.proj_output_dim=32",
    ]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP stalls on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
