"""The repository stands alone: no file points outside it, and every relative link in the
Markdown documents reaches a file that is there."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (".py", ".md", ".js", ".css", ".toml", ".ini", ".txt", ".cfg", ".yaml", ".yml", ".json")


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out if f.endswith(TEXT) or f.startswith(".ci/")]


def lines_where(found):
    """"file:line: text" of every line of the tracked text files (but this one, which holds
    the patterns) for which `found(line)` is true."""
    hits = []
    for rel in tracked_files():
        if rel == "tests/test_repository.py":
            continue
        with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
            hits += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(f, 1) if found(line)]
    return hits


def test_no_file_refers_outside_the_repository():
    outside = re.compile(r"\.\./shared|/work/(shared|notes|wt|webui)|steering repository")
    hits = lines_where(outside.search)
    assert not hits, "\n".join(hits)


def test_no_text_refers_to_an_issue_or_a_missing_document():
    """A reader has the repository, not the issue tracker or the notes it was built from:
    no issue numbers or defect numbers, no "the issue's …", no "spec §" (the method is
    docs/method.md), and every `docs/….md` named exists."""
    tracker = re.compile(r"\bissue\s*#?\d+|\bthe issue(?:'s)?\b|\bdefects?\s*\d+|"
                         r"\bprobable defect\b|\bspec(?:'s)?\s*§|\bthe spec\b|\bbranch i\d+", re.I)
    doc = re.compile(r"(?<![\w/.-])docs/[\w./-]+\.md")

    def refers(line):
        return tracker.search(line) or any(not os.path.exists(os.path.join(ROOT, d))
                                           for d in doc.findall(line))
    hits = lines_where(refers)
    assert not hits, "\n".join(hits)


def test_markdown_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
    broken = []
    for rel in tracked_files():
        if not rel.endswith(".md"):
            continue
        base = os.path.dirname(os.path.join(ROOT, rel))
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            for target, _ in link.findall(f.read()):
                if "://" in target or target.startswith("mailto:"):
                    continue
                if not os.path.exists(os.path.join(base, target)):
                    broken.append(f"{rel} -> {target}")
    assert not broken, broken
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "(docs/method.md)" in readme


def test_the_readme_layout_lists_every_module():
    """Every Python module of the package, the script and the benchmark is in README's
    "Project layout": by its path, or by its name in its folder's row."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## Project layout", 1)[1].split("\n## ", 1)[0]
    missing = []
    for rel in tracked_files():
        if not rel.endswith(".py") or not rel.startswith(("fam/", "scripts/", "benchmarks/")):
            continue
        folder, name = os.path.split(rel)
        if f"`{rel}`" in section:
            continue
        if f"`{folder}/" in section and (name == "__init__.py" or f"`{name}`" in section):
            continue
        missing.append(rel)
    assert not missing, missing


def test_javascript_writes_no_html():
    """javascript/ may toggle classes and read inputs, never turn text into markup."""
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|"
                       r"createContextualFragment|DOMParser|\.html\(|eval\(|new Function")
    scripts = [f for f in tracked_files() if f.startswith("javascript/") and f.endswith(".js")]
    assert scripts
    for rel in scripts:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            found = sinks.findall(f.read())
        assert not found, (rel, found)


def test_the_extension_side_never_imports_the_standalone_dependencies():
    """What the WebUI imports (and `python -m fam generate --help`) loads neither diffusers
    nor transformers: they are the optional `standalone` extra."""
    code = ("import sys, contextlib, io\n"
            "import fam, fam.params, fam.guidance, fam.layers, fam.hosts.a1111, fam.hosts.webui, fam.hosts.webui_args\n"
            "import fam.hosts.diffusers, fam.standalone.cli\n"
            "from fam.__main__ import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['generate', '--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
