"""HuggingFace `DabDetrForObjectDetection` files on disk (save_pretrained folder / model.safetensors /
pytorch_model.bin) -> a converted .pth whose model gives HF's outputs to 1e-4."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from detectron2.modeling.backbone import BasicStem, ResNet  # noqa: E402
from detectron2.structures import ImageList  # noqa: E402

from benchmarks.models import random_hf_model  # noqa: E402
from dab_detr.backbone import small_resnet_stages  # noqa: E402
from dab_detr.checkpoint.classes import coco_thing_ids  # noqa: E402
from dab_detr.checkpoint.convert import convert_checkpoint  # noqa: E402
from dab_detr.engine import DetrCheckpointer  # noqa: E402
from dab_detr.meta_arch import DABDETR  # noqa: E402
from dab_detr.modeling.dab_detr_head import DabDetrHead  # noqa: E402

# A small HF model with HF's own ResNet (basic blocks, widths 16..128) so that it saves and converts in a blink.
WIDTHS, HIDDEN, QUERIES, HEADS = [16, 32, 64, 128], 64, 12, 4


def _hf_model(num_labels):
    config = transformers.DabDetrConfig(
        use_pretrained_backbone=False, use_timm_backbone=False,
        backbone_config=transformers.ResNetConfig(
            embedding_size=WIDTHS[0], hidden_sizes=WIDTHS, depths=[1, 1, 1, 1], layer_type="basic",
            out_features=["stage4"],
        ),
        num_labels=num_labels, hidden_size=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128,
        decoder_ffn_dim=128, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, num_queries=QUERIES,
        dropout=0.0, auxiliary_loss=True,
    )
    # no identity BN / zero box deltas / centred anchors left to hide a mapping error
    return random_hf_model(config, seed=0, class_embed_std=0.5)


def _our_model(num_classes):
    backbone = ResNet(
        BasicStem(in_channels=3, out_channels=WIDTHS[0], norm="FrozenBN"),
        small_resnet_stages(depths=[1, 1, 1, 1], widths=WIDTHS, stem_width=WIDTHS[0], strides=[1, 2, 2, 2],
                            norm="FrozenBN"),
        out_features=["res5"],
    )
    head = DabDetrHead(
        num_classes=num_classes, hidden_dim=HIDDEN, num_queries=QUERIES, nheads=HEADS, num_encoder_layers=2,
        num_decoder_layers=2, dim_feedforward=128, inverse_sigmoid_eps=1e-5,  # HF's eps
    )
    return DABDETR(backbone=backbone, head=head, criterion=None, num_classes=num_classes,
                   pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0]).eval()


def _padded_batch():
    g = torch.Generator().manual_seed(3)
    images = ImageList.from_tensors([torch.randn(3, 96, 128, generator=g), torch.randn(3, 64, 80, generator=g)], 32)
    pixel_mask = torch.zeros(len(images), *images.tensor.shape[-2:], dtype=torch.long)
    for i, (h, w) in enumerate(images.image_sizes):
        pixel_mask[i, :h, :w] = 1
    return images, pixel_mask


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """The same random HF model as a save_pretrained folder and as a legacy pytorch_model.bin."""
    model = _hf_model(num_labels=6)
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(str(root / "pretrained"))
    os.makedirs(root / "legacy")
    torch.save(model.state_dict(), str(root / "legacy" / "pytorch_model.bin"))  # what older transformers wrote
    return model, root


@pytest.mark.parametrize("where", ["pretrained", "pretrained/model.safetensors", "legacy", "legacy/pytorch_model.bin"])
def test_converted_file_reproduces_huggingface_outputs(hf_files, where, tmp_path):
    hf_model, root = hf_files
    output = str(tmp_path / "converted.pth")
    report = convert_checkpoint("hf", str(root / where), output)
    assert report.unused_keys == [] and report.num_classes == 6

    ours = _our_model(6)
    DetrCheckpointer(ours).load(output)
    images, pixel_mask = _padded_batch()
    with torch.no_grad():
        labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}] * 2
        expected = hf_model(pixel_values=images.tensor, pixel_mask=pixel_mask, labels=labels)  # labels: HF's aux
        got = ours.forward_raw(images)
    assert (expected.logits[0] - expected.logits[1]).abs().max() > 1e-2  # the two images differ
    assert (got["pred_logits"] - expected.logits).abs().max() < 1e-4
    assert (got["pred_boxes"] - expected.pred_boxes).abs().max() < 1e-4
    assert len(got["aux_outputs"]) == len(expected.auxiliary_outputs) == 1
    for ours_aux, hf_aux in zip(got["aux_outputs"], expected.auxiliary_outputs):
        assert (ours_aux["pred_logits"] - hf_aux["logits"]).abs().max() < 1e-4
        assert (ours_aux["pred_boxes"] - hf_aux["pred_boxes"]).abs().max() < 1e-4


def test_hf_coco_classifier_with_91_labels_is_mapped_to_80_classes(tmp_path):
    hf_model = _hf_model(num_labels=91)  # released HF COCO checkpoints index labels by raw COCO id
    hf_model.save_pretrained(str(tmp_path / "coco"))
    report = convert_checkpoint("hf", str(tmp_path / "coco"), str(tmp_path / "out.pth"))
    assert report.num_classes == 80
    converted = torch.load(str(tmp_path / "out.pth"), weights_only=True)["model"]
    ids = coco_thing_ids()
    assert torch.equal(converted["head.class_embed.weight"], hf_model.class_embed.weight.detach()[ids])
    assert torch.equal(converted["head.class_embed.bias"], hf_model.class_embed.bias.detach()[ids])
    keep_all = convert_checkpoint("hf", str(tmp_path / "coco"), str(tmp_path / "all.pth"), class_ids="all")
    assert keep_all.num_classes == 91
