"""Regenerate the benchmark page's picture and table from a real run, in one command:

    python benchmarks/figures.py                      # pyrnn bench --full --threads 1,2, float32
    python benchmarks/figures.py --shapes tiny,small  # any other `pyrnn bench` options instead

writes docs/img/bench-speedup.png (`pyrnn bench --plot`) and docs/img/bench-table.txt (the
printed table, headed by the command that made it), which docs/benchmarks.md shows. Run it on a
quiet machine: the load average in the table's first line says how quiet it was.
"""
import contextlib
import io
import json
import pathlib
import sys
import tempfile

from pyrnn.__main__ import main

IMG = pathlib.Path(__file__).resolve().parents[1] / "docs" / "img"


def run(options):
    options = options or ["--full", "--threads", "1,2"]
    table = io.StringIO()
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(table):
        record = pathlib.Path(scratch) / "run.json"
        status = main(["bench", *options, "--plot", str(IMG / "bench-speedup.png"), "--json", str(record)])
        machine = json.loads(record.read_text())["machine"]
    text = f"$ pyrnn bench {' '.join(options)} --plot bench-speedup.png\n" + table.getvalue()
    busiest = max(machine["load_average_start"] or 0, machine["load_average_end"] or 0)
    if busiest > machine["cores"]:
        text = (f"NOTE: load average {busiest:.1f} on {machine['cores']} cores: other work shared the "
                "CPU during this run, so its ratios are noise; rerun on a quiet machine.\n" + text)
    (IMG / "bench-table.txt").write_text(text, encoding="utf-8")
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
