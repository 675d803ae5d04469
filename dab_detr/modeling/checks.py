"""Constructor-argument checks shared by the detector heads: each error is one line naming the class and option."""
from typing import Any, Mapping

from .transformer import ACTIVATIONS

ANCHOR_INITS = (None, "spread")


def positive_ints(owner: str, **values: object) -> None:
    """ValueError naming `owner` and the option for the first of `values` that is not an int >= 1."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_detector_args(owner: str, a: Mapping[str, Any]) -> None:
    """The checks every DAB head makes of the options it shares: `hidden_dim`, `nheads`, `dropout`, `activation`,
    `num_patterns`, `anchor_init`, `random_refpoints_xy`, `prior_prob` (sizes: `positive_ints` first)."""
    if a["hidden_dim"] % a["nheads"]:
        raise ValueError(f"{owner}: hidden_dim ({a['hidden_dim']}) must be divisible by nheads ({a['nheads']})")
    if not 0.0 <= a["dropout"] < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {a['dropout']}")
    if a["activation"] not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {ACTIVATIONS}, got {a['activation']!r}")
    if not isinstance(a["num_patterns"], int) or a["num_patterns"] < 0:
        raise ValueError(f"{owner}: num_patterns must be an int >= 0, got {a['num_patterns']!r}")
    if a["anchor_init"] not in ANCHOR_INITS:
        raise ValueError(f"{owner}: anchor_init must be one of {ANCHOR_INITS}, got {a['anchor_init']!r}")
    if a["anchor_init"] == "spread" and a["random_refpoints_xy"]:
        raise ValueError(f"{owner}: random_refpoints_xy and anchor_init='spread' both set x, y; choose one")
    if not 0.0 < a["prior_prob"] < 1.0:
        raise ValueError(f"{owner}: prior_prob must be in (0, 1), got {a['prior_prob']}")
