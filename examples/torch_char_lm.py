"""Character-level language model in plain PyTorch, with torch.nn.RNN or pyrnn's drop-in.

The same task as char_lm.py (the source of a standard-library module, first 90% to train, last
10% for perplexity), written as a torch user writes it: Embedding -> RNN -> Linear, cross-entropy
at every step, truncated BPTT over --batch streams, Adam, gradient clipping. ``--rnn pyrnn`` swaps
the one line that builds the RNN (pyrnn.torch.RNN instead of torch.nn.RNN); ``--rnn both`` (the
default) trains the two from the same initial weights on the same chunks, one step each in turn,
and prints both perplexities and the speed-up of the training steps.

    python examples/torch_char_lm.py                  # both, ~20 s on 2 cores
    python examples/torch_char_lm.py --rnn pyrnn --steps 1000
"""
import argparse
import copy
import time

import numpy as np
import torch

import pyrnn.torch
from char_lm import load_text, streams


class CharModel(torch.nn.Module):
    def __init__(self, vocabulary_size, embedding_size, hidden_size, num_layers):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocabulary_size, embedding_size)
        self.rnn = torch.nn.RNN(embedding_size, hidden_size, num_layers)
        self.head = torch.nn.Linear(hidden_size, vocabulary_size)

    def forward(self, ids, h=None):
        output, h = self.rnn(self.embedding(ids), h)
        return self.head(output), h


class Trainer:
    """One model, its optimizer, its carried state and the time its steps took."""

    def __init__(self, model, lr, clip):
        self.model, self.clip = model, clip
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.h, self.seconds = None, 0.0

    def step(self, inputs, targets):
        start = time.perf_counter()
        logits, h = self.model(inputs, self.h)
        self.h = h.detach()  # truncated BPTT: the next chunk starts from this state, not through it
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.seconds += time.perf_counter() - start
        return loss.item()


@torch.no_grad()
def evaluate(model, data, seq_len):
    """Mean cross-entropy (nats per character) of predicting each next character of data (T, B)."""
    h, total, count = None, 0.0, 0
    for start in range(0, len(data) - 1, seq_len):
        inputs, targets = data[start:start + seq_len], data[start + 1:start + seq_len + 1]
        inputs = inputs[:len(targets)]
        logits, h = model(inputs, h)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total / count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rnn", choices=["torch", "pyrnn", "both"], default="both")
    parser.add_argument("--module", default="argparse", help="stdlib module whose source is the text")
    parser.add_argument("--steps", type=int, default=400, help="training chunks")
    parser.add_argument("--batch", type=int, default=32, help="streams read side by side")
    parser.add_argument("--seq-len", type=int, default=64, help="truncated BPTT length")
    parser.add_argument("--embedding", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--clip", type=float, default=5.0, help="max global gradient norm")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and the kernel (torch and pyrnn.set_num_threads; 0: their defaults)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        pyrnn.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    text = load_text(args.module)
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    ids = np.array([index[c] for c in text])
    split = int(0.9 * len(ids))
    train = torch.from_numpy(streams(ids[:split], args.batch))  # (T, batch) int64
    valid = torch.from_numpy(streams(ids[split:], args.batch))
    print(f"text: source of {args.module} ({len(text)} characters, {len(alphabet)} distinct); rnn {args.rnn}")

    model = CharModel(len(alphabet), args.embedding, args.hidden, args.layers)
    models = {"torch": model, "pyrnn": pyrnn.torch.convert(copy.deepcopy(model))}  # the same weights
    names = ["torch", "pyrnn"] if args.rnn == "both" else [args.rnn]
    trainers = {name: Trainer(models[name], args.lr, args.clip) for name in names}
    starts = range(0, len(train) - 1 - args.seq_len, args.seq_len)
    losses = {name: [] for name in names}
    for step in range(args.steps):
        start = starts[step % len(starts)]
        inputs, targets = train[start:start + args.seq_len], train[start + 1:start + args.seq_len + 1]
        for name, trainer in trainers.items():
            if start == 0:
                trainer.h = None  # back at the start of the streams: from a zero state
            losses[name].append(trainer.step(inputs, targets))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            report = "  ".join(f"{name}: train loss {np.mean(losses[name][-args.eval_every:]):.3f} "
                               f"valid perplexity {np.exp(evaluate(models[name], valid, args.seq_len)):6.2f}"
                               for name in names)
            print(f"step {step + 1:5d}  {report}")

    perplexity = {name: float(np.exp(evaluate(models[name], valid, args.seq_len))) for name in names}
    for name in names:
        print(f"{name}: valid perplexity {perplexity[name]:.2f}, {trainers[name].seconds:.2f} s in "
              f"{args.steps} training steps ({1e3 * trainers[name].seconds / args.steps:.2f} ms a step)")
    result = {"losses": losses, "perplexity": perplexity, "seconds": {n: t.seconds for n, t in trainers.items()}}
    if args.rnn == "both":
        result["speedup"] = trainers["torch"].seconds / trainers["pyrnn"].seconds
        print(f"speed-up of pyrnn's drop-in over torch.nn.RNN: {result['speedup']:.2f}x (training steps)")
    return result


if __name__ == "__main__":
    main()
