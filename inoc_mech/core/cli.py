"""Command-line plumbing: flags generated from a config dataclass, and one-line errors.

    python -m inoc_mech.train --help

Every entry point turns bad input into one line `error: <what to fix>` and exit code 2;
`--debug` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


class UserError(Exception):
    """An error the user can fix; its message says how."""


def parse_config(cls, argv=None, prog=None, description=None):
    """Build `cls` (a dataclass) from command-line flags named after its fields."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(default, (list, tuple)):
            p.add_argument(flag, dest=f.name, nargs="*", default=default, help=help_)
        else:
            typ = type(default) if default is not None else str
            p.add_argument(flag, dest=f.name, type=typ, default=default, help=help_)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    ns = vars(p.parse_args(argv))
    ns.pop("debug")
    return cls(**ns)


def quiet_transformers():
    """Silence transformers' per-load progress bars and info logs (our own bars stay)."""
    from transformers.utils import logging
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def run_main(main) -> int:
    """Call `main()`, turning expected failures into one clear line on stderr and exit code 2."""
    debug = "--debug" in sys.argv
    try:
        main()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
