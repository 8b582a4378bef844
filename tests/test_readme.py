"""The README's usage example runs and prints what the README says it prints."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(capsys):
    text = README.read_text(encoding="utf-8")
    example = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S).group(1)
    exec(compile(example, str(README), "exec"), {})
    printed = capsys.readouterr().out.strip()
    promised = re.search(r"# \((\d+), (\d+)\) (\(.*\))", example)
    assert printed.startswith(f"({promised.group(1)}, {promised.group(2)})")
