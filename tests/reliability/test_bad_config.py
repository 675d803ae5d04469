"""Bad configuration: one clear error before training starts, and train_net exits 1 with one readable line."""
import os

import pytest
from detectron2.config import LazyConfig

from dab_detr.config_checks import apply_overrides_checked
from dab_detr.errors import ConfigError
from reliability_helpers import (
    CONFIG,
    assert_one_line_error,
    dataset_args,
    default_images,
    run_train_net,
    run_train_net_in_process,
    write_coco,
)


@pytest.fixture(scope="module")
def cfg_file():
    return LazyConfig.load(CONFIG)


@pytest.fixture
def cfg(cfg_file):
    return LazyConfig.load(CONFIG)


# --------------------------------------------------------------------------------------------------------------
# apply_overrides_checked, in process


def test_valid_overrides_of_every_kind_are_applied(cfg):
    apply_overrides_checked(cfg, [
        "train.max_iter=7",  # int
        "optimizer.lr=1",  # int where a float is expected: becomes 1.0
        "train.amp.enabled=true",  # bool
        "model.backbone.stages.widths=[8,16,32]",  # list
        "train.output_dir=/tmp/x",  # str
        "dataloader.train.dataset.names=[a,b]",  # one name or a list of names
        "dataloader.train.aspect_ratio_grouping=false",  # an argument of the LazyCall, left at its default
        "+train.my_new_key=3",  # '+' adds a key on purpose
    ])
    assert cfg.train.max_iter == 7 and cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.amp.enabled is True and list(cfg.model.backbone.stages.widths) == [8, 16, 32]
    assert list(cfg.dataloader.train.dataset.names) == ["a", "b"]
    assert cfg.dataloader.train.aspect_ratio_grouping is False and cfg.train.my_new_key == 3


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.max_iterr=10", ["unknown config key 'train.max_iterr'", "did you mean 'train.max_iter'"]),
        ("trian.max_iter=10", ["'trian' does not exist", "did you mean 'train'"]),
        ("model.head.hidden_dimm=8", ["DabDetrHead has no argument 'hidden_dimm'", "'model.head.hidden_dim'"]),
        ("train.max_iter=abc", ["train.max_iter expects an integer", "got str 'abc'"]),
        ("train.max_iter=1.5", ["train.max_iter expects an integer"]),
        ("optimizer.lr=fast", ["optimizer.lr expects a number"]),
        ("train.amp.enabled=1", ["train.amp.enabled expects true or false"]),
        ("model.backbone.stages.widths=8", ["expects a list"]),
        ("train.checkpointer=5", ["train.checkpointer is a group of settings"]),
        ("train.max_iter.x=1", ["train.max_iter is a value (int), not a group"]),
        ("train.max_iter", ["cannot parse the override 'train.max_iter'", "expected KEY=VALUE"]),
        ("--resume", ["options must come before the KEY=VALUE overrides"]),
    ],
)
def test_bad_override_is_one_clear_config_error(cfg, override, fragments):
    with pytest.raises(ConfigError) as e:
        apply_overrides_checked(cfg, [override])
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_detectron2_would_have_accepted_the_misspelt_key_silently(cfg):
    """Why the check exists: LazyConfig.apply_overrides adds the unknown key and trains with the default."""
    default_max_iter = cfg.train.max_iter
    LazyConfig.apply_overrides(cfg, ["train.max_iterr=10"])
    assert cfg.train.max_iterr == 10 and cfg.train.max_iter == default_max_iter != 10


# --------------------------------------------------------------------------------------------------------------
# tools/train_net.py


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return write_coco(str(tmp_path_factory.mktemp("cfg_data")), default_images(4))


@pytest.mark.slow
def test_train_net_exits_1_with_one_line_on_an_unknown_key(tiny_dataset, tmp_path):
    """The real process: exit status and stderr as a user sees them."""
    proc = run_train_net(
        ["--num-gpus", "0", *dataset_args(tiny_dataset)], ["train.max_iterr=10", f"train.output_dir={tmp_path}"]
    )
    assert_one_line_error(proc, "unknown config key 'train.max_iterr'", "did you mean 'train.max_iter'")
    assert not os.path.exists(tmp_path / "config.yaml")  # stopped before setting anything up


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.max_iter=abc", ["train.max_iter expects an integer"]),
        ("model.num_classes=7", ["model.num_classes=7 was given", "have 3 categories"]),
        ("train.init_checkpoint=/nonexistent/model_final.pth", ["train.init_checkpoint: no such file",
                                                                 "/nonexistent/model_final.pth"]),
        ("dataloader.train.total_batch_size=3", []),  # set below for 2 processes
        ("train.checkpointer.period=0", ["train.checkpointer.period=0: must be >= 1"]),
    ],
)
def test_train_net_stops_before_training_on_a_bad_value(tiny_dataset, tmp_path, capsys, override, fragments):
    options = ["--num-gpus", "0", *dataset_args(tiny_dataset)]
    if override.startswith("dataloader.train.total_batch_size"):
        # checked in this process before 2 processes are started
        options = ["--num-gpus", "2", "--dist-url", "auto", *dataset_args(tiny_dataset)]
        fragments = ["total_batch_size=3: must be divisible by the number of processes (2)"]
    proc = run_train_net_in_process(options, [override, f"train.output_dir={tmp_path}"], capsys)
    assert_one_line_error(proc, *fragments)
    assert not os.path.exists(tmp_path / "config.yaml")


def test_train_net_names_a_half_written_init_checkpoint(tiny_dataset, tmp_path, capsys):
    path = tmp_path / "model_half.pth"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # the first bytes of a torch zip checkpoint, then nothing
    proc = run_train_net_in_process(
        ["--num-gpus", "0", *dataset_args(tiny_dataset)],
        [f"train.init_checkpoint={path}", f"train.output_dir={tmp_path / 'out'}"], capsys,
    )
    assert_one_line_error(proc, f"{path}: not a readable checkpoint")
