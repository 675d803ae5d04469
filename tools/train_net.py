#!/usr/bin/env python
"""Train and evaluate DAB-DETR with detectron2's LazyConfig machinery.

    python tools/train_net.py --config-file configs/dab_detr_r50_50ep.py --num-gpus 8
    python tools/train_net.py --config-file CFG --eval-only train.init_checkpoint=model_final.pth
    python tools/train_net.py --config-file CFG --register-coco mine train.json images/ \
        dataloader.train.dataset.names=mine dataloader.test.dataset.names=mine

Everything model-specific lives in `dab_detr`; this file only wires detectron2's trainer, hooks, checkpointer,
evaluator and `launch` together (as detectron2's tools/lazyconfig_train_net.py does), adding gradient clipping,
AMP, the class count taken from the dataset, `--register-coco`, checked overrides, an exactly resumable data
stream, and one-line errors for bad data/configuration (docs/reliability.md). Without a GPU, `--num-gpus N`
starts N CPU processes (gloo).
"""
import logging
import re
import sys
import time

from detectron2.config import instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

import dab_detr  # noqa: F401  (registers DABDETR; the synthetic config registers its datasets)
from dab_detr.class_metadata import DatasetMetadata, apply_checkpoint_classes
from dab_detr.cli import add_register_coco_argument, parse_args_with_overrides
from dab_detr.config_checks import apply_overrides_checked, check_train_config, load_lazy_config
from dab_detr.data.coco import num_classes_of, register_coco_datasets, sync_num_classes
from dab_detr.engine import (
    DetrCheckpointer,
    DetrTrainer,
    ParametersInSyncCheck,
    create_ddp_model,
    keep_freed_memory,
    launch_cli,
    log_to_file,
    set_cpu_threads,
)
from dab_detr.engine.launch import MALLOC_TUNING_ENV
from dab_detr.evaluation import enable_faster_coco_eval

logger = logging.getLogger("dab_detr")


def build_parser():
    parser = default_argument_parser(epilog=__doc__)
    add_register_coco_argument(
        parser, "register a COCO-format dataset under NAME before the config is built (repeatable)"
    )
    parser.add_argument(
        "--reinit-classifier", action="store_true",
        help="load train.init_checkpoint even if its class count differs from the dataset's, "
        "re-initialising the classifier",
    )
    return parser


def _explicit_num_classes(opts):
    for opt in opts or []:
        m = re.fullmatch(r"model\.num_classes=(\d+)", opt)
        if m:
            return int(m.group(1))
    return None


def load_config(args):
    """LazyConfig + checked command-line overrides + the class count from the dataset(s), checked."""
    register_coco_datasets(args.register_coco)
    cfg = apply_overrides_checked(load_lazy_config(args.config_file), args.opts)
    _sync_classes(cfg, args)
    check_train_config(
        cfg, world_size=max(1, args.num_gpus) * args.num_machines, resume=args.resume, eval_only=args.eval_only
    )
    return cfg


def _sync_classes(cfg, args):
    """--eval-only: the classes stored in the checkpoint, checked against the test dataset(s) only (the training
    set need not be registered); otherwise the class count of the datasets."""
    if args.eval_only:
        names = cfg.dataloader.test.dataset.names
        names = [names] if isinstance(names, str) else list(names)
        num_classes_of(names)  # registered (or an error naming --register-coco), and they agree
        if apply_checkpoint_classes(cfg, cfg.train.init_checkpoint, names) is not None:
            return
    sync_num_classes(cfg, explicit=_explicit_num_classes(args.opts))


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _with_wall_time(results, clock):
    """Evaluation results plus `wall/minutes` since training started in this process, so that
    tools/plot_metrics.py can compare runs at equal wall time."""
    if not results:
        return results
    return {**results, "wall": {"minutes": (time.perf_counter() - clock) / 60}}


def do_train(args, cfg):
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    logger.info("Model:\n{}".format(model))

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    clip = cfg.train.get("clip_grad", {"enabled": False})
    trainer = DetrTrainer(
        model, train_loader, optim,
        clip_max_norm=clip.max_norm if clip.get("enabled", False) else None,
        clip_norm_type=clip.get("norm_type", 2.0),
        amp=cfg.train.amp.enabled,
        seed=cfg.train.get("seed"),
    )
    checkpointer = DetrCheckpointer(
        model, cfg.train.output_dir, trainer=trainer, reinit_classifier=args.reinit_classifier,
        # the classes of the training data, in every checkpoint (tools/demo.py and the export read them)
        dataset_metadata=DatasetMetadata.from_datasets(cfg.dataloader.train.dataset.names),
    )
    clock = time.perf_counter()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            ParametersInSyncCheck(model),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: _with_wall_time(do_test(cfg, model), clock)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period
            )
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    enable_faster_coco_eval()  # detectron2's fast COCOeval when it has no compiled _C
    cfg = load_config(args)
    default_setup(cfg, args)
    log_to_file(cfg.train.output_dir)
    set_cpu_threads()
    if str(cfg.train.device).startswith("cpu") and keep_freed_memory():
        logger.info("CPU: malloc keeps freed memory for reuse (faster steps; %s=0 turns this off)",
                    MALLOC_TUNING_ENV)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        DetrCheckpointer(model, reinit_classifier=args.reinit_classifier).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)


def cli(argv=None):
    args = parse_args_with_overrides(build_parser(), argv)  # options before, between or after the overrides
    launch_cli(main, args, precheck=load_config)


if __name__ == "__main__":
    cli(sys.argv[1:])
