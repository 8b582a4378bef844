"""Smoke tests of the examples: a few iterations each, on each backend; the loss must go down."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Small and short: seconds per run, yet long enough for the loss to fall well beyond noise.
FAST_ARGUMENTS = {
    "char_lm": ["--module", "textwrap", "--steps", "40", "--batch", "8", "--seq-len", "16", "--hidden", "32",
                "--eval-every", "40", "--sample-length", "20", "--lr", "1e-2"],
    "classify": ["--train", "512", "--test", "256", "--epochs", "6", "--batch", "32", "--hidden", "16",
                 "--lr", "1e-2"],
    "forecast": ["--length", "1200", "--steps", "40", "--window", "40", "--warmup", "5", "--hidden", "16",
                 "--eval-every", "40", "--batch", "16"],
}


# --threads 0 leaves the thread count alone: the examples' own default (1) is process-wide and
# would outlive the test.
COMMON_ARGUMENTS = ["--threads", "0"]


def load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as when run as a script: `import common` works
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(FAST_ARGUMENTS))
def test_example_learns(backend, name, capsys, monkeypatch):
    result = load(name, monkeypatch).main(FAST_ARGUMENTS[name] + COMMON_ARGUMENTS + ["--backend", backend])
    losses = result["losses"]
    window = max(5, len(losses) // 8)  # mean over several batches: single batches are noisy
    assert np.mean(losses[-window:]) < 0.8 * np.mean(losses[:window]), losses
    printed = capsys.readouterr().out
    assert f"backend {backend}" in printed
    if name == "char_lm":
        assert result["perplexity"] < result["unigram_perplexity"] * 1.5 and "--- sample ---" in printed
    elif name == "classify":
        assert result["accuracy"] > 0.6
    else:
        assert result["mse"] < result["persistence_mse"]


METRIC = {"char_lm": "perplexity", "classify": "accuracy", "forecast": "mse"}


@pytest.mark.parametrize("name", sorted(FAST_ARGUMENTS))
def test_example_learns_as_well_in_bf16(name, monkeypatch, capsys):
    """--precision bf16 trains to float32's metric (within 5% on these short runs; the full runs of
    docs/precision.md are within 2%), on the default backend."""
    results = {precision: load(name, monkeypatch).main(FAST_ARGUMENTS[name] + COMMON_ARGUMENTS
                                                        + ["--precision", precision])
               for precision in ("fp32", "bf16")}
    assert results["bf16"]["losses"] != results["fp32"]["losses"]  # bf16 really ran
    metrics = {precision: result[METRIC[name]] for precision, result in results.items()}
    assert abs(metrics["bf16"] - metrics["fp32"]) <= 0.05 * abs(metrics["fp32"]), metrics


def test_examples_save_plots(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    for name, arguments in FAST_ARGUMENTS.items():
        path = tmp_path / f"{name}.png"
        load(name, monkeypatch).main(arguments + COMMON_ARGUMENTS + ["--plot", str(path)])
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_guides_training_loop_learns(capsys):
    guide = (Path(__file__).resolve().parent.parent / "docs" / "getting-started.md").read_text(encoding="utf-8")
    example = re.search(r"## A first training loop\n.*?```python\n(.*?)```", guide, re.S).group(1)
    exec(compile(example, "docs/getting-started.md", "exec"), {})
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_example_runs_repeat_from_their_seed(backend, monkeypatch):
    arguments = FAST_ARGUMENTS["forecast"] + COMMON_ARGUMENTS + ["--backend", backend]
    forecast = load("forecast", monkeypatch)
    first = forecast.main(arguments + ["--seed", "5"])["losses"]
    assert forecast.main(arguments + ["--seed", "5"])["losses"] == first
    assert forecast.main(arguments + ["--seed", "6"])["losses"] != first


def test_gradient_flow_vanishes_below_radius_one_and_explodes_above(backend, tmp_path, monkeypatch):
    arguments = ["--steps", "60", "--hidden", "64", "--batch", "4", "--backend", backend] + COMMON_ARGUMENTS
    result = load("gradient_flow", monkeypatch).main(arguments + ["--plot", str(tmp_path / "flow.png")]
                                                     if importlib.util.find_spec("matplotlib") else arguments)
    last = {radius: norms[-1] for (radius, _), norms in result["per_step"].items()}
    first = {(radius, scale): norms[0] for (radius, scale), norms in result["per_step"].items()}
    scale = min(s for _, s in first)
    assert first[0.5, scale] < 1e-12 * last[0.5]              # 0.5 per step over 59 steps: ~1e-18
    assert first[1.5, scale] > 10 * last[1.5]                 # grows backwards out of saturation
    assert first[1.5, 10 * scale] < first[1.5, scale] / 100   # saturated by a strong input, it does not
    assert np.all(result["norm_after"] <= 100 * (1 + 1e-9))
    unclipped = result["norm_before"] <= 100
    assert unclipped.any() and not unclipped.all()
    np.testing.assert_allclose(result["norm_after"][unclipped], result["norm_before"][unclipped])


def test_torch_char_lm_trains_both_rnns_alike(monkeypatch, capsys):
    pytest.importorskip("torch", reason="torch is optional (pip install torch); CI installs it")
    result = load("torch_char_lm", monkeypatch).main(
        ["--module", "textwrap", "--steps", "40", "--batch", "8", "--seq-len", "16", "--embedding", "8",
         "--hidden", "32", "--eval-every", "40", "--lr", "1e-2", "--threads", "0"])
    losses = result["losses"]
    assert np.mean(losses["pyrnn"][-5:]) < 0.8 * np.mean(losses["pyrnn"][:5])
    # The same model from the same weights on the same chunks: the same training, to roundoff.
    np.testing.assert_allclose(losses["pyrnn"], losses["torch"], rtol=1e-4)
    assert abs(result["perplexity"]["pyrnn"] - result["perplexity"]["torch"]) < 1e-3 * result["perplexity"]["torch"]
    assert "speed-up of pyrnn's drop-in over torch.nn.RNN" in capsys.readouterr().out
