import logging

import pytest


@pytest.fixture
def dab_caplog(caplog):
    """`caplog` that also sees the `dab_detr` loggers after something (train_net) stopped their propagation."""
    logger = logging.getLogger("dab_detr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="dab_detr")
    yield caplog
    logger.removeHandler(caplog.handler)
