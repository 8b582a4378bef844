"""Every "docs/design.md §N" (or §N.M) cited in the code names a section (or a numbered item of
one) that docs/design.md has, and no citation leaves out the docs/ that makes it a path."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DESIGN = ROOT / "docs" / "design.md"
CITATION = re.compile(r"(\S*)design\.md §(\d+)(?:\.(\d+))?")


def cited_files():
    for folder in ("pyrnn", "csrc", "tests", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".pyi", ".h", ".cpp"} and path.is_file():
                yield path


def sections():
    """{section number: its text}."""
    parts = re.split(r"^## (\d+)\. .*$", DESIGN.read_text(), flags=re.M)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2])}


CITATIONS = [(path.relative_to(ROOT), match) for path in cited_files()
             for match in CITATION.finditer(path.read_text(errors="replace"))]


def test_the_code_cites_the_design():
    assert len(CITATIONS) >= 10


@pytest.mark.parametrize("where, match", CITATIONS,
                         ids=[f"{path}:{match.group(0)}" for path, match in CITATIONS])
def test_citation_resolves(where, match):
    prefix, section, item = match.groups()
    assert prefix.endswith("docs/"), f"{where} cites {match.group(0)!r}: write docs/design.md"
    text = sections().get(int(section))
    assert text is not None, f"{where} cites §{section}, which docs/design.md does not have"
    if item is not None:
        assert re.search(rf"^{item}\. ", text, flags=re.M), (
            f"{where} cites §{section}.{item}: §{section} has no item {item}")
