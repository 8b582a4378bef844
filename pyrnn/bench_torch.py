"""`pyrnn bench --torch-train`: a whole training step in PyTorch, torch.nn.RNN against pyrnn.torch.RNN.

The step is what a user of pyrnn.torch runs: Embedding -> RNN -> Linear -> cross-entropy over
every position -> backward -> Adam (fused), on (T, B) token ids of a vocabulary of 64, with the embedding
size as the RNN's input size. The two models start from the same weights (one is a deepcopy of
the other, converted by pyrnn.torch.convert), see the same batches, each has its own Adam.

- Gate: from the same weights, the first STEPS_CHECKED steps' losses of the two models must agree
  to float32 roundoff (pyrnn.testing's tolerance for the longest sum, over T·B positions), else
  the case is reported as wrong and not timed.
- Timing: the steps interleaved in one process (bench.measure_block), medians of samples
  lasting ~10 ms; thread counts bound torch's pools and pyrnn's (bench.set_threads).
- The rest of the step: a third model with the same Embedding and Linear and the RNN replaced by
  a constant output (joined to the graph by one elementwise op), timed with the two: the step's
  time outside the RNN; torch's step time over it is the most any RNN could speed the step up.
- Overhead: on the one-layer cases, the drop-in's forward + backward of the RNN alone (autograd
  returning every gradient, as bench.TorchRunner) against bare pyrnn.forward + pyrnn.backward on
  the same arrays: what the boundary between torch and the kernel costs; and, timed with them,
  the same through an operator that computes nothing: the part of it that is torch's autograd.
"""
import copy
import statistics
from collections import namedtuple

import numpy as np
import torch
from tqdm import tqdm

import pyrnn
import pyrnn.torch

from . import bench, testing

Case = namedtuple("Case", ["T", "B", "I", "H", "num_layers", "bidirectional"])

# docs/design.md §4's grid, I = the embedding size; and the small shape as a 2-layer bidirectional stack.
CASES = {
    "tiny": Case(*bench.SHAPES["tiny"], 1, False),
    "small": Case(*bench.SHAPES["small"], 1, False),
    "small L2 bi": Case(*bench.SHAPES["small"], 2, True),
    "medium": Case(*bench.SHAPES["medium"], 1, False),
}
VOCABULARY = 64
STEPS_CHECKED = 3
CONTESTANTS = ("torch", "pyrnn")
REST = "no RNN"  # the step without the RNN's work (NoRNN), timed with the contestants


class LanguageModel(torch.nn.Module):
    """Embedding -> RNN -> Linear: next-token logits at every position."""

    def __init__(self, case):
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCABULARY, case.I)
        self.rnn = torch.nn.RNN(case.I, case.H, case.num_layers, bidirectional=case.bidirectional)
        self.head = torch.nn.Linear(case.H * (2 if case.bidirectional else 1), VOCABULARY)

    def forward(self, ids):
        output, _ = self.rnn(self.embedding(ids))
        return self.head(output)


class NoRNN(torch.nn.Module):
    """In the RNN's place: a fixed output of the RNN's shape, plus 0 · the input's first feature so
    that the gradient still flows to the embedding. What it costs is the step's time outside the
    RNN (and outside the RNN's parameters' share of Adam)."""

    def __init__(self, case):
        super().__init__()
        D = 2 if case.bidirectional else 1
        self.register_buffer("output", torch.randn(case.T, case.B, D * case.H))

    def forward(self, x):
        return self.output + 0 * x[..., :1], None


class TrainingStep:
    """One model, its Adam and a fixed batch; step() -> the loss before the update."""

    def __init__(self, model, ids, targets):
        self.model, self.ids, self.targets = model, ids, targets
        # fused: torch's fastest Adam on the CPU (one kernel for all parameters), for both models;
        # the default per-parameter loop costs ~10% of the drop-in's step at the small shape.
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(self.ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCABULARY), self.targets.reshape(-1))
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def make_steps(case, seed=0):
    """{"torch": TrainingStep, "pyrnn": TrainingStep, REST: TrainingStep} over the same weights
    and batch (REST: the model without its RNN, NoRNN)."""
    torch.manual_seed(seed)
    model = LanguageModel(case)
    ids = torch.randint(0, VOCABULARY, (case.T, case.B))
    targets = torch.randint(0, VOCABULARY, (case.T, case.B))
    converted = pyrnn.torch.convert(copy.deepcopy(model))
    without_rnn = copy.deepcopy(model)
    without_rnn.rnn = NoRNN(case)
    return {"torch": TrainingStep(model, ids, targets), "pyrnn": TrainingStep(converted, ids, targets),
            REST: TrainingStep(without_rnn, ids, targets)}


def losses_disagreement(case):
    """(worst relative difference of the first losses, tolerance), from fresh models."""
    steps = make_steps(case)
    losses = {name: [float(steps[name].step()) for _ in range(STEPS_CHECKED)] for name in CONTESTANTS}
    error = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses["pyrnn"], losses["torch"]))
    _, backward_terms = testing.accumulated_terms(case.T, case.B, case.I, case.H)
    return error, testing.tolerance(np.float32, backward_terms * case.num_layers)


def overhead_calls(case):
    """{"bare pyrnn", "drop-in", "torch floor"}: forward + backward of the RNN alone on the same
    float32 arrays, and of an operator that computes nothing (_Nothing) in the drop-in's place."""
    problem = bench.make_problem(bench.Shape(case.T, case.B, case.I, case.H))
    rnn = pyrnn.torch.RNN(case.I, case.H)
    with torch.no_grad():  # the problem's weights; its bias all in bias_ih
        rnn.weight_ih_l0.copy_(torch.from_numpy(problem["weight_ih"]))
        rnn.weight_hh_l0.copy_(torch.from_numpy(problem["weight_hh"]))
        rnn.bias_ih_l0.copy_(torch.from_numpy(problem["bias"]))
        rnn.bias_hh_l0.zero_()
    tensor = {name: torch.from_numpy(array) for name, array in problem.items()}
    x, h0 = tensor["x"].requires_grad_(), tensor["h0"][None].requires_grad_()
    wrt = (x, h0, *rnn.parameters())
    gradients = (tensor["grad_output"], tensor["grad_h_n"][None])

    def drop_in():
        return torch.autograd.grad(rnn(x, h0), wrt, gradients)

    def torch_floor():
        return torch.autograd.grad(_Nothing.apply(x, h0, *rnn.parameters()), wrt, gradients)

    return {"bare pyrnn": bench.PyrnnRunner(None, problem).train, "drop-in": drop_in, "torch floor": torch_floor}


class _Nothing(torch.autograd.Function):
    """The drop-in's inputs and outputs, and no computation: what torch's autograd costs any
    operator taking them, the floor under the boundary's cost."""

    @staticmethod
    def forward(ctx, x, h0, *weights):
        ctx.shapes = [t.shape for t in (x, h0, *weights)]
        T, B, _ = x.shape
        return x.new_empty((T, B, h0.shape[-1])), h0.new_empty(h0.shape)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n):
        return tuple(grad_output.new_empty(shape) for shape in ctx.shapes)


def rnn_flop(case):
    """Floating-point operations of the RNN's forward + backward in one step (bench.flops)."""
    return bench.flops(bench.Shape(case.T, case.B, case.I, case.H), "train",
                       bench.Stack(case.num_layers, 2 if case.bidirectional else 1))


def add_limit_bounds(rows, limit_gflops):
    """On each timed row: rnn_at_limit_s, the RNN's train FLOP at the CPU's float32 limit of its
    thread count, and limit_bound = torch's step / (rest + that), the most a float32 kernel at
    the limit could speed the step up (not measured without the native module)."""
    for row in rows:
        gflops = limit_gflops.get(row["threads"])
        if "speedup" in row and gflops:
            row["rnn_at_limit_s"] = rnn_flop(CASES[row["case"]]) / (gflops * 1e9)
            row["limit_bound"] = row["torch_s"] / (row["rest_s"] + row["rnn_at_limit_s"])


def run(threads, repeat, budget):
    """-> the report: {"cases": ..., "results": [row per case, threads, contestant],
    "overhead": [row per one-layer case, threads, call], "limit_gflops": {threads: fp32 limit}}."""
    report = {"machine": bench.machine(), "versions": bench.versions(),
              "cases": {name: case._asdict() for name, case in CASES.items()},
              "results": [], "overhead": [], "limit_gflops": {}}
    checks = {}
    progress = tqdm(total=len(threads) * len(CASES) * 2, desc="torch training step", leave=False)
    for n in threads:
        bench.set_threads(n)
        settle = bench.SETTLE_SECONDS if n > 1 else 0.0
        limits = bench.limit_calls(("fp32",), n)  # {} without the native module
        limit_samples = []
        for name, case in CASES.items():
            progress.set_description_str(f"{name} {n} thread(s)", refresh=False)
            if name not in checks:
                checks[name] = losses_disagreement(case)
            error, tolerance = checks[name]
            row = {"case": name, "threads": n, "max_loss_error": error, "tolerance": tolerance,
                   "status": "ok" if error <= tolerance else "wrong"}
            if row["status"] == "ok":
                steps = make_steps(case)
                calls = {k: s.step for k, s in steps.items()}
                calls.update({limit: call for limit, (call, _, _) in limits.items()})
                timed = bench.measure_block(calls, repeat, budget, progress, settle)
                for limit in limits:
                    limit_samples += timed.pop(limit)[0]
                median = {k: statistics.median(samples) for k, (samples, _) in timed.items()}
                row.update({"torch_s": median["torch"], "pyrnn_s": median["pyrnn"], "rest_s": median[REST],
                            "speedup": median["torch"] / median["pyrnn"],
                            "speedup_bound": median["torch"] / median[REST]})
            report["results"].append(row)
            progress.update()
            if case.num_layers == 1 and not case.bidirectional:
                timed = bench.measure_block(overhead_calls(case), repeat, budget, progress, settle)
                bare, drop_in, floor = (statistics.median(timed[call][0])
                                        for call in ("bare pyrnn", "drop-in", "torch floor"))
                report["overhead"].append({"case": name, "threads": n, "bare_s": bare, "drop_in_s": drop_in,
                                           "torch_floor_s": floor})
            progress.update()
        if limit_samples:
            [(_, flop, _)] = limits.values()
            report["limit_gflops"][n] = bench.best_gflops(flop, limit_samples)
    progress.close()
    add_limit_bounds(report["results"], report["limit_gflops"])
    report["machine"]["load_average_end"] = bench._load_average()
    return report


def format_report(report):
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average_start']:.1f} at start, "
             f"{m['load_average_end']:.1f} at end",
             "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             "CPU limit fp32 (FMA loop, best sample): " + (", ".join(
                 f"{n} thread(s) {gflops:.1f} GFLOP/s" for n, gflops in report["limit_gflops"].items())
                 or "not measured (needs the native module)"), "",
             f"training step: Embedding({VOCABULARY}, I) -> RNN -> Linear -> cross-entropy -> Adam, float32",
             f"{'case':12s} {'T':>4s} {'B':>3s} {'I':>4s} {'H':>4s} {'thr':>3s} {'torch ms':>9s} "
             f"{'pyrnn ms':>9s} {'speed-up':>8s} {'rest ms':>8s} {'bound':>7s} {'limit':>7s}  "
             f"first {STEPS_CHECKED} losses"]
    for row in report["results"]:
        c = report["cases"][row["case"]]
        check = (f"{'ok' if row['status'] == 'ok' else 'WRONG'} {row['max_loss_error']:.1e} "
                 f"{'<=' if row['status'] == 'ok' else '>'} {row['tolerance']:.1e}")
        limit = f"{row['limit_bound']:6.2f}x" if "limit_bound" in row else f"{'-':>7s}"
        timing = (f"{row['torch_s'] * 1e3:9.3f} {row['pyrnn_s'] * 1e3:9.3f} {row['speedup']:7.2f}x "
                  f"{row['rest_s'] * 1e3:8.3f} {row['speedup_bound']:6.2f}x {limit}"
                  if "speedup" in row else f"{'not timed':>53s}")
        lines.append(f"{row['case']:12s} {c['T']:4d} {c['B']:3d} {c['I']:4d} {c['H']:4d} {row['threads']:3d} "
                     f"{timing}  {check}")
    lines += ["", "the boundary: forward + backward of the RNN alone, every gradient",
              f"{'case':12s} {'thr':>3s} {'bare pyrnn us':>13s} {'drop-in us':>10s} {'difference':>10s} {'ratio':>6s} "
              f"{'torch floor us':>14s} {'own us':>7s}"]
    for row in report["overhead"]:
        bare, drop_in, floor = row["bare_s"] * 1e6, row["drop_in_s"] * 1e6, row["torch_floor_s"] * 1e6
        lines.append(f"{row['case']:12s} {row['threads']:3d} {bare:13.1f} {drop_in:10.1f} "
                     f"{drop_in - bare:10.1f} {drop_in / bare:6.3f} {floor:14.1f} {drop_in - bare - floor:7.1f}")
    lines += ["", "medians over samples of ~10 ms, the contestants interleaved; speed-up: torch.nn.RNN's "
              "step time / pyrnn.torch.RNN's. rest: the step with the RNN replaced by a constant "
              "output (Embedding, Linear, cross-entropy, backward, Adam); bound: torch's step / rest, "
              "the speed-up of an RNN that cost nothing; limit: torch's step / (rest + the RNN's forward + "
              "backward FLOP at the CPU's float32 limit), the speed-up of a float32 kernel running at that "
              "limit. the boundary: torch floor, an autograd.Function with the drop-in's inputs and "
              "outputs that computes nothing (what autograd costs any operator); own, the difference "
              "less that floor: pyrnn.torch's own cost. first losses: worst relative difference of the two models' "
              "losses over the first steps from the same weights, against float32 roundoff."]
    return "\n".join(lines)


def main(threads, args):
    """`pyrnn bench --torch-train` (arguments parsed in pyrnn.__main__, checked by bench.main)."""
    report = run(threads, args.repeat, args.budget)
    print(format_report(report))
    if args.json:
        import json

        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return 0 if all(row["status"] == "ok" for row in report["results"]) else 1
