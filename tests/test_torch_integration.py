"""pyrnn.torch's integration with torch: the operators (opcheck), torch.compile and torch.export,
each fallback to torch's own computation, which thread setting governs the kernel, and training
under DistributedDataParallel. Their results do not depend on $PYRNN_BACKEND (CI runs them once).
"""
import pytest

import pyrnn
from pyrnn import _threads

torch = pytest.importorskip("torch", reason="torch is optional (pip install torch); CI installs it")
pt = pytest.importorskip("pyrnn.torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

# Inductor's compilation and forward-mode AD's decompositions use torch.jit.script internally,
# which warns of its own deprecation.
TORCH_JIT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.script.*` is deprecated")


def operator_samples():
    torch.manual_seed(0)

    def sample(T, B, I, H, L, bidirectional, bias, h0, lengths, dropout, precision="fp32"):
        D = 2 if bidirectional else 1
        weights = [w.detach().requires_grad_() for w in
                   pt.RNN(I, H, num_layers=L, bias=bias, bidirectional=bidirectional)._flat_weights]
        masks = (torch.empty(L - 1, T, B, D * H).bernoulli_(0.5) * 2) if dropout else None
        return (torch.randn(T, B, I, requires_grad=True), weights,
                torch.randn(L * D, B, H, requires_grad=True) if h0 else None,
                lengths, masks, L, bidirectional, "tanh", precision)

    return [sample(5, 3, 4, 6, 1, False, True, True, None, False),
            sample(5, 3, 4, 6, 2, True, False, False, torch.tensor([5, 2, 1]), True),
            sample(1, 1, 1, 1, 3, False, True, True, None, False),
            sample(5, 3, 4, 6, 2, True, True, True, torch.tensor([5, 2, 1]), False, "bf16")]


@pytest.mark.parametrize("index", range(4))
def test_opcheck_forward_and_backward(index):
    args = operator_samples()[index]
    torch.library.opcheck(pt.rnn_forward, args)
    output, h_n, lower_outputs = (t.detach() for t in pt.rnn_forward(*args))
    x, weights, h0, lengths, masks, L, bidirectional, nonlinearity, precision = args
    torch.library.opcheck(pt.rnn_backward, (torch.randn_like(output), torch.randn_like(h_n), x.detach(),
                                            [w.detach() for w in weights], output, lower_outputs,
                                            None if h0 is None else h0.detach(), lengths, masks, L,
                                            bidirectional, nonlinearity, precision))



def grads_of(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    output, h_n = model(x)
    (output.square().sum() + h_n.sum()).backward()
    return [output, h_n, x.grad] + [p.grad.clone() for p in model.parameters()]


@TORCH_JIT_DEPRECATED
def test_compile_fullgraph_equals_eager():
    torch.manual_seed(0)
    model = pt.RNN(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 6, 3)
    compiled = torch.compile(model, fullgraph=True)
    # Compiled here, not read from the caches a previous version of the operator may have filled.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        results = grads_of(compiled, x)
    for eager, fast in zip(grads_of(model, x), results):
        torch.testing.assert_close(fast, eager, rtol=0, atol=0)


def test_export_runs_the_operator():
    torch.manual_seed(0)
    model = pt.RNN(3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 3)
    program = torch.export.export(model, (x,))
    assert "torch.ops.pyrnn.rnn_forward" in program.graph_module.code
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


# --- fallbacks: torch's own computation, on the same parameters


def test_meta_tensors_fall_back(kernel_calls):
    model = pt.RNN(3, 5, num_layers=2, bidirectional=True, device="meta")
    output, h_n = model(torch.empty(6, 2, 3, device="meta"))
    assert output.device.type == "meta" and output.shape == (6, 2, 10) and h_n.shape == (4, 2, 5)
    assert pt.RNNCell(3, 5, device="meta")(torch.empty(2, 3, device="meta")).shape == (2, 5)
    assert kernel_calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_tensors_fall_back(kernel_calls):
    model = pt.RNN(3, 5).cuda()
    reference = torch.nn.RNN(3, 5).cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(6, 2, 3, device="cuda")
    torch.testing.assert_close(model(x), reference(x))
    assert kernel_calls == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_fall_back(dtype, kernel_calls):
    reference = torch.nn.RNN(3, 5, num_layers=2, dtype=dtype)
    ours = pt.RNN(3, 5, num_layers=2, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(6, 2, 3, dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(ours(x), reference(x)))
    cell = pt.RNNCell(3, 5, dtype=dtype)
    assert cell(x[0]).dtype == dtype
    assert kernel_calls == []


@pytest.mark.parametrize("bidirectional", [False, True])
def test_bf16_autocast_runs_the_kernel_in_bf16_products(bidirectional, kernel_calls):
    """torch.autocast("cpu", dtype=torch.bfloat16) selects precision="bf16": the results are
    pyrnn.stack_forward's in bf16 products, returned as bfloat16 as nn.RNN returns them there, and
    close to torch's own autocast computation (which also rounds every step's state to bf16);
    the parameters' gradients stay float32."""
    torch.manual_seed(0)
    reference = torch.nn.RNN(8, 16, num_layers=2, bidirectional=bidirectional)
    ours = pt.RNN(8, 16, num_layers=2, bidirectional=bidirectional)
    ours.load_state_dict(reference.state_dict())
    cell, reference_cell = pt.RNNCell(8, 16), torch.nn.RNNCell(8, 16)
    cell.load_state_dict(reference_cell.state_dict())
    x = torch.randn(12, 3, 8)
    h0 = torch.randn(2 * (2 if bidirectional else 1), 3, 16).to(torch.bfloat16)  # autocast's own dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (output, h_n), (expected_output, expected_h_n) = ours(x, h0), reference(x, h0)
        step, expected_step = cell(x[0]), reference_cell(x[0])
    assert len(kernel_calls) == 2
    assert (output.dtype, h_n.dtype, step.dtype) == (torch.bfloat16,) * 3
    flat = [w.detach().numpy() for w in ours._flat_weights]
    layers = [(flat[i], flat[i + 1], flat[i + 2] + flat[i + 3]) for i in range(0, len(flat), 4)]
    exact = pyrnn.stack_forward(x.numpy(), layers,
                                h0.float().numpy(), bidirectional=bidirectional, precision="bf16")
    torch.testing.assert_close(output, torch.from_numpy(exact.output).to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(h_n, torch.from_numpy(exact.h_n).to(torch.bfloat16), rtol=0, atol=0)
    # torch rounds its state to bf16 at every step as well; 2**-8 relative per rounding, a few steps deep
    torch.testing.assert_close(output.float(), expected_output.float(), rtol=0, atol=0.05)
    torch.testing.assert_close(h_n.float(), expected_h_n.float(), rtol=0, atol=0.05)
    torch.testing.assert_close(step.float(), expected_step.float(), rtol=0, atol=0.02)
    output.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in ours.parameters())


def test_other_autocasts_fall_back(kernel_calls):
    """float16 autocast, and float64 parameters under bf16 autocast (autocast leaves float64 alone:
    the kernel runs them as they are)."""
    reference, ours = torch.nn.RNN(3, 5), pt.RNN(3, 5)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(6, 2, 3)
    with torch.autocast("cpu", dtype=torch.float16):
        assert all(torch.equal(a, b) for a, b in zip(ours(x), reference(x)))
    assert kernel_calls == []
    ours64, reference64 = pt.RNN(3, 5, dtype=torch.float64), torch.nn.RNN(3, 5, dtype=torch.float64)
    ours64.load_state_dict(reference64.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (output, h_n), expected = ours64(x.double()), reference64(x.double())
    assert output.dtype == torch.float64 and len(kernel_calls) == 1
    torch.testing.assert_close((output, h_n), expected, rtol=0, atol=1e-12)


def test_double_backward_recomputes_through_torch():
    """A gradient penalty: the backward of a backward (create_graph=True)."""
    torch.manual_seed(0)
    reference = torch.nn.RNN(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = pt.RNN(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    x0 = torch.randn(5, 2, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 3])
    results = []
    for model in (reference, ours):
        x = x0.clone().requires_grad_()
        output, h_n = model(pack_padded_sequence(x, lengths))
        padded, _ = pad_packed_sequence(output)
        (grad_x,) = torch.autograd.grad(padded.tanh().sum() + h_n.sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        results.append([grad_x] + [p.grad for p in model.parameters()])
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


def test_functorch_transforms_fall_back(kernel_calls):
    torch.manual_seed(0)
    model = pt.RNN(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    params = dict(model.named_parameters())

    def loss(params):
        output, _ = torch.func.functional_call(model, params, (x,))
        return output.sum()

    grads = torch.func.grad(loss)(params)
    assert kernel_calls == []
    model(x)[0].sum().backward()  # the kernel, through autograd
    assert len(kernel_calls) == 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-12)


@TORCH_JIT_DEPRECATED
def test_forward_mode_ad_falls_back(kernel_calls):
    import torch.autograd.forward_ad as fwAD

    reference = torch.nn.RNN(3, 4, dtype=torch.float64)
    ours = pt.RNN(3, 4, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    x, tangent = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    jvps = []
    with fwAD.dual_level():
        for model in (reference, ours):
            output, _ = model(fwAD.make_dual(x, tangent))
            jvps.append(fwAD.unpack_dual(output).tangent)
    assert kernel_calls == []
    torch.testing.assert_close(*jvps, rtol=0, atol=0)



# --- threads and the boundary


@pytest.mark.skipif("cpp" not in pyrnn.available_backends(), reason="the native module is not built")
def test_pyrnn_set_num_threads_governs_the_kernel_inside_torch(monkeypatch):
    import pyrnn._cpp

    if pyrnn.resolve_backend() != "cpp":
        pytest.skip(f"the drop-in runs on {pyrnn.resolve_backend()} here ($PYRNN_BACKEND)")
    seen = []
    stack_forward = pyrnn.stack_forward

    def spying(*args, **kwargs):
        seen.append(pyrnn._cpp.get_num_threads())  # what the native kernel will use
        return stack_forward(*args, **kwargs)

    monkeypatch.setattr(pyrnn, "stack_forward", spying)
    torch.manual_seed(0)
    model = pt.RNN(256, 256)  # large enough for the kernel to split its work between threads
    x = torch.randn(20, 64, 256)
    torch_threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2):
            with _threads.limited_to(n):
                torch.set_num_threads(3 - n)  # torch's own setting does not reach the kernel
                outputs.append(model(x)[0])
    finally:
        torch.set_num_threads(torch_threads)
    assert seen == [1, 2]
    assert torch.equal(*outputs)  # and the kernel's results do not depend on the thread count



# --- distributed


def spawn_ddp_workers(result_path):
    """tests/ddp_training.worker on 2 processes (gloo on 127.0.0.1). They meet through a file
    (torch's FileStore) beside result_path, not a TCP port: a port found free here could be taken
    by another process before rank 0 binds it, and gloo's own connections take ports the system
    hands out."""
    import ddp_training

    if not torch.distributed.is_available():
        pytest.skip("this torch was built without torch.distributed")
    rendezvous = result_path.parent / "rendezvous"
    assert not rendezvous.exists()  # a FileStore starts from a new (or empty) file
    torch.multiprocessing.spawn(ddp_training.worker, args=(2, rendezvous.as_uri(), str(result_path)),
                                nprocs=2, join=True)


def test_ddp_on_two_processes_ends_where_one_process_does(tmp_path):
    """DistributedDataParallel (gloo, 2 processes on 127.0.0.1), each on half of the batch, ends
    with the parameters of one process trained on the whole batch."""
    import ddp_training

    result = tmp_path / "parameters.pt"
    spawn_ddp_workers(result)
    distributed = torch.load(result)
    expected = ddp_training.one_process()
    initial = dict(ddp_training.model().named_parameters())
    assert distributed.keys() == expected.keys()
    for name, value in expected.items():
        assert not torch.equal(value, initial[name]), name  # trained
        torch.testing.assert_close(distributed[name], value, rtol=0, atol=1e-12)


def test_ddp_workers_end_cleanly_when_gloo_lets_go_of_the_last_work_late(tmp_path, monkeypatch):
    """A DDP worker ends cleanly although gloo's thread lets go of the last allreduce's work only
    after every atexit hook (tests/held_gloo_thread holds it there, as a loaded machine can).
    Ending by finalizing the interpreter, the worker aborted there ("terminate called without an
    active exception"): see tests/ddp_training.py."""
    import ctypes
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if sys.platform != "linux":
        pytest.skip("the injector is an LD_PRELOAD library (Linux)")
    # c10d::ProcessGroupGloo::AsyncWork::execute(const c10::intrusive_ptr<AsyncWork>&), torch 2.13
    execute = ("_ZN4c10d16ProcessGroupGloo9AsyncWork7executeERKN3c1013intrusive_ptrIS1_NS2_6detail"
               "34intrusive_target_default_null_typeIS1_EEEE")
    if not hasattr(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")), execute):
        pytest.skip(f"torch {torch.__version__} has no {execute} to hold (the injector names torch 2.13's)")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build tests/held_gloo_thread/hold.cpp")
    injector = Path(__file__).parent / "held_gloo_thread"
    library, log = tmp_path / "held_gloo_thread.so", tmp_path / "holds"
    subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", f'-DEXECUTE="{execute}"',
                    str(injector / "hold.cpp"), "-o", str(library), "-ldl"], check=True, timeout=120)
    monkeypatch.setenv("HELD_GLOO_THREAD", str(library))
    monkeypatch.setenv("HELD_GLOO_THREAD_LOG", str(log))
    for name, path in (("LD_PRELOAD", library), ("PYTHONPATH", injector)):  # the workers inherit them
        monkeypatch.setenv(name, os.pathsep.join(filter(None, [str(path), os.environ.get(name)])))
    spawn_ddp_workers(tmp_path / "parameters.pt")
    assert len(set(log.read_text().split())) == 2, "the injector held gloo's thread in both workers"


def test_import_pyrnn_does_not_import_torch(tmp_path):
    """torch stays optional: pyrnn (and its bench module) import without it; pyrnn.torch imports it."""
    import subprocess
    import sys

    script = ("import sys, pyrnn, pyrnn.bench; assert 'torch' not in sys.modules, 'torch imported'; "
              "import pyrnn.torch; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=300)


def test_bench_torch_train_checks_then_times_each_case(monkeypatch):
    """`pyrnn bench --torch-train` on two small cases: the losses gate passes, both steps are
    timed, the boundary is measured on the one-layer case, and the table says so."""
    from pyrnn import bench, bench_torch

    monkeypatch.setattr(bench_torch, "CASES", {"one layer": bench_torch.Case(6, 2, 4, 5, 1, False),
                                               "stack": bench_torch.Case(6, 2, 4, 5, 2, True)})
    monkeypatch.setattr(bench, "SAMPLE_SECONDS", 1e-3)
    torch_threads = torch.get_num_threads()
    try:
        with _threads.limited_to(1):
            report = bench_torch.run([1], repeat=2, budget=0)
    finally:
        torch.set_num_threads(torch_threads)
    assert [(row["case"], row["status"]) for row in report["results"]] == [("one layer", "ok"), ("stack", "ok")]
    assert all(row["speedup"] > 0 for row in report["results"])
    # the step without its RNN is timed with them
    assert all(row["rest_s"] > 0 and row["speedup_bound"] == row["torch_s"] / row["rest_s"]
               for row in report["results"])
    text = bench_torch.format_report(report)
    assert "one layer" in text and "stack" in text and "ok" in text and "bound" in text and "torch floor" in text
    assert [row["case"] for row in report["overhead"]] == ["one layer"]
    assert all(row["torch_floor_s"] > 0 for row in report["overhead"])
    # the CPU's float32 limit, timed with them (by the native module): a step whose RNN ran at
    # that limit takes rest + the RNN's FLOP at it, and torch's step over that is below the bound
    # of an RNN that cost nothing
    if "cpp" not in pyrnn.available_backends():
        assert report["limit_gflops"] == {} and not any("limit_bound" in row for row in report["results"])
        return
    limit = report["limit_gflops"][1]
    assert limit > 0
    for row in report["results"]:
        at_limit = bench_torch.rnn_flop(bench_torch.CASES[row["case"]]) / (limit * 1e9)
        assert row["rnn_at_limit_s"] == at_limit
        assert row["limit_bound"] == row["torch_s"] / (row["rest_s"] + at_limit) < row["speedup_bound"]
