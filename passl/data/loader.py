"""Data loading across processes: a resumable distributed batch sampler and a seeded DataLoader.

Every process sees the same permutation of the dataset (seeded by ``seed`` and the epoch), padded
by repeating its head to a multiple of the world size and dealt out round-robin: rank r takes
positions r, r + W, r + 2W, ... So with the same global batch, the ranks' batches together hold
exactly what one process's batch would, and evaluation can drop the padding by position.

Randomness inside a sample's transforms is reseeded per sample from ``(seed, epoch, position)``
(Python's ``random`` and NumPy's global generator), so augmentation does not depend on which
worker or rank draws the sample, and resuming in the middle of an epoch repeats it exactly.
Workers are additionally seeded from ``(seed, epoch, rank, worker_id)`` for anything else; the noise
RandomErasing draws on the device for a batch, from ``(seed, epoch, rank, batch)`` (``erase_seed``).

Nothing the Loader does per batch reads a tensor back to the host: batches reach the device and are
finished there, stand-in images for undecodable ones are recorded when the pass ends, and the worker
processes of a pass left early (a break, an error, a stop) are shut down when it is closed.
"""
import random

import numpy as np
import paddle

from passl.errors import DataError, PasslError

__all__ = ["ResumableDistributedBatchSampler", "SeededItems", "WorkerSeeder", "Loader", "build_loader",
           "sample_seed", "erase_seed"]


_ERROR_KEY = "_loader_error"
_WORKER_EXIT_SECONDS = 10   # a worker finishing its current item before it reads the stop


def sample_seed(seed, epoch, position):
    """A 32-bit seed for the sample at ``position`` of epoch ``epoch``'s padded order."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


def erase_seed(seed, epoch, rank, batch_index):
    """The seed (1 .. 2^31 - 2) of RandomErasing's noise for this rank's batch ``batch_index`` of ``epoch``."""
    state = int(np.random.SeedSequence([seed, epoch, rank, batch_index, 2]).generate_state(1)[0])
    return state % (2 ** 31 - 2) + 1


class ResumableDistributedBatchSampler(paddle.io.BatchSampler):
    """Yields this rank's batches as lists of ``(dataset_index, sample_seed)`` keys.

    ``set_epoch(epoch, start_batch)`` picks the epoch (the shuffle and the seeds depend on it) and
    skips the first ``start_batch`` batches, which is how a run resumes mid-epoch.
    """

    def __init__(self, num_samples, batch_size, num_replicas=1, rank=0, shuffle=False, drop_last=False, seed=0):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch, self.start_batch = 0, 0
        self.per_rank = -(-num_samples // num_replicas)   # ceil: every rank gets the same count
        self.total = self.per_rank * num_replicas

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def order(self):
        """The padded global order for this epoch: [total] dataset indices."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        pad = self.total - self.num_samples
        return np.concatenate([order, np.resize(order, pad)]) if pad else order

    def _positions(self, batch_index):
        """Global positions (into ``order()``) of this rank's batch ``batch_index``."""
        local = np.arange(batch_index * self.batch_size, min((batch_index + 1) * self.batch_size, self.per_rank))
        return local * self.num_replicas + self.rank

    def valid_mask(self, batch_index):
        """[b] bool: False where batch ``batch_index`` holds padding (a repeated sample)."""
        return self._positions(batch_index) < self.num_samples

    def __len__(self):
        """Batches per epoch on this rank (including any skipped by ``start_batch``)."""
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def __iter__(self):
        order = self.order()
        for b in range(self.start_batch, len(self)):
            positions = self._positions(b)
            yield [(int(order[p]), sample_seed(self.seed, self.epoch, int(p))) for p in positions]


class SeededItems(paddle.io.Dataset):
    """Wraps a map-style dataset: item ``(index, seed)`` reseeds ``random`` and NumPy, then loads."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.dataset[index]
        except PasslError as e:   # raised in a worker it would reach the trainer without its message
            return _ItemError(str(e))


class _ItemError:
    """A sample that could not be loaded; ``_Collate`` turns it into an error field of the batch."""

    def __init__(self, message):
        self.message = message


class _Collate:
    """``collate_fn`` that passes a failed sample's message through the loader as a uint8 field, so that
    ``Loader`` raises it, with the file name, in the training process (from workers or not)."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items):
        failed = [item for item in items if isinstance(item, _ItemError)]
        if failed:
            return {_ERROR_KEY: np.frombuffer(failed[0].message.encode("utf-8"), dtype=np.uint8)}
        return self.collate_fn(items)


class WorkerSeeder:
    """``worker_init_fn`` giving worker w of rank r in epoch e the seed f(seed, e, r, w)."""

    def __init__(self, seed, rank):
        self.seed, self.rank, self.epoch = seed, rank, 0

    def seed_for(self, worker_id):
        return int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker_id, 1]).generate_state(1)[0])

    def __call__(self, worker_id):
        s = self.seed_for(worker_id)
        random.seed(s)
        np.random.seed(s)


class Loader:
    """A DataLoader over one split with a resumable distributed sampler.

    Iterating yields the collated batch as a dict of tensors on the current device, finished by the
    dataset's ``finish_batch`` when it has one (uint8 images normalised there). Call
    ``set_epoch(epoch, start_batch)`` before each pass.
    """

    def __init__(self, dataset, batch_size, collate_fn, num_workers=0, shuffle=False, drop_last=False,
                 seed=0, rank=0, world_size=1):
        self.dataset = dataset
        self.items = SeededItems(dataset)
        self.collate_fn = _Collate(collate_fn)
        self.sampler = ResumableDistributedBatchSampler(len(dataset), batch_size, world_size, rank,
                                                        shuffle=shuffle, drop_last=drop_last, seed=seed)
        self.seeder = WorkerSeeder(seed, rank)
        # Without workers, batches are loaded in this thread: Paddle's single-process DataLoader reads
        # in a background thread and, when the dataset raises (a corrupt image, a missing label map),
        # the error dies with that thread and the caller waits forever.
        self.loader = paddle.io.DataLoader(self.items, batch_sampler=self.sampler, collate_fn=self.collate_fn,
                                           num_workers=num_workers, worker_init_fn=self.seeder,
                                           return_list=True) if num_workers else None

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch)
        self.seeder.epoch = epoch   # workers are started by iter(), after this

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        """Batches as {name: tensor} on Paddle's current device, finished there (no host sync per batch).

        Batches holding a stand-in for an undecodable image (``bad_image_index``, present only then) are
        kept on the device and recorded in the dataset when the pass ends or is closed; the DataLoader's
        workers are shut down then too, also when the pass is left early."""
        on_gpu = "gpu" in paddle.device.get_device()
        finish = getattr(self.dataset, "finish_batch", None)
        sampler = self.sampler
        stand_ins = []
        batches = iter(self.loader) if self.loader is not None else self._load_here()
        try:
            for index, batch in enumerate(batches, start=sampler.start_batch):
                if _ERROR_KEY in batch:
                    raise DataError(bytes(_numpy(batch[_ERROR_KEY])).decode("utf-8"))
                bad = batch.pop("bad_image_index", None)
                if bad is not None:
                    stand_ins.append(bad)
                if on_gpu:
                    batch = {k: (v.cuda() if isinstance(v, paddle.Tensor) and not v.place.is_gpu_place() else v)
                             for k, v in batch.items()}
                if finish is not None:   # uint8 images -> what the model sees, on the device
                    batch = finish(batch, erase_seed(sampler.seed, sampler.epoch, sampler.rank, index))
                yield batch
        finally:
            _shut_down(batches)
            record = getattr(self.dataset, "record_bad_images", None)
            if stand_ins and record is not None:   # workers cannot update the main process's dataset
                record(np.concatenate([_numpy(bad).reshape(-1) for bad in stand_ins]))

    def _load_here(self):
        for keys in self.sampler:
            batch = self.collate_fn([self.items[key] for key in keys])
            yield {name: paddle.to_tensor(value) for name, value in batch.items()}


def _shut_down(batches):
    """Stop a pass's DataLoader iterator and its worker processes (a generator: close it). Paddle's
    multi-process iterator stops its workers in ``__del__``, which a pass left early does not reach: the
    iterator's own reader thread still refers to it (paddle/io/dataloader/dataloader_iter.py)."""
    if hasattr(batches, "close"):
        batches.close()
        return
    stop = getattr(batches, "_try_shutdown_all", None)
    if stop is None:
        return
    stop(_WORKER_EXIT_SECONDS)
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():   # still busy after the grace period
            worker.terminate()
            worker.join(_WORKER_EXIT_SECONDS)


def _numpy(value):
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


def build_loader(dataset, split_cfg, collate_fn, train, seed=0, rank=0, world_size=1):
    """A ``Loader`` for ``dataset`` from a ``data.<split>`` config section.

    Training shuffles and drops the last incomplete batch; evaluation keeps order and everything.
    ``split_cfg['batch_size']`` and ``num_workers`` are per process.
    """
    return Loader(dataset, split_cfg["batch_size"], collate_fn, num_workers=split_cfg.get("num_workers", 0),
                  shuffle=train, drop_last=train, seed=seed, rank=rank, world_size=world_size)
