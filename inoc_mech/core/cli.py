"""Command-line plumbing: flags generated from (nested) config dataclasses, overrides as arguments, one-line errors.

    python -m inoc_mech.train --help

A config is a dataclass whose fields are plain values or other config dataclasses (its parts).
Flags are the leaf field names (`--steps`, `--lora-r`), unique across the whole tree, so nesting
never shows on the command line. The same three helpers serve every entry point:
- `parse_config(cls, argv)`: flags -> config (validation errors become one `UserError` line);
- `build(cls, **flat)`: flat leaf values -> config (what tests, sweeps and `--resume` use);
- `flatten(cfg)` / `to_args(cls, overrides)`: config or overrides -> flat dict / command-line arguments.

Every entry point turns bad input into one line `error: <what to fix>` and exit code 2 through
`run_main`, which catches only `UserError` (and its subclasses such as `data.DataError`): any other
exception is a bug and shows its traceback. `--debug` anywhere on the command line shows the
traceback of a `UserError` too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing


class UserError(Exception):
    """An error the user can fix; its message says how."""


class BadValue(UserError, ValueError):
    """A value the user gave (a flag, a prompt, a config field) is out of range or unknown."""


def _parts(cls) -> dict[str, type]:
    """Fields of `cls` that are config dataclasses themselves (its parts), with their classes."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints.get(f.name)) and f.init}


def leaf_fields(cls) -> list[dataclasses.Field]:
    """All plain (non-part) init fields of a config tree, parts expanded in place."""
    parts = _parts(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        out += leaf_fields(parts[f.name]) if f.name in parts else [f]
    names = [f.name for f in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TypeError(f"{cls.__name__}: field names must be unique across parts, repeated: {sorted(dup)}")
    return out


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def build(cls, **flat):
    """Build a (nested) config from flat leaf values; unknown names and invalid values raise UserError."""
    known = {f.name for f in leaf_fields(cls)}
    unknown = set(flat) - known
    if unknown:
        raise UserError(f"{cls.__name__} has no setting {sorted(unknown)[0]!r}")
    return _build(cls, flat)


def _build(cls, flat: dict):
    parts = _parts(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in parts:
            kwargs[f.name] = _build(parts[f.name], flat)
        elif f.name in flat:
            kwargs[f.name] = flat[f.name]
    try:
        return cls(**kwargs)
    except ValueError as e:  # validation in __post_init__: a bad value from the user
        raise BadValue(str(e)) from e


def flatten(cfg) -> dict:
    """Leaf field values of a (nested) config as one flat dict (the layout of a run's config.json)."""
    out = {}
    parts = _parts(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in parts:
            out.update(flatten(v))
        else:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def to_args(cls, overrides: dict) -> list[str]:
    """Command-line arguments that give `overrides` (flat leaf values) to an entry point configured by `cls`."""
    fields = {f.name: f for f in leaf_fields(cls)}
    args = []
    for k, v in overrides.items():
        if k not in fields:
            raise UserError(f"{cls.__name__} has no setting {k!r}")
        flag = "--" + k.replace("_", "-")
        if isinstance(_default(fields[k]), bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, (list, tuple)):
            args += [flag, *map(str, v)]
        elif v is None:
            continue
        else:
            args += [flag, repr(float(v)) if isinstance(v, float) else str(v)]
    return args


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `UserError` line (`--help` still prints the usage)."""

    def error(self, message):
        raise BadValue(f"{message} (see {self.prog} --help)")


def parser_for(cls, prog=None, description=None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in leaf_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        default = _default(f)
        if "positional" in f.metadata:  # value: argparse nargs (None: exactly one)
            p.add_argument(f.name, nargs=f.metadata["positional"], default=default, help=help_)
        elif isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(default, (list, tuple)):
            p.add_argument(flag, dest=f.name, nargs="*", default=default, help=help_)
        else:
            typ = type(default) if default is not None else str
            p.add_argument(flag, dest=f.name, type=typ, default=default, help=help_)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def parse_config(cls, argv=None, prog=None, description=None):
    """Build `cls` (a config dataclass, parts allowed) from command-line flags named after its leaf fields."""
    ns = vars(parser_for(cls, prog, description).parse_args(argv))
    ns.pop("debug")
    return build(cls, **ns)


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def quiet_transformers():
    """Silence transformers' per-load progress bars and info logs (our own bars stay)."""
    from transformers.utils import logging
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def run_main(main) -> int:
    """Call `main()`, turning the project's own errors into one clear line on stderr and exit code 2."""
    debug = "--debug" in sys.argv
    try:
        main()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        if debug:
            raise
        print(f"error: {first_line(e, 10_000)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
