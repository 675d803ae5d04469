"""A training data loader whose batches are a function of (seed, iteration): `--resume` continues the exact stream.

It is detectron2's `build_detection_train_loader` with two pieces of ours, for what detectron2 cannot do:

- `ResumableTrainingSampler`, a `torch.utils.data.Sampler` of this process's share of the *global* batches from
  a start iteration on. The index stream is `TrainingSampler`'s (same seed, same permutations), cut into global
  batches of `total_batch_size`, rank r taking slice r; aspect-ratio grouping (by the dataset's `width`/`height`)
  is done on these indices. detectron2's `TrainingSampler` restarts on resume and its `AspectRatioGroupedDataset`
  groups mapped images in buffers that a resume loses; indices replay cheaply, images never need to.
- `SeededMapper`, the mapper wrapper: before each image, python's, numpy's and torch's (CPU) RNGs are seeded from
  (seed, position in the stream), so augmentations depend neither on the data-loading workers nor on where the run
  was resumed; a mapper returning None (an unreadable image) gets a replacement drawn from the same seeded RNG.

detectron2 does the rest: its `MapDataset`, the per-worker sharding of the sampler in chunks of one batch (so
batch i comes from worker i % N, in order), batching and the DataLoader seeded by `seed`.
"""
import contextlib
import itertools
import logging
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.utils import comm

from ..errors import ConfigError, DatasetError

__all__ = [
    "TrainBatchSchedule",
    "ResumableTrainingSampler",
    "SeededMapper",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "derived_seed",
]

logger = logging.getLogger(__name__)

# Unreadable images in a row before the loader gives up (each is logged by the mapper).
MAX_REPLACEMENTS = 20


def derived_seed(*numbers: int) -> int:
    """A 32-bit seed mixing `numbers` (a seed and positions); nearby inputs give unrelated seeds."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


def _index_stream(size: int, seed: int, shuffle: bool) -> Iterator[int]:
    """detectron2 `TrainingSampler`'s infinite stream before its split among ranks: one permutation of range(size)
    per epoch (a test pins it to `TrainingSampler`'s)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    while True:
        if shuffle:
            yield from torch.randperm(size, generator=generator).tolist()
        else:
            yield from range(size)


class TrainBatchSchedule:
    """Global batch i of training (a list of `(stream position, dataset index)`), for i = start, start+1, ...

    Args:
        size: number of items in the dataset.
        total_batch_size: items per global batch (all processes together).
        seed: seed of the shuffle.
        shuffle: shuffle each epoch (else go through the dataset in order).
        group_ids: when given, one int per item (e.g. 0 for landscape, 1 for portrait images); each batch is
            then taken from one group, filled in stream order, as detectron2's aspect-ratio grouping does.
    """

    def __init__(
        self,
        size: int,
        total_batch_size: int,
        seed: int,
        shuffle: bool = True,
        group_ids: Optional[Sequence[int]] = None,
    ):
        if size < 1:
            raise DatasetError("the training set is empty (after filtering images without usable annotations)")
        if total_batch_size < 1:
            raise ConfigError(f"total_batch_size must be >= 1, got {total_batch_size}")
        if group_ids is not None and len(group_ids) != size:
            raise ValueError(f"group_ids has {len(group_ids)} entries for a dataset of {size}")
        self.size = size
        self.total_batch_size = total_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_ids = None if group_ids is None else list(group_ids)

    def batches(self, start: int = 0) -> Iterator[List[Tuple[int, int]]]:
        positions = enumerate(_index_stream(self.size, self.seed, self.shuffle))
        if self.group_ids is None:
            positions = itertools.islice(positions, start * self.total_batch_size, None)
            while True:
                yield list(itertools.islice(positions, self.total_batch_size))
        buckets = {}
        count = 0
        for pos, index in positions:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append((pos, index))
            if len(bucket) == self.total_batch_size:
                del buckets[self.group_ids[index]]
                if count >= start:
                    yield bucket
                count += 1


class ResumableTrainingSampler(torchdata.Sampler):
    """This process's items of global batches `start`, `start + 1`, ... of `schedule`, rank r taking slice r.

    Each item is one int, `position * size + index` (detectron2's `MapDataset` takes int keys): see
    `PositionedDataset`, which splits it again.
    """

    def __init__(self, schedule: TrainBatchSchedule, rank: int, batch_size: int, start: int = 0):
        self.schedule = schedule
        self.lo, self.hi = rank * batch_size, (rank + 1) * batch_size
        self.start = start

    def __iter__(self) -> Iterator[int]:
        for batch in self.schedule.batches(self.start):
            for pos, index in batch[self.lo:self.hi]:
                yield pos * self.schedule.size + index


class PositionedDataset(torchdata.Dataset):
    """`dataset[key % size]` with its stream position `key // size`, as the pair `(position, item)`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        pos, index = divmod(int(key), len(self.dataset))
        return pos, self.dataset[index]


@contextlib.contextmanager
def _seeded_rngs(seed: int, restore: bool):
    """Seed python's, numpy's and torch's (CPU) global RNGs; restore their states afterwards if `restore`.

    Mappers run on the CPU, so only torch's CPU generator is seeded: `torch.manual_seed` would also seed every CUDA
    device, which in a CUDA build of torch costs ~0.7 ms a call even without a GPU (a third of the data time).
    """
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class SeededMapper:
    """Map `(position, dataset dict)` with `mapper` under RNGs seeded from (seed, position); see the module doc.

    In the training process (no DataLoader worker) the RNGs' previous states are restored afterwards.
    """

    def __init__(self, mapper: Callable, dataset, seed: int):
        self.mapper = mapper
        self.dataset = dataset
        self.seed = seed

    def __call__(self, positioned):
        pos, item = positioned
        restore = torchdata.get_worker_info() is None
        for attempt in range(MAX_REPLACEMENTS + 1):
            seed = derived_seed(self.seed, pos, attempt)
            with _seeded_rngs(seed, restore):
                out = self.mapper(item)
            if out is not None:
                return out
            item = self.dataset[random.Random(seed).randrange(len(self.dataset))]
        raise DatasetError(
            f"the data mapper skipped {MAX_REPLACEMENTS + 1} images in a row (see the warnings above for the "
            "files); is the image folder right?"
        )


def _identity(x):
    return x


class ResumableTrainLoader:
    """An iterable of this process's training batches (lists of mapped dicts, or `collate_fn` of them).

    Takes `build_detection_train_loader`'s arguments (less `sampler`) plus `seed` (the configs set
    `${...train.seed}`; None or < 0 draws a random one, and resume then cannot reproduce the data order) and
    `shuffle`. `set_start_iter(i)` before iterating makes the first batch global batch i (`DetrTrainer.train` calls
    it), so a run resumed at iteration i sees the batches, and the augmentations, that an uninterrupted run would.
    Each `iter()` builds detectron2's loader on a `ResumableTrainingSampler` starting there.
    """

    def __init__(
        self,
        dataset,
        mapper: Optional[Callable],
        total_batch_size: int,
        *,
        seed: Optional[int],
        shuffle: bool = True,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        collate_fn: Optional[Callable] = None,
    ):
        world_size, self.rank = comm.get_world_size(), comm.get_rank()
        if total_batch_size % world_size != 0:
            raise ConfigError(
                f"total_batch_size={total_batch_size} is not divisible by the number of processes ({world_size})"
            )
        if len(dataset) == 0:
            raise DatasetError("the training set is empty (after filtering images without usable annotations)")
        if seed is None or seed < 0:
            seed = comm.shared_random_seed() % 2**31
            logger.warning(f"No data seed was given: using {seed}; --resume cannot reproduce the data order")
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        group_ids = _aspect_groups(dataset) if aspect_ratio_grouping else None
        self.dataset = dataset
        self.mapper = SeededMapper(_identity if mapper is None else mapper, dataset, seed)
        self.schedule = TrainBatchSchedule(len(dataset), total_batch_size, seed, shuffle, group_ids)
        self.batch_size = total_batch_size // world_size
        self.seed = seed
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.start_iter = 0

    def set_start_iter(self, start_iter: int) -> None:
        self.start_iter = int(start_iter)

    def __iter__(self):
        if self.start_iter:
            logger.info(f"Training data resumes at global batch {self.start_iter} (seed {self.seed})")
        sampler = ResumableTrainingSampler(self.schedule, self.rank, self.batch_size, self.start_iter)
        loader = build_detection_train_loader(
            PositionedDataset(self.dataset),
            mapper=self.mapper,
            sampler=sampler,
            total_batch_size=None,
            single_gpu_batch_size=self.batch_size,
            aspect_ratio_grouping=False,  # done on indices by the sampler
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            # the workers' own seeds do not matter (each image is seeded); this keeps the DataLoader from drawing
            # its base seed from the global RNG of the training process
            seed=self.seed,
        )
        return iter(loader)


# The name the configs use, next to detectron2's `build_detection_train_loader`.
build_resumable_train_loader = ResumableTrainLoader


def _aspect_groups(dataset) -> Optional[List[int]]:
    groups = []
    for i in range(len(dataset)):
        d = dataset[i]
        if "width" not in d or "height" not in d:
            logger.warning("Aspect-ratio grouping needs 'width'/'height' in every dataset dict: grouping disabled")
            return None
        groups.append(0 if d["width"] > d["height"] else 1)
    return groups
