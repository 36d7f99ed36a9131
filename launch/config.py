"""The training job's settings: one table of keys, read strictly from TOML and the command line.

A config file has the sections of :data:`SPEC`, each with only the keys listed there.
An unknown section or key, a value of the wrong type, or a value outside the allowed
ones is an error naming it and what is allowed. Every key is also a command-line flag
(``n_layer`` -> ``--n-layer``) that overrides the file. Precedence: defaults < file <
command line.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["Key", "SPEC", "ConfigError", "load_toml", "build_parser", "resolve", "parse", "flat_keys"]

OPTIMIZERS = ("sharded-novograd", "novograd", "adamw", "deepspeed")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    help: str
    choices: Optional[Tuple] = None
    check: Optional[Callable[[Any], bool]] = None
    check_text: str = ""
    nargs: Optional[int] = None  # for list-valued keys


def _positive(x):
    return x > 0


def _non_negative(x):
    return x >= 0


SPEC: Dict[str, Dict[str, Key]] = {
    "model": {
        "n_layer": Key(int, 2, "transformer blocks", check=_positive, check_text="> 0"),
        "n_head": Key(int, 4, "attention heads per block (must divide d_model)", check=_positive,
                      check_text="> 0"),
        "d_model": Key(int, 128, "width of the residual stream", check=_positive, check_text="> 0"),
        "seq_len": Key(int, 128, "context length in bytes", check=_positive, check_text="> 0"),
    },
    "data": {
        "max_bytes": Key(int, 4_000_000, "bytes of standard-library source to read (train + validation)",
                         check=lambda x: x >= 10_000, check_text=">= 10000"),
        "val_fraction": Key(float, 0.05, "fraction of files held out for validation",
                            check=lambda x: 0 < x < 0.5, check_text="in (0, 0.5)"),
        "batch_size": Key(int, 8, "sequences per rank per step", check=_positive, check_text="> 0"),
        "eval_windows": Key(int, 64, "validation sequences per evaluation (split over ranks)",
                            check=_positive, check_text="> 0"),
    },
    "optim": {
        "optimizer": Key(str, "sharded-novograd", "what updates the weights", choices=OPTIMIZERS),
        "lr": Key(float, 0.01, "peak learning rate",
                  check=_positive, check_text="> 0"),
        "betas": Key(list, [0.95, 0.98], "first and second moment coefficients", nargs=2,
                     check=lambda b: all(0 <= x < 1 for x in b), check_text="each in [0, 1)"),
        "eps": Key(float, 1e-8, "added to the denominator", check=_positive, check_text="> 0"),
        "weight_decay": Key(float, 0.0, "weight decay (NovoGrad: inside the moment; AdamW: decoupled)",
                            check=_non_negative, check_text=">= 0"),
        "grad_averaging": Key(bool, False, "NovoGrad: scale the moment's input by 1 - beta1"),
        "max_grad_norm": Key(float, 0.0, "clip the global gradient norm to this; 0 = no clipping",
                             check=_non_negative, check_text=">= 0"),
        "zero_stage": Key(int, 2, "sharded-novograd: 1 (gradients all-reduced) or 2 (reduce-scattered)",
                          choices=(1, 2)),
        "schedule": Key(str, "cosine", "learning rate after warm-up", choices=("cosine", "linear", "constant")),
        "warmup_steps": Key(int, 0, "linear warm-up steps; 0 = no warm-up", check=_non_negative,
                            check_text=">= 0"),
        "min_lr_ratio": Key(float, 0.1, "final learning rate / peak (cosine and linear)",
                            check=lambda x: 0 <= x <= 1, check_text="in [0, 1]"),
        "ds_config": Key(str, "configs/ds_zero2.json", "DeepSpeed JSON for --optimizer deepspeed "
                         "(relative paths: from the repository root)"),
    },
    "train": {
        "steps": Key(int, 300, "optimizer steps", check=_positive, check_text="> 0"),
        "seed": Key(int, 0, "seeds the weights and the data order", check=_non_negative, check_text=">= 0"),
        "dtype": Key(str, "fp32", "parameter dtype; see docs/usage.md for what bf16 means per optimizer",
                     choices=("fp32", "bf16")),
        "log_every": Key(int, 10, "steps between metrics records", check=_positive, check_text="> 0"),
        "eval_every": Key(int, 100, "steps between validation runs (the last step is always evaluated)",
                          check=_positive, check_text="> 0"),
        "out": Key(str, "", "output directory; empty = runs/<config name>-<optimizer>"),
        "checkpoint_dir": Key(str, "", "checkpoint directory; empty = no checkpoints"),
        "checkpoint_every": Key(int, 0, "steps between checkpoints; 0 = only at the end",
                                check=_non_negative, check_text=">= 0"),
        "stop_after": Key(int, 0, "end this launch after this step (checkpointing first when checkpoint_dir "
                          "is set), keeping the schedule of the full run; 0 = run to steps",
                          check=_non_negative, check_text=">= 0"),
        "resume": Key(bool, False, "continue from the latest checkpoint in checkpoint_dir, if any"),
        "save_model": Key(str, "", "write the final parameters (fp32, by name) to this file; empty = no"),
        "progress": Key(bool, True, "show a progress bar on rank 0"),
    },
}


def flat_keys() -> Dict[str, Tuple[str, Key]]:
    out = {}
    for section, keys in SPEC.items():
        for name, key in keys.items():
            if name in out:
                raise RuntimeError(f"key {name!r} appears in sections {out[name][0]!r} and {section!r}")
            out[name] = (section, key)
    return out


def _type_name(key: Key) -> str:
    if key.type is list:
        return f"a list of {key.nargs} numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[key.type]


def _coerce(where: str, key: Key, value: Any) -> Any:
    t = key.type
    ok = True
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif t is str:
        ok = isinstance(value, str)
    elif t is list:
        ok = (isinstance(value, (list, tuple)) and len(value) == key.nargs
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))
        value = [float(x) for x in value] if ok else value
    if not ok:
        raise ConfigError(f"{where} must be {_type_name(key)}, got {value!r}")
    if key.choices is not None and value not in key.choices:
        raise ConfigError(f"{where} must be one of {list(key.choices)}, got {value!r}")
    if key.check is not None and not key.check(value):
        raise ConfigError(f"{where} must be {key.check_text}, got {value!r}")
    return value


def load_toml(path: str) -> Dict[str, Any]:
    """Read a config file into ``{key: value}``, rejecting anything :data:`SPEC` does not list."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    out: Dict[str, Any] = {}
    for section, table in raw.items():
        if section not in SPEC:
            raise ConfigError(f"{path}: unknown section [{section}]; allowed sections: {list(SPEC)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table of keys, got {table!r}")
        for name, value in table.items():
            if name not in SPEC[section]:
                raise ConfigError(f"{path}: unknown key {name!r} in [{section}]; allowed keys in "
                                  f"[{section}]: {list(SPEC[section])}")
            out[name] = _coerce(f"{path}: [{section}] {name}", SPEC[section][name], value)
    return out


def _bool_flag(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_SECTION_NOTES = {
    "optim": "With --optimizer deepspeed, the DeepSpeed JSON (--ds-config) sets the optimizer's "
             "hyperparameters (lr, betas, eps, weight_decay), gradient clipping and ZeRO stage; "
             "the schedule here (warm-up and decay) scales the JSON's lr.",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a small byte-level GPT on this machine's Python standard library sources, "
                    "data-parallel over every rank the launcher started (torchrun, the deepspeed "
                    "launcher, mpirun, or a single process).",
        epilog="Every option except --config overrides the config file's key of the same name "
               "(dashes for underscores). Writes OUT/metrics.jsonl and OUT/loss.png.",
    )
    p.add_argument("--config", default=None, help="TOML file with [model], [data], [optim] and [train] "
                   "sections; its keys are the options below, with underscores (default: none, the "
                   "defaults below)")
    for section, keys in SPEC.items():
        grp = p.add_argument_group(f"[{section}]", _SECTION_NOTES.get(section))
        for name, key in keys.items():
            flag = "--" + name.replace("_", "-")
            text = key.help
            if key.choices is not None:
                text += f"; one of {list(key.choices)}"
            elif key.check_text:
                text += f"; {key.check_text}"
            text += f" (default: {key.default!r})"
            kw: Dict[str, Any] = dict(dest=name, default=None, help=text)
            if key.type is bool:
                kw.update(type=_bool_flag, nargs="?", const=True, metavar="BOOL")
            elif key.type is list:
                kw.update(type=float, nargs=key.nargs, metavar="X")
            else:
                kw.update(type=key.type, metavar=name.upper())
            grp.add_argument(flag, **kw)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is used instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """Defaults, then the config file, then the command line: ``{key: value}`` for every key."""
    keys = flat_keys()
    values = {name: key.default for name, (_, key) in keys.items()}
    if args.config is not None:
        values.update(load_toml(args.config))
    for name, (section, key) in keys.items():
        v = getattr(args, name)
        if v is not None:
            values[name] = _coerce(f"--{name.replace('_', '-')}", key, v)
    if values["d_model"] % values["n_head"]:
        raise ConfigError(f"n_head ({values['n_head']}) must divide d_model ({values['d_model']})")
    if values["warmup_steps"] > values["steps"]:
        raise ConfigError(f"warmup_steps ({values['warmup_steps']}) must be <= steps ({values['steps']})")
    if values["resume"] and not values["checkpoint_dir"]:
        raise ConfigError("resume needs checkpoint_dir (--checkpoint-dir DIR)")
    values["config_name"] = os.path.splitext(os.path.basename(args.config))[0] if args.config else "defaults"
    return values


def parse(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return resolve(args)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
        raise  # unreachable: parser.exit exits
