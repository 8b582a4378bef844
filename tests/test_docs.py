"""Every ```python block of the README and of docs/*.md runs as written, as a reader would run it.

A page's blocks run in order in one fresh Python process (later blocks use earlier names), from a
directory outside the source tree, so the installed pyrnn is what they import. Each block keeps its
line numbers, so a traceback points into the page. A line `print(<expression>)  # True` is also
checked: the page promises that the expression is true.
"""
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PROMISE = re.compile(r"^(\s*)print\((.*)\)\s+# True$", re.M)
TORCH_IMPORT = re.compile(r"^\s*(import torch|from torch|import pyrnn\.torch|from pyrnn(\.| import )torch)", re.M)


def script(text):
    """The page's python blocks as one script, each at its own lines (the rest blank)."""
    lines = [""] * text.count("\n")
    for block in BLOCK.finditer(text):
        first = text.count("\n", 0, block.start(1))
        code = PROMISE.sub(r"\1assert (\2), 'the page promises True'", block.group(1))
        for offset, line in enumerate(code.splitlines()):
            lines[first + offset] = line
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("page", [p for p in PAGES if BLOCK.search(p.read_text(encoding="utf-8"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_page_snippets_run(page, tmp_path):
    code = script(page.read_text(encoding="utf-8"))
    if TORCH_IMPORT.search(code) and importlib.util.find_spec("torch") is None:
        pytest.skip(f"{page.name}'s snippets import torch, which is not installed here")
    source = tmp_path / page.name
    source.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, str(source)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, f"{page.relative_to(ROOT)}:\n{result.stderr}"


def test_promises_are_checked():
    text = "intro\n```python\nx = 1\nprint(x == 1)  # True\n```\n"
    assert script(text).splitlines()[3] == "assert (x == 1), 'the page promises True'"


def test_readme_example_prints_what_it_says(tmp_path):
    example = BLOCK.search((ROOT / "README.md").read_text(encoding="utf-8")).group(1)
    promised = re.search(r"# \((\d+), (\d+)\) \(", example)
    out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    assert out.startswith(f"({promised.group(1)}, {promised.group(2)})")
