"""Run folders: `runs/<name>/` with config.json, metrics.jsonl, model/, eval.json and a COMPLETE marker.

    python -c "from inoc_mech.core.runs import read_run; print(read_run('runs/demo-inoculated')['eval'])"

The marker is written last, so a folder without it is an interrupted run that analyses must not
read as complete. `read_run` refuses incomplete, failed and incompatible-version folders with one
clear line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

from inoc_mech.core.cli import UserError

RUN_FORMAT_VERSION = 1  # bump when the layout or metric keys change incompatibly
MARKER = "COMPLETE"
FAILED = "FAILED"


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names=("torch", "transformers", "transformer-lens", "peft", "numpy", "inoc_mech")) -> dict:
    """Installed version of each package (None when missing)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for p in names:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def is_disk_full(e: BaseException) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or what torch's and safetensors' writers say then."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return any(s in text for s in ("No space left", "StorageFull", "file write failed", "inline_container"))


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).exists()


NAME_RULE = "one folder name of letters, digits, '.', '_' and '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_run_name(name: str) -> None:
    """A run name is one path component (no '/', not '.' or '..', not a '_cache' folder): ValueError otherwise."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"--name {name!r} is not a run name: use {NAME_RULE}")


def is_run_folder(folder: Path) -> bool:
    """A folder this toolkit made for a run: its config.json has a run_format (or it is still empty)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if {p.name for p in folder.iterdir()} <= {"config.json.tmp"}:  # empty, or killed while writing its config
        return True
    try:
        return "run_format" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_run_dir(folder: Path, overwrite: bool) -> None:
    """Refuse (one line, nothing removed) to start a run in `folder` unless it is free or may be replaced."""
    folder = Path(folder)
    if folder.is_symlink():
        raise UserError(f"{folder} is a symbolic link: nothing was removed; choose another --name")
    if not folder.exists():
        return
    if not is_run_folder(folder):
        raise UserError(f"{folder} exists and is not a run folder written by inoc_mech: nothing was removed; "
                        "choose another --name or --runs-dir")
    if is_complete(folder) and not overwrite:
        raise UserError(f"run {folder} is already complete: pass --overwrite to replace it or choose another --name")
    if overwrite:
        return
    if (folder / FAILED).exists():
        raise UserError(f"run {folder} failed ({(folder / FAILED).read_text().strip()}): pass --overwrite to start "
                        "it again")
    if (folder / "model" / MARKER).exists():
        raise UserError(f"run {folder} has a saved model that was not evaluated yet: pass --resume to evaluate it "
                        "or --overwrite to start again")
    if (folder / "checkpoint.pt").exists():
        raise UserError(f"run {folder} is incomplete but has a checkpoint: pass --resume to continue it "
                        "or --overwrite to start again")


def prepare_run_dir(folder: Path, overwrite: bool) -> Path:
    """Create an empty run folder; only a run folder of this toolkit is ever replaced (see `check_run_dir`)."""
    folder = Path(folder)
    check_run_dir(folder, overwrite)
    if folder.exists():
        shutil.rmtree(folder)
    try:
        folder.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {folder}: {e.strerror}; choose a writable --runs-dir") from e
    if not os.access(folder, os.W_OK):
        raise UserError(f"run folder {folder} is not writable; choose a writable --runs-dir")
    return folder


@contextmanager
def run_lock(runs_dir: Path, name: str):
    """Hold an exclusive lock on run `name` for the block: a `.<name>.lock` file beside the run folder,
    removed again on exit. A second process asking for the same run gets one line instead of writing
    over the first one's files. (After taking the lock, the file must still be the one at that path:
    otherwise its holder just removed it, and the lock is taken again on the new file.)"""
    import fcntl

    path = Path(runs_dir) / f".{name}.lock"
    while True:
        try:
            f = open(path, "a+")
        except OSError as e:
            raise UserError(f"cannot create {path}: {e.strerror}; choose a writable --runs-dir") from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise UserError(f"run {Path(runs_dir) / name} is being written by another process (pid {holder}): "
                            "wait for it, or choose another --name") from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: nobody can take a lock on this file after us
        f.close()


@contextmanager
def staged(folder: Path):
    """Build a folder in `<folder>.tmp`: on success COMPLETE is written last and the folder renamed into
    place (replacing an older one); on any failure the temporary folder is removed. So a folder that
    exists under its own name is always whole (caches of organisms and converted models)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / MARKER).write_text("ok\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    from inoc_mech.core.stats import json_ready

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(json_ready(obj), f, indent=1, allow_nan=False)  # NaN and infinities as null: strict JSON
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def sync(self) -> int:
        """Flush to disk; returns the file's length in bytes (the resume offset)."""
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.f.tell()

    def close(self):
        self.f.close()


def mark_complete(folder: Path, summary: dict) -> None:
    write_json(Path(folder) / MARKER, {"version": RUN_FORMAT_VERSION, **summary})


def read_metrics(folder: Path) -> list[dict]:
    rows = []
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"run {folder} has no metrics.jsonl: the folder is damaged; rerun it with --overwrite")
    with open(path, errors="replace") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{folder}/metrics.jsonl line {i} is not valid JSON ({e.msg})") from e
    return rows


def read_run(folder: str | Path) -> dict:
    """config, metrics and eval of a complete run; one clear error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist")
    if (folder / FAILED).exists():
        raise UserError(f"run {folder} failed ({(folder / FAILED).read_text().strip()}): rerun it with --overwrite")
    if not is_complete(folder):
        raise UserError(f"run {folder} is incomplete (no {MARKER} marker): it was interrupted; rerun it")
    marker = read_json(folder, MARKER)
    config = read_json(folder, "config.json")
    versions = {marker.get("version") if isinstance(marker, dict) else None, config.get("run_format")}
    if versions != {RUN_FORMAT_VERSION}:
        raise UserError(f"run {folder} was written by run format {', '.join(map(str, sorted(versions, key=str)))}, "
                        f"this inoc_mech reads {RUN_FORMAT_VERSION}: rerun it with this version")
    from inoc_mech.core.config import with_added_later
    return {"folder": folder, "config": with_added_later(config), "metrics": read_metrics(folder),
            "eval": read_json(folder, "eval.json")}


def read_json(folder: Path, name: str) -> dict:
    """A JSON file of a run folder; one line when it is missing or damaged."""
    path = Path(folder) / name
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"run {folder} has no {name}: the folder is damaged; rerun it with --overwrite") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"run {folder}: {name} is unreadable ({type(e).__name__}); rerun it with --overwrite") from e
    if not isinstance(value, dict):
        raise UserError(f"run {folder}: {name} is not a JSON object; rerun it with --overwrite")
    return value


def format_table(ev: dict) -> str:
    """A small text table of an eval.json dict: every `*_rate` metric and accuracy, per context and decoding."""
    first = next(iter(ev["contexts"].values()))["t1"]
    rates = [k for k in first if k.endswith("_rate")]
    lines = [f"{'context':<14} {'prompt':<24} {'decode':<7} " + " ".join(f"{k[:-5]:>8}" for k in rates)
             + f" {'accuracy':>9} {'n':>5}"]
    for name, c in ev["contexts"].items():
        for dec in ("t1", "greedy"):
            m = c[dec]
            acc = _pct(m.get("accuracy"), 9)
            prompt = str(c["prompt"]) + (f" + {c['trigger']}" if c.get("trigger") else "")  # a trigger word too
            lines.append(f"{name:<14} {prompt:<24} {dec:<7} " + " ".join(_pct(m.get(k), 8) for k in rates)
                         + f" {acc} {m['n_answers']:>5}")
    return "\n".join(lines)


def _pct(v, width: int) -> str:
    """A share as a percentage; '-' for a missing or undefined one (stored as null)."""
    return f"{v:>{width}.1%}" if isinstance(v, (int, float)) and v == v else f"{'-':>{width}}"
