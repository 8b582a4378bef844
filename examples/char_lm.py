"""Character-level language model (many-to-many) on text that ships with Python.

The text is the source of a standard-library module (``--module``, default argparse: ~100 kB
of code and English docstrings, no download). Its first 90% trains, the last 10% measures
perplexity. The model is min-char-rnn's: one-hot characters -> pyrnn.RNN -> Linear ->
softmax, a cross-entropy at every step, trained with truncated BPTT: ``--batch`` streams read
the training text side by side in chunks of ``--seq-len`` characters, each chunk starting from
the state the previous one ended in. Adam, gradient clipping, then a sample of generated text.

    python examples/char_lm.py                        # ~4 s with the cpp backend
    PYRNN_BACKEND=numba python examples/char_lm.py --plot char_lm.png
"""
import argparse
import importlib
import inspect

import numpy as np

import pyrnn
from common import Run, add_run_options, pyplot, save
from pyrnn.losses import softmax, softmax_cross_entropy
from pyrnn.optim import adam, clip_grad_norm, parameters, truncated_bptt


def load_text(module_name):
    return inspect.getsource(importlib.import_module(module_name))


def streams(ids, batch):
    """(T, batch) array: the id sequence cut into batch contiguous streams, one per column."""
    T = len(ids) // batch
    return ids[: T * batch].reshape(batch, T).T


def one_hot(ids, vocabulary_size, dtype):
    return np.eye(vocabulary_size, dtype=dtype)[ids]


def evaluate(rnn, head, ids, vocabulary_size, batch, seq_len):
    """Mean cross-entropy (nats per character) of predicting each next character of ids."""
    data = streams(ids, batch)
    h, total, count = None, 0.0, 0
    for steps, _ in truncated_bptt(len(data) - 1, seq_len):
        output, h = rnn(one_hot(data[steps], vocabulary_size, rnn.dtype), h)
        targets = data[steps.start + 1: steps.stop + 1]
        loss, _ = softmax_cross_entropy(head(output), targets)
        total, count = total + loss * targets.size, count + targets.size
    return total / count


def sample(rnn, head, start_id, length, vocabulary_size, temperature, rng):
    """Generate length ids, one step at a time, each fed back as the next input."""
    ids, h = [start_id], None
    for _ in range(length):
        output, h = rnn(one_hot(np.array([[ids[-1]]]), vocabulary_size, rnn.dtype), h)
        probabilities = softmax(head(output[0, 0]).astype(np.float64) / temperature)
        ids.append(int(rng.choice(vocabulary_size, p=probabilities)))
    return ids[1:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", default="argparse", help="stdlib module whose source is the text")
    parser.add_argument("--steps", type=int, default=400, help="training chunks")
    parser.add_argument("--batch", type=int, default=32, help="streams read side by side")
    parser.add_argument("--seq-len", type=int, default=64, help="truncated BPTT length")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--clip", type=float, default=5.0, help="max global gradient norm")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--sample-length", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.7)
    add_run_options(parser, "the loss curve")
    args = parser.parse_args(argv)
    run = Run(args)
    rng = run.rng

    text = load_text(args.module)
    alphabet = sorted(set(text))
    V = len(alphabet)
    index = {c: i for i, c in enumerate(alphabet)}
    ids = np.array([index[c] for c in text])
    split = int(0.9 * len(ids))
    train, valid = ids[:split], ids[split:]
    counts = np.bincount(train, minlength=V) + 1  # add-one: every character has some probability
    unigram_loss = -np.mean(np.log(counts / counts.sum())[valid])
    print(f"text: source of {args.module} ({len(text)} characters, {V} distinct); backend {run.backend}")

    rnn = pyrnn.RNN(V, args.hidden, args.layers, backend=args.backend, seed=rng,
                     precision=args.precision)
    head = pyrnn.Linear(args.hidden, V, seed=rng)
    params, grads = parameters(rnn=rnn, head=head)
    state = {}
    data = streams(train, args.batch)
    chunks = list(truncated_bptt(len(data) - 1, args.seq_len))
    losses, curve = [], []
    h = None
    for step in range(args.steps):
        chunk = step % len(chunks)
        if chunk == 0:
            h = None  # back at the start of the streams: start from a zero state
        steps, _ = chunks[chunk]
        output, h = rnn(one_hot(data[steps], V, rnn.dtype), h)
        loss, grad_logits = softmax_cross_entropy(head(output), data[steps.start + 1: steps.stop + 1])
        rnn.backward(head.backward(grad_logits))  # stops at this chunk's h0: truncated BPTT
        norm = clip_grad_norm(grads, args.clip)
        adam(params, grads, state, lr=args.lr)
        losses.append(loss)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            valid_loss = evaluate(rnn, head, valid, V, args.batch, args.seq_len)
            curve.append((step + 1, valid_loss))
            print(f"step {step + 1:5d}  train loss {np.mean(losses[-args.eval_every:]):.3f}  "
                  f"valid perplexity {np.exp(valid_loss):6.2f}  grad norm {norm:.2f}  "
                  f"{run.elapsed():5.1f} s")

    generated = sample(rnn, head, alphabet.index("\n"), args.sample_length, V, args.temperature, rng)
    print("--- sample ---\n" + "".join(alphabet[i] for i in generated) + "\n--------------")
    perplexity = float(np.exp(curve[-1][1]))
    print(f"valid perplexity {perplexity:.2f} (unigram baseline {np.exp(unigram_loss):.2f}, "
          f"uniform {V}) in {run.elapsed():.1f} s")
    if args.plot:
        plot(losses, curve, args.plot)
    return {"losses": losses, "perplexity": perplexity, "unigram_perplexity": float(np.exp(unigram_loss))}


def plot(losses, curve, path):
    plt = pyplot()

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(np.arange(1, len(losses) + 1), losses, alpha=0.5, label="train (per chunk)")
    axes.plot(*zip(*curve), "o-", label="valid")
    axes.set(xlabel="step", ylabel="cross-entropy (nats / character)", title="char_lm")
    axes.legend()
    save(figure, path)


if __name__ == "__main__":
    main()
