"""Training under torch.distributed DistributedDataParallel, for tests/test_torch_dropin.py: each
process of the group trains the same model (Embedding -> pyrnn.torch.RNN -> Linear) on its own
rows of one batch, and DDP averages the gradients. Imported by the spawned processes (tests/ is
on their sys.path, as on the parent's)."""
import os
import sys

import torch

import pyrnn
import pyrnn.torch

STEPS, BATCH, T, VOCABULARY = 3, 8, 7, 11


def model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "embedding": torch.nn.Embedding(VOCABULARY, 5),
        "rnn": pyrnn.torch.RNN(5, 6, num_layers=2, bidirectional=True),
        "head": torch.nn.Linear(12, VOCABULARY)}).double()


def batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCABULARY, (T, BATCH), generator=generator),
            torch.randint(0, VOCABULARY, (T, BATCH), generator=generator))


def train(forward, parameters, ids, targets):
    """STEPS of SGD on the mean cross-entropy over the given rows."""
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    for _ in range(STEPS):
        optimizer.zero_grad()
        logits = forward(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        optimizer.step()


def forward_of(modules):
    def forward(ids):
        output, _ = modules["rnn"](modules["embedding"](ids))
        return modules["head"](output)
    return forward


class Wrapped(torch.nn.Module):
    """The ModuleDict as one module with a forward, which DDP needs."""

    def __init__(self, modules):
        super().__init__()
        self.modules_ = modules

    def forward(self, ids):
        return forward_of(self.modules_)(ids)


def one_process():
    """{name: parameter} after training on the whole batch in this process."""
    modules = model()
    train(forward_of(modules), modules.parameters(), *batch())
    return {name: p.detach() for name, p in modules.named_parameters()}


def worker(rank, world_size, init_method, result_path):
    """One process of the group: its rows of the batch; rank 0 saves the parameters."""
    torch.set_num_threads(1)
    pyrnn.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        modules = model()
        ddp = torch.nn.parallel.DistributedDataParallel(Wrapped(modules))
        rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        ids, targets = batch()
        train(ddp, ddp.parameters(), ids[:, rows], targets[:, rows])
        if rank == 0:
            torch.save({name: p.detach() for name, p in modules.named_parameters()}, result_path)
    finally:
        torch.distributed.destroy_process_group()
    # The process ends here, without finalizing the interpreter, because a gloo thread may abort
    # it (pytorch/pytorch#117762; tests/test_torch_integration.py forces the race). The last
    # allreduce's work keeps a copy of the thread-local state, and with it the Python context
    # that backward() stashes there; gloo's run-loop thread, if it lets go of the work last, takes
    # the GIL to release that context. Once finalization has begun, CPython (before 3.14) ends a
    # thread taking the GIL with pthread_exit, whose unwinding through the work's noexcept
    # destructor calls std::terminate ("terminate called without an active exception").
    # destroy_process_group does not stop the thread (torch keeps the group alive), and the
    # thread is late when the machine is loaded. On an error the exception propagates instead:
    # spawn reports it from its error file.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
