"""`pyrnn bench` and its toolbox: the gate catches wrong contestants, the command runs end to end
and records what it promises, thread limits reach every pool."""
import json

import numpy as np
import pytest

import pyrnn
from pyrnn import _threads, bench
from pyrnn.__main__ import main

TINY = bench.SHAPES["tiny"]


@pytest.fixture(autouse=True)
def threads_restored():
    """bench bounds every pool's threads, for the rest of its process: after each test here, the
    state before it (torch's count, and pyrnn's, or none with no threadpoolctl limit left)."""
    torch = bench.torch_or_none()
    torch_threads = torch.get_num_threads() if torch is not None else None
    with _threads.limited_to(pyrnn.get_num_threads()):
        yield
    if torch is not None:
        torch.set_num_threads(torch_threads)


def test_flops_follow_design():
    T, B, I, H = TINY
    assert bench.flops(TINY, "forward") == 2 * T * B * H * (I + H)
    assert bench.flops(TINY, "train") == 3 * bench.flops(TINY, "forward")
    # a stack sums its layers and directions; layers above the first read 2·H inputs here
    stack = bench.Stack(3, 2)
    assert bench.flops(TINY, "forward", stack) == 2 * (2 * T * B * H * (I + H)) + 4 * (2 * T * B * H * (2 * H + H))
    assert bench.flops(TINY, "train", stack) == 3 * bench.flops(TINY, "forward", stack)


@pytest.mark.parametrize("name", bench.contestants())
def test_gate_passes_every_contestant_on_a_stack(name):
    problem = bench.make_stack_problem(TINY, bench.Stack(2, 2))
    assert bench.stack_of(problem) == (2, 2) and bench.stack_of(bench.make_problem(TINY)) == (1, 1)
    expected = bench.stack_reference_results(problem)
    assert len(expected) == 4 + 4 * 4  # output, h_n, grad x and h0, and 4 parameters per layer and direction
    check = bench.gate(bench.make_runner(name, problem), expected, problem, bench.MODES)
    assert check["status"] == "ok", check


@pytest.mark.parametrize("name", bench.contestants())
def test_gate_passes_every_contestant(name):
    problem = bench.make_problem(TINY)
    check = bench.gate(bench.make_runner(name, problem), bench.reference_results(problem), problem,
                       bench.MODES)
    assert check["status"] == "ok", check
    assert set(check["first_call_s"]) == set(bench.MODES)


class _Off(bench.PyrnnRunner):
    """The reference with every output 0.1 % off: a small but real kernel bug."""

    def train(self):
        output, h_n, grads = super().train()
        return output * (1 + 1e-3), h_n, grads


class _Raises(bench.PyrnnRunner):
    def forward(self):
        raise RuntimeError("kernel exploded")


def test_gate_reports_wrong_and_failing_contestants():
    problem = bench.make_problem(TINY)
    expected = bench.reference_results(problem)
    wrong = bench.gate(_Off("numpy", problem), expected, problem, bench.MODES)
    assert wrong["status"] == "wrong" and wrong["worst"] == "output"
    assert wrong["max_error"] > wrong["tolerance"]
    failing = bench.gate(_Raises("numpy", problem), expected, problem, bench.MODES)
    assert failing["status"] == "error" and "kernel exploded" in failing["message"]


def test_disagreement_counts_nan_as_wrong():
    problem = bench.make_problem(TINY)
    expected = bench.reference_results(problem)
    results = dict(expected, grad_bias=np.full_like(expected["grad_bias"], np.nan))
    error, worst, tolerance = bench.disagreement(results, expected, problem)
    assert worst == "grad_bias" and not error <= tolerance


def test_thread_limits_reach_every_pool():
    bench.set_threads(1)
    pools = bench.thread_report()["threads"]
    assert pools["pyrnn"] == 1 and pools.get("torch", 1) == 1
    assert all(count == 1 for count in pools.values()), str(pools)


def test_bench_command_end_to_end(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    status = main(["bench", "--shapes", "tiny", "--threads", "1", "--repeat", "2", "--budget", "0",
                   "--json", str(out_json)])
    table = capsys.readouterr().out
    assert status == 0, table
    report = json.loads(out_json.read_text())
    names = bench.contestants()
    assert {row["backend"] for row in report["results"]} == set(names)
    assert len(report["results"]) == len(names) * len(bench.MODES)
    for row in report["results"]:
        assert row["status"] == "ok" and len(row["samples_s"]) >= 2 and row["median_s"] > 0
        assert row["speedup_vs_numpy"] > 0
        assert row["precision"] == "fp32"
        if "cpp" in pyrnn.available_backends():
            assert row["fraction_of_peak"] == row["gflops"] / report["peak"]["1"]["fp32"]["gflops"]
        assert f"{row['mode']:8s}   1 {row['backend']:8s}" in table
    if "cpp" in pyrnn.available_backends():
        assert report["peak"]["1"]["fp32"]["gflops"] > 0
        assert "CPU limit fp32 (vfmadd" in table or "CPU limit fp32 (mulps" in table
    assert report["gemm"]["1"]["gflops"] > 0
    assert report["thread_pools"]["1"]["threads"]["pyrnn"] == 1
    assert any(pool["user_api"] == "blas" for pool in report["thread_pools"]["1"]["threadpoolctl"])
    assert report["versions"]["pyrnn"] == pyrnn.__version__
    assert "tiny  T=50 B=1 I=32 H=64" in table


def test_bench_precision_bf16_runs_each_contestant_in_both_precisions(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    status = main(["bench", "--shapes", "tiny", "--threads", "1", "--repeat", "1", "--budget", "0",
                   "--backends", "numpy", "--precision", "bf16", "--json", str(out_json)])
    table = capsys.readouterr().out
    assert status == 0, table
    rows = json.loads(out_json.read_text())["results"]
    assert [(r["backend"], r["precision"]) for r in rows if r["mode"] == "train"] == [
        ("numpy", "fp32"), ("numpy bf16", "bf16")]
    bf16 = next(r for r in rows if r["backend"] == "numpy bf16" and r["mode"] == "train")
    assert bf16["tolerance"] in (2e-2, 5e-2) and bf16["speedup_vs_fp32"] > 0
    assert "vs fp32" in table and "train      1 numpy bf16" in table
    if "cpp" in pyrnn.available_backends():
        assert "CPU limit bf16 (" in table
    with pytest.raises(SystemExit, match="--precision bf16 needs --dtype float32"):
        main(["bench", "--precision", "bf16", "--dtype", "float64"])


def test_bench_command_times_a_stack(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    status = main(["bench", "--shapes", "tiny", "--threads", "1", "--repeat", "1", "--budget", "0",
                   "--layers", "2", "--bidirectional", "--modes", "forward", "--json", str(out_json)])
    table = capsys.readouterr().out
    assert status == 0, table
    report = json.loads(out_json.read_text())
    assert report["settings"]["stack"] == {"layers": 2, "directions": 2}
    assert {row["backend"] for row in report["results"]} == set(bench.contestants())
    for row in report["results"]:
        assert row["status"] == "ok" and row["gflops"] == (
            bench.flops(TINY, "forward", bench.Stack(2, 2)) / row["median_s"] / 1e9)
    assert "tiny  T=50 B=1 I=32 H=64  2 layer(s) x 2 direction(s): pyrnn.RNN vs torch.nn.RNN" in table
    with pytest.raises(SystemExit, match="--layers"):
        main(["bench", "--layers", "0"])


def test_ratios_between_contestants_and_thread_counts():
    def row(backend, threads, median_s):
        return {"shape": "tiny", "mode": "train", "threads": threads, "backend": backend,
                "precision": "fp32", "median_s": median_s, "gflops": 1.0}
    rows = [row("cpp", 1, 4.0), row("torch", 1, 40.0), row("cpp", 2, 2.5), row("torch", 2, 30.0)]
    bench.add_ratios(rows, {1: {"fp32": {"gflops": 10.0}}, 2: {"fp32": {"gflops": 20.0}}})
    cpp_1, torch_1, cpp_2, torch_2 = rows
    assert cpp_1["speedup_vs_torch"] == 10.0 and cpp_2["speedup_vs_torch"] == 12.0
    assert cpp_2["speedup_vs_1_thread"] == 1.6 and torch_2["speedup_vs_1_thread"] == 40.0 / 30.0
    assert "speedup_vs_1_thread" not in cpp_1
    assert cpp_2["fraction_of_peak"] == 1.0 / 20.0
    # the ceiling of vs torch: a kernel at the limit, 1 / torch's fraction of it (torch at 1/10, 1/20)
    assert bench._ceilings(rows) == ["ceiling of vs torch (a kernel at the fp32 limit): "
                                     "train 1 thr 10.00x, train 2 thr 20.00x"]


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    report = bench.run(["tiny"], [1], ["forward"], ["numpy", "numba"], "float64", repeat=1, budget=0)
    path = tmp_path / "speedup.png"
    bench.plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_title_fits_a_narrow_figure():
    pytest.importorskip("matplotlib")
    report = bench.run(["tiny"], [1], ["forward"], ["numpy", "numba"], "float64", repeat=1, budget=0)
    report["machine"]["cpu"] = "A Processor Whose Marketing Name Is Much Longer Than One Panel (R) @ 3.0GHz"
    figure = bench.speedup_figure(report)
    figure.canvas.draw()
    title = figure.get_suptitle()
    extent = next(t for t in figure.texts if t.get_text() == title).get_window_extent()
    assert "\n" in title and extent.x0 >= 0 and extent.x1 <= figure.bbox.x1 and extent.y1 <= figure.bbox.y1


def test_bench_rejects_unknown_choices():
    with pytest.raises(SystemExit, match="huge"):
        main(["bench", "--shapes", "huge"])
    with pytest.raises(SystemExit, match="--threads"):
        main(["bench", "--threads", "0"])
    with pytest.raises(SystemExit, match="--repeat"):
        main(["bench", "--repeat", "0"])


@pytest.mark.skipif(len(pyrnn.available_backends()) < 3, reason="needs the cpp and numba backends")
def test_bench_command_reports_wrong_and_failing_contestants_untimed(monkeypatch, capsys):
    broken = {"numba": _Off, "cpp": _Raises}
    monkeypatch.setattr(bench, "make_runner",
                        lambda name, problem: broken.get(name, bench.PyrnnRunner)(name, problem))
    status = main(["bench", "--shapes", "tiny", "--threads", "1", "--repeat", "1", "--budget", "0",
                   "--modes", "forward", "--backends", "numpy,numba,cpp", "--dtype", "float64"])
    table = capsys.readouterr().out
    assert status == 1
    assert "ERROR RuntimeError: kernel exploded" in table
    rows = {line.split()[2]: line for line in table.splitlines() if line.startswith("forward ")}
    assert "WRONG" in rows["numba"] and "not timed" in rows["numba"] and "not timed" in rows["cpp"]
    assert "  ok " in rows["numpy"] and "not timed" not in rows["numpy"]
