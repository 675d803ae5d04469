"""configs/dab_detr_synthetic.py with denoising training (DN-DETR) on: the same model, data, schedule and seed, so
the two runs compare DN on vs off (`--config-file` either file, same overrides).

Only `dn` and its three options differ; the matching queries keep zero content (no pattern), so that the
denoising queries are the one change.
"""
from .dab_detr_synthetic import dataloader, lr_multiplier, model, optimizer, train

model.head.dn = True
model.head.denoising_groups = 5
model.head.label_noise_prob = 0.2
model.head.box_noise_scale = 0.4
train.output_dir = "./output/dn_synthetic"
