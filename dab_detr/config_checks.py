"""Command-line overrides that are checked, and a configuration checked before anything is built.

detectron2's `LazyConfig.apply_overrides` adds a misspelt key as a new, unused one (`train.max_iterr=10` trains
for the default length) and accepts any type (`train.max_iter=abc` fails hours later or deep in a stack trace).
Here an override must name an existing key, or an argument of the callable its group configures (`LazyCall`
arguments left at their defaults are not in the config), and its value must have the type of the current value.
Prefix a key with `+` to add a new one on purpose (hydra's syntax).
"""
import difflib
import inspect
import os
from typing import List, Sequence

from detectron2.config import LazyConfig
from detectron2.utils.file_io import PathManager
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError, MissingFileError

__all__ = ["load_lazy_config", "apply_overrides_checked", "check_train_config"]

_NO_CHECK = object()


def load_lazy_config(config_file: str):
    if not os.path.isfile(config_file):
        raise MissingFileError(f"--config-file: no such file: {config_file}")
    return LazyConfig.load(config_file)


def apply_overrides_checked(cfg, overrides: Sequence[str]):
    """Apply hydra-syntax `KEY=VALUE` overrides to `cfg` in place; a bad key or type is a `ConfigError`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides or []:
        if text.startswith("-"):
            raise ConfigError(f"{text!r}: command-line options must come before the KEY=VALUE overrides")
        try:
            override = parser.parse_override(text)
        except Exception as e:  # hydra's parse errors carry an ANTLR message on the first line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"cannot parse the override {text!r} ({first}); expected KEY=VALUE") from e
        if override.is_delete():
            raise ConfigError(f"{text!r}: deleting keys (~KEY) is not supported")
        key, value = override.key_or_group, override.value()
        node, leaf = _parent_node(cfg, key)
        if not override.is_add():
            value = _checked_value(cfg, node, key, leaf, value, text)
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def _parent_node(cfg, key: str):
    """The config group holding `key`'s last part, or a `ConfigError` naming the first part that is not one."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[: i + 1])
        if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            raise ConfigError(_unknown_key_message(cfg, key, prefix, node, part))
        if not isinstance(node, (DictConfig, ListConfig)):
            raise ConfigError(f"{key}: {prefix} is a value ({type(node).__name__}), not a group of settings")
    return node, parts[-1]


def _unknown_key_message(cfg, key: str, prefix: str, node, part: str) -> str:
    message = f"unknown config key {key!r}: {prefix!r} does not exist"
    if isinstance(node, DictConfig):
        close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=3)
        if close:
            base = prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""
            message += " (did you mean " + " or ".join(repr(base + c) for c in close) + "?)"
    return message + ". Prefix the override with '+' to add a new key on purpose."


def _checked_value(cfg, node, key: str, leaf: str, value, text: str):
    if isinstance(node, ListConfig):
        if not (leaf.isdigit() and int(leaf) < len(node)):
            raise ConfigError(f"{key}: index {leaf} is out of range for a list of {len(node)}")
        current = OmegaConf.select(cfg, key, default=_NO_CHECK, throw_on_resolution_failure=False)
        return _converted(current, value, key, text)
    if leaf in node:
        current = _current_value(cfg, node, key, leaf)
        return _converted(current, value, key, text)
    target = node.get("_target_") if "_target_" in node else None
    if target is not None:
        params = _target_parameters(target)
        if params is None or leaf in params:
            default = params[leaf].default if params is not None else inspect.Parameter.empty
            current = _NO_CHECK if default is inspect.Parameter.empty else default
            return _converted(current, value, key, text)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            name = target if isinstance(target, str) else f"{target.__module__}.{target.__qualname__}"
            accepted = [p for p, v in params.items() if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
            raise ConfigError(
                f"unknown config key {key!r}: {name} has no argument {leaf!r}"
                + _did_you_mean(leaf, accepted, key)
            )
        return value
    raise ConfigError(
        f"unknown config key {key!r}"
        + _did_you_mean(leaf, [str(k) for k in node.keys()], key)
        + ". Prefix the override with '+' to add a new key on purpose."
    )


def _did_you_mean(leaf: str, candidates: List[str], key: str) -> str:
    close = difflib.get_close_matches(leaf, candidates, n=3)
    if not close:
        return ""
    base = key.rsplit(".", 1)[0] + "." if "." in key else ""
    return " (did you mean " + " or ".join(repr(base + c) for c in close) + "?)"


def _current_value(cfg, node: DictConfig, key: str, leaf: str):
    if OmegaConf.is_interpolation(node, leaf):
        try:
            return OmegaConf.select(cfg, key)
        except Exception:  # an interpolation that only resolves later (e.g. relative to a callable's node)
            return _NO_CHECK
    return node[leaf]


def _target_parameters(target):
    try:
        fn = locate(target) if isinstance(target, str) else target
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError, ImportError):  # builtins without signatures, unimportable names
        return None


def _converted(current, value, key: str, text: str):
    """`value` if it fits the type of `current` (ints become floats where floats are expected), else an error."""
    if current is _NO_CHECK or current is None or value is None:
        return value

    def fail(expected: str):
        got = type(value).__name__
        return ConfigError(f"{text!r}: {key} expects {expected} (current value {current!r}), got {got} {value!r}")

    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise fail("true or false")
    elif isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
    elif isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        value = float(value)
    elif isinstance(current, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a name or path that happens to look like a number
        elif not isinstance(value, (str, list)):  # dataset `names` may be one name or a list
            raise fail("a string")
    elif isinstance(current, (list, tuple, ListConfig)):
        if not isinstance(value, (list, tuple)):
            raise fail("a list, e.g. [1,2]")
    elif isinstance(current, (dict, DictConfig)):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{text!r}: {key} is a group of settings; override its fields instead (e.g. {key}.FIELD=VALUE)"
            )
    return value


def check_train_config(cfg, *, world_size: int, resume: bool, eval_only: bool = False) -> None:
    """Values that would otherwise fail after the model and data are built, or silently misbehave."""

    def get(key: str):
        return OmegaConf.select(cfg, key, default=None)

    def require(ok: bool, key: str, rule: str):
        if not ok:
            raise ConfigError(f"{key}={get(key)!r}: {rule}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not eval_only:
        require(is_int(get("train.max_iter")) and get("train.max_iter") >= 1, "train.max_iter", "must be >= 1")
        require(
            is_int(get("train.checkpointer.period")) and get("train.checkpointer.period") >= 1,
            "train.checkpointer.period", "must be >= 1",
        )
        require(is_int(get("train.eval_period")) and get("train.eval_period") >= 0, "train.eval_period",
                "must be >= 0 (0: evaluate only at the end)")
        require(is_int(get("train.log_period")) and get("train.log_period") >= 1, "train.log_period", "must be >= 1")
        batch = get("dataloader.train.total_batch_size")
        require(is_int(batch) and batch >= 1, "dataloader.train.total_batch_size", "must be >= 1")
        require(
            batch % world_size == 0, "dataloader.train.total_batch_size",
            f"must be divisible by the number of processes ({world_size})",
        )
    seed = get("train.seed")
    require(seed is None or is_int(seed), "train.seed", "must be an integer (< 0: a random seed)")
    device = get("train.device")
    if isinstance(device, str) and device.startswith("cuda"):
        import torch

        require(torch.cuda.is_available(), "train.device", "CUDA is not available on this machine; use cpu")

    init = get("train.init_checkpoint")
    output_dir = get("train.output_dir") or ""
    resuming = resume and PathManager.exists(os.path.join(output_dir, "last_checkpoint"))
    if init and not resuming and "://" not in init and not os.path.isfile(init):
        raise MissingFileError(f"train.init_checkpoint: no such file: {init}")
