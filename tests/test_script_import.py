"""Loading scripts/fam_diffusion.py leaves the WebUI's module search order alone: the
extension root holds top-level names (`install`, `fam`, `tests`, `benchmarks`) that must not
shadow same-named modules of the WebUI or of other extensions for the rest of the process."""

import importlib
import sys
from pathlib import Path

from a1111_like import ROOT, MiniWebUI


def _without_root(path):
    return [p for p in path if Path(p or ".").resolve() != ROOT]


def test_loading_the_script_shadows_no_other_top_level_module(tmp_path, monkeypatch):
    (tmp_path / "install.py").write_text("WHO = 'another extension'\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + _without_root(sys.path))
    monkeypatch.delitem(sys.modules, "install", raising=False)
    MiniWebUI()                                       # loads the script as the WebUI does
    assert importlib.import_module("install").WHO == "another extension"
    assert Path(sys.path[-1]).resolve() == ROOT       # still reachable, but last
    assert _without_root(sys.path) == sys.path[:-1]
