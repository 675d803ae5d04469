"""Test-only: a criterion that returns a NaN loss at one iteration, to test how training stops."""
import math

from detectron2.utils.events import get_event_storage
from torch import nn


class NaNLossAt(nn.Module):
    """`criterion`'s losses, with `loss_bbox` replaced by NaN at training iteration `iteration`."""

    def __init__(self, criterion: nn.Module, iteration: int):
        super().__init__()
        self.criterion = criterion
        self.iteration = iteration
        self.num_classes = criterion.num_classes

    def forward(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        if get_event_storage().iter == self.iteration:
            losses["loss_bbox"] = losses["loss_bbox"] * math.nan
        return losses
