"""A training data loader whose batches are a function of (seed, iteration): `--resume` continues the exact stream.

detectron2's `build_detection_train_loader` restarts its `TrainingSampler` stream on resume (the first batches
after a resume repeat the first batches of the run), its aspect-ratio grouping keeps a buffer that is lost, and its
augmentations draw from per-worker RNGs seeded once per process. Here:

- the index stream is `TrainingSampler`'s (same seed, same permutations), cut into *global* batches of
  `total_batch_size`; batch i is the same whatever the number of processes or data-loading workers, and rank r
  takes its slice of it. Resuming at iteration i replays only indices (cheap), never images;
- aspect-ratio grouping (by the dataset's `width`/`height`) is done on indices, so it replays too;
- the RNGs the mapper uses (numpy, python, torch) are seeded from (seed, position in the stream) before each
  image, so augmentations do not depend on workers or on where the run was resumed;
- a mapper returning None (an unreadable image) is replaced by an image drawn from the same seeded RNG.
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
from detectron2.utils.registry import _convert_target_to_string

from ..errors import ConfigError, DatasetError

__all__ = [
    "TrainBatchSchedule",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "build_train_loader",
    "derived_seed",
]

logger = logging.getLogger(__name__)

# Unreadable images in a row before the loader gives up (each is logged by the mapper).
MAX_REPLACEMENTS = 20


def derived_seed(*numbers: int) -> int:
    """A 32-bit seed mixing `numbers` (a seed and positions); nearby inputs give unrelated seeds."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


def _index_stream(size: int, seed: int, shuffle: bool) -> Iterator[int]:
    """detectron2 `TrainingSampler`'s infinite stream: one permutation of range(size) per epoch."""
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


def _identity(x):
    return x


class _BatchStream(torchdata.IterableDataset):
    """This process's batches from global batch `start` on, split among the DataLoader's workers."""

    def __init__(self, dataset, mapper, schedule, batch_size, rank, seed, start, collate_fn):
        self.dataset = dataset
        self.mapper = mapper
        self.schedule = schedule
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.start = start
        self.collate_fn = collate_fn

    def __iter__(self):
        worker = torchdata.get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for i, batch in enumerate(self.schedule.batches(self.start)):
            # the DataLoader takes batches from its workers round-robin, so batch i comes from worker i % N
            if i % num_workers != worker_id:
                continue
            items = [self._map(pos, index, restore=worker is None) for pos, index in batch[lo:hi]]
            yield items if self.collate_fn is None else self.collate_fn(items)

    def _map(self, pos: int, index: int, restore: bool):
        for attempt in range(MAX_REPLACEMENTS + 1):
            seed = derived_seed(self.seed, pos, attempt)
            with _seeded_rngs(seed, restore):
                out = self.mapper(self.dataset[index])
            if out is not None:
                return out
            index = random.Random(seed).randrange(len(self.dataset))
        raise DatasetError(
            f"the data mapper skipped {MAX_REPLACEMENTS + 1} images in a row (see the warnings above for the "
            "files); is the image folder right?"
        )


class ResumableTrainLoader:
    """An iterable of this process's training batches (lists of mapped dicts, or `collate_fn` of them).

    `set_start_iter(i)` before iterating makes the first batch global batch i (`DetrTrainer.train` calls it), so
    a run resumed at iteration i sees the batches, and the augmentations, that an uninterrupted run would.
    """

    def __init__(
        self,
        dataset,
        mapper: Optional[Callable],
        total_batch_size: int,
        *,
        seed: int,
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
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        group_ids = _aspect_groups(dataset) if aspect_ratio_grouping else None
        self.dataset = dataset
        self.mapper = _identity if mapper is None else mapper
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
        stream = _BatchStream(
            self.dataset, self.mapper, self.schedule, self.batch_size, self.rank, self.seed, self.start_iter,
            self.collate_fn,
        )
        loader = torchdata.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            # the workers' own seeds do not matter (each image is seeded); a generator keeps the DataLoader from
            # drawing its base seed from the global RNG of the training process
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)


def _aspect_groups(dataset) -> Optional[List[int]]:
    groups = []
    for i in range(len(dataset)):
        d = dataset[i]
        if "width" not in d or "height" not in d:
            logger.warning("Aspect-ratio grouping needs 'width'/'height' in every dataset dict: grouping disabled")
            return None
        groups.append(0 if d["width"] > d["height"] else 1)
    return groups


def build_resumable_train_loader(
    dataset,
    *,
    mapper,
    sampler=None,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    collate_fn=None,
    seed: Optional[int] = None,
    shuffle: bool = True,
):
    """Drop-in for detectron2's `build_detection_train_loader` (same arguments, plus `seed` and `shuffle`).

    Returns a :class:`ResumableTrainLoader`; with a custom `sampler` or an iterable dataset it falls back to
    detectron2's loader (a resumed run then restarts that stream, as in detectron2).
    """
    if sampler is not None or isinstance(dataset, torchdata.IterableDataset):
        logger.warning(
            "A custom sampler or an iterable dataset: using detectron2's train loader; after --resume its data "
            "stream restarts from the beginning"
        )
        return build_detection_train_loader(
            dataset, mapper=mapper, sampler=sampler, total_batch_size=total_batch_size,
            aspect_ratio_grouping=aspect_ratio_grouping, num_workers=num_workers, collate_fn=collate_fn,
        )
    if seed is None or seed < 0:
        seed = comm.shared_random_seed() % 2**31
        logger.warning(f"No data seed was given: using {seed}; --resume cannot reproduce the data order")
    return ResumableTrainLoader(
        dataset, mapper, total_batch_size, seed=seed, shuffle=shuffle,
        aspect_ratio_grouping=aspect_ratio_grouping, num_workers=num_workers, collate_fn=collate_fn,
    )


_D2_TRAIN_LOADERS = ("detectron2.data.build.build_detection_train_loader",
                     "detectron2.data.build_detection_train_loader")


def build_train_loader(loader_cfg, seed: Optional[int]):
    """Instantiate `cfg.dataloader.train`; detectron2's `build_detection_train_loader` is replaced by
    :func:`build_resumable_train_loader` with the same arguments and the given seed (normally `train.seed`)."""
    from detectron2.config import instantiate
    from omegaconf import OmegaConf

    target = loader_cfg.get("_target_")
    name = target if isinstance(target, str) else _convert_target_to_string(target)
    ours = target is build_resumable_train_loader or name.endswith(".build_resumable_train_loader")
    if name in _D2_TRAIN_LOADERS or ours:
        loader_cfg = OmegaConf.create(loader_cfg, flags={"allow_objects": True})  # a copy: cfg stays as written
        loader_cfg._target_ = build_resumable_train_loader
        if loader_cfg.get("seed") is None:
            loader_cfg.seed = seed
    else:
        logger.warning(f"Train loader {name} is not detectron2's: after --resume its data stream may restart")
    return instantiate(loader_cfg)
