"""Every entry point: `--help` prints its usage and exits 0."""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ["inoc_mech.train", "inoc_mech.evaluate", "inoc_mech.models.organism", "inoc_mech.models.real",
           "inoc_mech.settings.load", "inoc_mech.settings.scoring", "inoc_mech.settings.textdata",
           "inoc_mech.settings.tiny", "inoc_mech.settings.subliminal_organism", "inoc_mech.settings.subliminal_text", "inoc_mech.mechanism.lens", "inoc_mech.mechanism.probes",
           "inoc_mech.mechanism.patching", "inoc_mech.mechanism.weight_diff", "inoc_mech.mechanism.reply_probes",
           "inoc_mech.studies.sweep", "inoc_mech.studies.reelicit", "analyses.dose_response", "analyses.reelicit", "analyses.dynamics",
           "inoc_mech.studies.designs", "analyses.outcomes", "analyses.contexts", "analyses.cross_setting", "analyses.subliminal", "analyses.gradient_pressure", "analyses.probe_traits", "analyses.probe_text", "analyses.trait_shift",
           "analyses.selectivity"]
SCRIPTS = ["benchmarks/bench_hooks.py", "benchmarks/bench_real.py", "benchmarks/bench_trainer.py", "benchmarks/bench_organism.py",
           "scripts/gpu_check.py"]


def _main(name):
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(name).stem, REPO / name)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod.main
    return importlib.import_module(name).main


@pytest.mark.parametrize("name", MODULES + SCRIPTS)
def test_help_prints_usage_and_exits_0(name, capsys):
    with pytest.raises(SystemExit) as e:
        _main(name)(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--debug" in out


def test_every_entry_point_is_listed():
    found = {".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "inoc_mech").rglob("*.py")
             if 'if __name__ == "__main__":' in p.read_text()}
    found |= {f"analyses.{p.stem}" for p in (REPO / "analyses").glob("*.py") if p.stem != "__init__"}
    assert found == set(MODULES)


SIBLING_IMPORTERS = sorted(p.name for p in (REPO / "analyses").glob("*.py") if "from analyses." in p.read_text())


@pytest.mark.parametrize("script", SIBLING_IMPORTERS)
def test_analyses_that_import_a_sibling_run_as_scripts(script):
    """`python analyses/<script>.py` (the README's form) finds its sibling modules without the repo on sys.path."""
    import subprocess
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, f"analyses/{script}", "--help"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("usage:"), p.stderr[-1000:]
