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


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_normalises_and_erases_on_the_device_and_resumes_exactly(tmp_path, workers):
    """Items are uint8; the Loader's batches are normalised float32 with the erasing boxes filled, and the
    same with workers, without them, and after a resume (the noise comes from the samples' seeds)."""
    from PIL import Image

    from passl.data import build_dataset, collate_fn
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.4]
    split = {"dataset": {"name": "ImageFolder", "root": str(tmp_path)}, "label_store": None,
             "transforms": [{"name": "Normalize", "mean": mean, "std": std}, {"name": "RandomErasing", "prob": 0.5}]}
    dataset = build_dataset(split, "train", 2, (1, 1))

    def epoch(num_workers, start_batch=0):
        loader = Loader(dataset, 2, collate_fn, num_workers=num_workers, shuffle=True, seed=3)
        loader.set_epoch(1, start_batch)
        return [(b["image"].numpy(), b["label"].numpy()) for b in loader]

    full = epoch(0)
    assert all(images.dtype == np.float32 and images.shape == (2, 3, 16, 16) for images, _ in full)
    for a, b in zip(full[1:], epoch(workers, start_batch=1)):
        np.testing.assert_array_equal(a[0], b[0])
    # outside the erased boxes, a pixel is the normalised source pixel
    images = np.concatenate([i for i, _ in full])
    labels = np.concatenate([lab for _, lab in full])
    sources = [[np.asarray(Image.open(tmp_path / c / f"{i}.png")).transpose(2, 0, 1) for i in range(4)]
               for c in ("a", "b")]
    erased = 0
    for image, label in zip(images, labels):
        matches = [np.isclose(image, (p / 255.0 - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1)),
                              atol=1e-5) for p in sources[int(label)]]
        best = max(matches, key=np.mean)
        assert best.mean() > 0.5                       # it is one of its class's images
        erased += int(not best.all())
    assert 0 < erased < len(images)                   # prob 0.5: some erased, some not
