"""The resumable sampler and seeded augmentation (metassl.engine.data_order), alone."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from metassl.engine.data_order import ResumableSampler, SeededItems, capture_rng, restore_rng


class Noisy(Dataset):
    """An item drawn from the global generator, like an augmentation."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i)]), torch.rand(1)


def test_default_order_is_random_samplers():
    """Unseeded, the order (and the global stream after it) is exactly ``shuffle=True``'s."""
    torch.manual_seed(3)
    plain = [b.tolist() for b in DataLoader(range(10), batch_size=2, shuffle=True)]
    after_plain = torch.rand(1)
    torch.manual_seed(3)
    ours = [b.tolist() for b in DataLoader(range(10), batch_size=2, sampler=ResumableSampler(10, batch_size=2))]
    assert ours == plain and torch.equal(torch.rand(1), after_plain)


def test_state_resumes_the_rest_of_the_epoch():
    sampler = ResumableSampler(10, seed=1, batch_size=3)
    sampler.set_epoch(2)
    full = list(sampler)
    state = sampler.state_dict(batches_done=2)
    resumed = ResumableSampler(10, seed=1, batch_size=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert list(resumed) == full[6:]
    assert sorted(resumed) == list(range(10))  # the next pass is a whole epoch again
    ended = ResumableSampler(10, seed=1, batch_size=3)
    ended.load_state_dict(sampler.state_dict(batches_done=3))  # saved at the end of epoch 2
    assert ended.epoch == 3 and len(list(ended)) == 10


def test_seeded_items_do_not_depend_on_the_global_stream():
    sampler = ResumableSampler(10, seed=5, seeded=True)
    keys = list(sampler)
    assert all(k[0] == 0 for k in keys) and sorted(k[1] for k in keys) == list(range(10))
    items = SeededItems(Noisy(), seed=5)
    torch.manual_seed(0)
    first = [items[k][1] for k in keys]
    torch.manual_seed(1)
    state = capture_rng()
    second = [items[k][1] for k in keys]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    after = torch.rand(1)
    restore_rng(state)
    assert torch.equal(torch.rand(1), after)  # the items consumed nothing from the global generator
    assert not torch.equal(items[(1, 3)][1], items[(0, 3)][1])  # another epoch, other views
