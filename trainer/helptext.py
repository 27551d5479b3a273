"""``--help`` of the entry points: three lines of usage with examples, then every flag that
applies to the command with its default (for config flags, the chosen recipe's value) and
its allowed values. Plain Python: help is printed before TensorFlow is imported."""
from __future__ import annotations

import dataclasses
import os
import re
import textwrap

from absl import flags

from trainer import config as config_lib

WIDTH = 100
RECIPE, RUN = "recipe", "run"  # where a command's config flags take their defaults from


@dataclasses.dataclass(frozen=True)
class Usage:
    """What ``--help`` shows for one command."""

    lines: tuple[str, str, str]  # the synopsis and two examples
    flags: tuple[str, ...]  # the flags that apply, in the order shown within their group
    defaults: str = RECIPE  # RECIPE: --model/--config's YAML; RUN: --model_dir's config.yaml
    help: tuple[tuple[str, str], ...] = ()  # (flag, text): the command's own meaning of a flag


def _config_defaults(usage: Usage, values: flags.FlagValues) -> tuple[config_lib.Config | None, str]:
    """(config whose values are the defaults, where they come from) for the config flags."""
    if usage.defaults == RECIPE:
        path = config_lib.experiment_path(values["model"].value, values["config"].value)
        shown = os.path.relpath(path) if not path.startswith("gs://") else path
        return config_lib.load(values["model"].value, values["config"].value), shown
    model_dir = values["model_dir"].value if "model_dir" in values else None
    path = os.path.join(model_dir, "config.yaml") if model_dir else ""
    if path and "://" not in path and os.path.isfile(path):
        with open(path) as f:
            return config_lib.from_yaml_text(f.read(), path), path
    return None, "the run's config.yaml (--model_dir)"


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "empty"
    return "empty" if value == "" else str(value)


METAVARS = {"model": "NAME", "architecture": "vanilla|inception", "weights": "imagenet|none|FILE",
            "checkpoint": "best|last|FILE", "backup_freq": "epoch|N", "eval_name": "NAME"}


def _metavar(name: str, kind: type, choices) -> str:
    if choices:
        return "|".join(choices)
    if name in METAVARS:
        return METAVARS[name]
    if name.endswith("_dir") or name in ("src", "dst"):
        return "DIR"
    return {int: "N", float: "X", list: "A,B,..."}.get(kind, "FILE" if name == "config" else "VALUE")


def _flag_entry(name: str, values: flags.FlagValues, config,
                own_help: dict) -> tuple[str, str, str]:
    """(group, first line, help text) of one flag."""
    leaves = config_lib.leaf_fields()
    if name in own_help:
        section, leaf = leaves[name]
        kind = config_lib.field_type(section, name)
        choices, text, default, group = leaf.metadata.get("choices"), own_help[name], None, ""
    elif name in leaves:
        section, leaf = leaves[name]
        kind = config_lib.field_type(section, name)
        choices, text = leaf.metadata.get("choices"), leaf.metadata["help"]
        default = _show(getattr(getattr(config, section), name)) if config is not None else None
        group = section
    else:
        flag = values[name]
        kind = {"bool": bool, "int": int, "float": float}.get(flag.flag_type(), str)
        choices = getattr(flag.parser, "enum_values", None)
        text = re.sub(r"^<[^>]*>: ", "", flag.help)  # absl's enum prefix; the values are shown
        default, group = (_show(flag.default) if flag.default is not None else None), ""
    head = f"--[no]{name}" if kind is bool else f"--{name}={_metavar(name, kind, choices)}"
    head += f"  (default: {default})" if default is not None else ""
    return group, head, text


def render(usage: Usage, values: flags.FlagValues = flags.FLAGS) -> str:
    """The help text: usage, then the flags grouped (the command's own, then config sections)."""
    own_help = dict(usage.help)
    leaves = config_lib.leaf_fields()
    uses_config = any(name in leaves and name not in own_help for name in usage.flags)
    config, source = _config_defaults(usage, values) if uses_config else (None, "")
    entries = [_flag_entry(name, values, config, own_help) for name in usage.flags]
    groups = [""] + [g for g in config_lib.SECTIONS if any(e[0] == g for e in entries)]
    out = [f"usage: {usage.lines[0]}", *(f"   e.g. {line}" for line in usage.lines[1:]), ""]
    if any(e[0] for e in entries):
        out += [f"Config flags default to {source}; flags override it.", ""]
    for group in groups:
        chosen = [e for e in entries if e[0] == group]
        if not chosen:
            continue
        out.append(f"{group or 'flags'}:")
        for _, head, text in chosen:
            out.append(f"  {head}")
            out += textwrap.wrap(text, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
        out.append("")
    out += textwrap.wrap("Exit status: 0 success, 1 runtime failure, 2 usage or config error, "
                         "3 data error, 75 preempted (run again to resume).", WIDTH)
    return "\n".join(out)


def render_absl(values: flags.FlagValues = flags.FLAGS) -> str:
    """absl's own flags (logging, flag files), for ``--helpfull``."""
    modules = [m for m in values.flags_by_module_dict() if m.startswith("absl.")]
    return "\n".join(f"{m}:\n{values.module_help(m)}" for m in modules)
