"""The resumable distributed sampler and the per-sample seeding of passl.data.loader."""
import numpy as np
import pytest

from passl.data.loader import Loader, ResumableDistributedBatchSampler, SeededItems


def _batches(sampler):
    return [[index for index, _ in batch] for batch in sampler]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_order_covers_each_sample_once_after_masking(world):
    n, batch = 10, 3
    seen = []
    for rank in range(world):
        sampler = ResumableDistributedBatchSampler(n, batch, world, rank, shuffle=False, drop_last=False)
        for b, indices in enumerate(_batches(sampler)):
            mask = sampler.valid_mask(b)
            assert len(mask) == len(indices)
            seen += [i for i, ok in zip(indices, mask) if ok]
    assert sorted(seen) == list(range(n))


def test_ranks_split_one_global_batch():
    """With the same global batch, two ranks' batches together are one process's batch."""
    n = 16
    one = _batches(ResumableDistributedBatchSampler(n, 4, 1, 0, shuffle=True, drop_last=True, seed=3))
    two = [_batches(ResumableDistributedBatchSampler(n, 2, 2, r, shuffle=True, drop_last=True, seed=3)) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 4
    for k in range(4):
        assert sorted(one[k]) == sorted(two[0][k] + two[1][k])


def test_shuffle_depends_on_seed_and_epoch_and_resumes():
    s = ResumableDistributedBatchSampler(20, 4, 1, 0, shuffle=True, drop_last=True, seed=0)
    s.set_epoch(0)
    e0 = _batches(s)
    s.set_epoch(1)
    e1 = _batches(s)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(20))
    s.set_epoch(1, start_batch=2)
    keys_tail = list(s)
    s.set_epoch(1)
    assert keys_tail == list(s)[2:]          # skipping batches keeps indices and seeds
    other_seed = ResumableDistributedBatchSampler(20, 4, 1, 0, shuffle=True, drop_last=True, seed=1)
    assert _batches(other_seed) != e0


def test_sample_seeds_distinct_per_position_and_rank():
    seeds = []
    for rank in range(2):
        s = ResumableDistributedBatchSampler(7, 2, 2, rank, shuffle=False, drop_last=False, seed=0)
        seeds += [seed for batch in s for _, seed in batch]
    assert len(set(seeds)) == len(seeds) == 8      # 7 samples padded to 8, the padding too


class RandomItems:
    """Items drawn from NumPy's global generator, as an augmentation would."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return {"image": np.random.rand(3, 2, 2).astype("float32"), "label": np.int64(index)}


def _collate(samples):
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_results_do_not_depend_on_workers_or_resume(workers):
    reference = Loader(RandomItems(), 2, _collate, num_workers=0, shuffle=True, seed=5)
    reference.set_epoch(1)
    full = [b["image"].numpy() for b in reference]
    loader = Loader(RandomItems(), 2, _collate, num_workers=workers, shuffle=True, seed=5)
    loader.set_epoch(1, start_batch=1)
    resumed = [b["image"].numpy() for b in loader]
    assert len(resumed) == 2
    for a, b in zip(full[1:], resumed):
        np.testing.assert_array_equal(a, b)
    assert isinstance(SeededItems(RandomItems())[(0, 1)], dict)
