#!/usr/bin/env python
"""DAB-Deformable-DETR R50 (ours) vs HF `DeformableDetrForObjectDetection` with box refinement, same backbone
(ResNet-50, stem frozen), 4 levels, 4 points, 300 queries, 6+6 layers, FFN 2048, dropout 0; random weights.

    PYTHONPATH=. python benchmarks/compare_hf_deformable.py [--quick] [--device cuda] [--jsonl out.jsonl]

Rows (median ms, ours / HF): inference at 640x640 (batch 1), a training step at 2x512x512 (forward, losses,
backward, AdamW) with the peak memory above the loaded models (RSS on the CPU, the allocator on CUDA), and the
deformable attention alone on the encoder's input of a 640x640 image without gradients, once per sampling path of
ours (`embedding_bag` gather, the inference default, and `grid_sample`, the training path; both modules hold the
same weights; their outputs are compared). `--cpu-time` times with this process's CPU time instead of wall time
(steadier on a shared machine, meaningful with one thread). The two models differ by design in the decoder's query
path (DAB: anchors + sine embedding MLP; HF: learned query positions), so only speed is compared for them.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.measure import (  # noqa: E402
    Report, alternate, cuda_peak_increase, max_abs_diff, median_ms, peak_rss_increase, print_table, write_jsonl,
)
from benchmarks.models import (  # noqa: E402
    CONFIG_DIR, NUM_CLASSES, hf_infer, hf_train_step, make_images, make_targets, ours_infer, ours_train_step,
)


def hf_deformable_r50(num_classes: int = NUM_CLASSES, seed: int = 0):
    import transformers

    config = transformers.DeformableDetrConfig(
        use_pretrained_backbone=False, num_labels=num_classes, with_box_refine=True, two_stage=False,
        num_queries=300, num_feature_levels=4, encoder_n_points=4, decoder_n_points=4, encoder_ffn_dim=2048,
        decoder_ffn_dim=2048, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, auxiliary_loss=True,
        disable_custom_kernels=True,
    )
    torch.manual_seed(seed)
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    model.model.backbone.model.conv1.weight.requires_grad_(False)  # our freeze_at=1 (stem frozen)
    return model


def ours_deformable_r50(num_classes: int = NUM_CLASSES, seed: int = 0):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "models", "dab_deformable_detr_r50.py"))
    cfg.model.num_classes = num_classes
    torch.manual_seed(seed)
    return instantiate(cfg.model).eval()


def attention_pair(device: str, size: int = 640, sampling: str = "auto"):
    """Our `MSDeformAttn` (sampling path `sampling`) and HF's module with the same weights, and encoder-like
    inputs of a `size` image."""
    import transformers
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    from dab_detr.modeling.deformable_transformer import encoder_reference_points
    from dab_detr.modeling.ms_deform_attn import MSDeformAttn

    torch.manual_seed(0)
    ours = MSDeformAttn(256, 4, 8, 4, sampling=sampling)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    config = transformers.DeformableDetrConfig(d_model=256, num_feature_levels=4, disable_custom_kernels=True)
    hf = DeformableDetrMultiscaleDeformableAttention(config, num_heads=8, n_points=4)
    hf.load_state_dict(ours.state_dict())
    ours, hf = ours.to(device).eval(), hf.to(device).eval()
    shapes = [(size // s, size // s) for s in (8, 16, 32, 64)]
    seq = sum(h * w for h, w in shapes)
    x = torch.randn(1, seq, 256, device=device)
    ref = encoder_reference_points(shapes, torch.ones(1, 4, 2, device=device))
    shapes_t = torch.tensor(shapes, device=device)
    starts = torch.cat((shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]))
    valid = torch.ones(1, seq, dtype=torch.bool, device=device)

    def run_ours():
        return (ours(x, ref, x, shapes, ~valid),)

    def run_hf():
        return (hf(x, attention_mask=valid, encoder_hidden_states=x, reference_points=ref, spatial_shapes=shapes_t,
                   spatial_shapes_list=shapes, level_start_index=starts)[0],)

    return run_ours, run_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test, not a measurement)")
    parser.add_argument("--jsonl", default=None, help="also write the rows here")
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time (use one thread)")
    args = parser.parse_args(argv)
    warmup, runs = (1, 2) if args.quick else (2, 6)
    report = Report(args.quick)
    dev = args.device
    clock = {"clock": time.process_time} if args.cpu_time else {}

    report.log("attention module without gradients, encoder input of a 640x640 image")
    run_gather, run_hf = attention_pair(dev, sampling="gather")
    run_grid, _ = attention_pair(dev, sampling="grid_sample")
    with torch.no_grad():
        diffs = {"gather": max_abs_diff(run_gather(), run_hf()), "grid_sample": max_abs_diff(run_grid(), run_hf())}
        ms = median_ms(alternate({"gather": run_gather, "grid_sample": run_grid, "hf": run_hf}, warmup, runs, dev,
                                 **clock))
    for path in ("gather", "grid_sample"):
        report.add(f"attention forward 640, {path} (ms)", ms[path], ms["hf"], max_abs_diff=diffs[path])

    report.log("building the R50 models")
    ours, hf = ours_deformable_r50().to(dev), hf_deformable_r50().to(dev)
    report.add("parameters", sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in hf.parameters()))

    report.log("inference 1x640x640")
    images = make_images(1, (640, 640), device=dev)
    with torch.no_grad():
        ms = median_ms(alternate({"ours": ours_infer(ours, images), "hf": hf_infer(hf, images)}, warmup, runs, dev,
                                 **clock))
    report.add("inference 1x640x640 (ms)", ms["ours"], ms["hf"])
    peak = cuda_peak_increase if dev == "cuda" else peak_rss_increase
    with torch.no_grad():
        mem = {name: peak(run, calls=1)[0] for name, run in (("ours", ours_infer(ours, images)),
                                                              ("hf", hf_infer(hf, images)))}
    report.add("peak memory, inference (MiB)", mem["ours"], mem["hf"])

    report.log("training step 2x512x512")
    ours.train(), hf.train()
    images = make_images(2, (512, 512), device=dev)
    targets = make_targets(2, device=dev)
    steps = {"ours": ours_train_step(ours, images, targets), "hf": hf_train_step(hf, images, targets)}
    ms = median_ms(alternate(steps, 1, max(2, runs // 2), dev, **clock))
    report.add("train step 2x512x512 (ms)", ms["ours"], ms["hf"])
    mem = {name: peak(step, calls=1)[0] for name, step in steps.items()}
    report.add("peak memory, train step (MiB)", mem["ours"], mem["hf"])

    print_table("DAB-Deformable-DETR R50 vs HF Deformable DETR (box refine)", report.rows)
    write_jsonl(args.jsonl, report.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
