"""Many-to-one classification of variable-length sequences: is a "review" positive or negative?

The data is generated here. A review is 3 to 24 tokens: filler words, positive and negative
words, and "not", which flips the sentiment of the word right after it. The label says whether
the positive sentiment outweighs the negative. Counting words alone (a bag of words) gets the
reviews with a negation wrong; the RNN must read in order. It reads each padded batch with
``lengths`` (padding is skipped, not read), and the classifier looks at each row's last valid
step (pyrnn.nn.select_last). Binary cross-entropy with logits, Adam, accuracy on a held-out split.

    python examples/classify.py                       # ~3 s with the cpp backend
    PYRNN_BACKEND=numpy python examples/classify.py --plot classify.png
"""
import argparse

import numpy as np

import pyrnn
from common import Run, add_run_options, pyplot, save
from pyrnn.losses import bce_with_logits
from pyrnn.nn import select_last, select_last_backward
from pyrnn.optim import adam, clip_grad_norm, parameters

POSITIVE = ["good", "great", "fun", "superb"]
NEGATIVE = ["bad", "dull", "awful", "weak"]
FILLER = ["the", "film", "was", "plot", "and", "actors", "very", "but"]
VOCABULARY = POSITIVE + NEGATIVE + FILLER + ["not"]
SENTIMENT = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}


def sentiment(words, negation=True):
    """Σ ±1 over sentiment words, a word right after "not" counting with the opposite sign."""
    return sum(SENTIMENT.get(word, 0) * (-1 if negation and previous == "not" else 1)
               for previous, word in zip([None] + words[:-1], words))


def make_reviews(n, rng, min_length=3, max_length=24):
    """n (token ids, label) pairs; ties are redrawn so every review has a clear label."""
    reviews = []
    while len(reviews) < n:
        length = int(rng.integers(min_length, max_length + 1))
        kinds = rng.choice(4, size=length, p=[0.45, 0.2, 0.2, 0.15])  # filler, +, -, not
        pools = [FILLER, POSITIVE, NEGATIVE, ["not"]]
        words = [pools[k][rng.integers(len(pools[k]))] for k in kinds]
        score = sentiment(words)
        if score != 0:
            reviews.append((words, int(score > 0)))
    return reviews


def batch_arrays(reviews, dtype):
    """Padded one-hot batch (T, B, V), lengths (B,) and labels (B, 1)."""
    lengths = np.array([len(words) for words, _ in reviews])
    x = np.zeros((lengths.max(), len(reviews), len(VOCABULARY)), dtype=dtype)
    for b, (words, _) in enumerate(reviews):
        x[np.arange(len(words)), b, [VOCABULARY.index(w) for w in words]] = 1
    labels = np.array([[label] for _, label in reviews], dtype=dtype)
    return x, lengths, labels


def predict(rnn, head, reviews):
    """Logits (B, 1) for reviews."""
    x, lengths, _ = batch_arrays(reviews, rnn.dtype)
    output, _ = rnn(x, lengths=lengths)
    return head(select_last(output, lengths))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=6000, help="training reviews")
    parser.add_argument("--test", type=int, default=2000, help="held-out reviews")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-3, help="initial learning rate, decayed linearly to 0")
    parser.add_argument("--clip", type=float, default=1.0, help="max global gradient norm")
    add_run_options(parser, "the loss and accuracy curves")
    args = parser.parse_args(argv)
    run = Run(args)
    rng = run.rng

    train, test = make_reviews(args.train, rng), make_reviews(args.test, rng)
    test_labels = np.array([label for _, label in test])
    bag_of_words = np.mean([int(sentiment(words, negation=False) > 0) == label for words, label in test])
    print(f"{len(train)} training and {len(test)} test reviews, e.g. {' '.join(train[0][0])!r} -> "
          f"{train[0][1]}; backend {run.backend}")

    rnn = pyrnn.RNN(len(VOCABULARY), args.hidden, args.layers, backend=args.backend, seed=rng,
                     precision=args.precision)
    head = pyrnn.Linear(args.hidden, 1, seed=rng)
    params, grads = parameters(rnn=rnn, head=head)
    state, losses, curve = {}, [], []
    total_steps = args.epochs * -(-len(train) // args.batch)
    for epoch in range(args.epochs):
        order = rng.permutation(len(train))
        for start in range(0, len(train), args.batch):
            x, lengths, labels = batch_arrays([train[i] for i in order[start:start + args.batch]], rnn.dtype)
            output, _ = rnn(x, lengths=lengths)
            loss, grad_logits = bce_with_logits(head(select_last(output, lengths)), labels)
            rnn.backward(select_last_backward(head.backward(grad_logits), lengths, len(x)))
            clip_grad_norm(grads, args.clip)
            adam(params, grads, state, lr=args.lr * (1 - len(losses) / total_steps))
            losses.append(loss)
        accuracy = float(np.mean((predict(rnn, head, test)[:, 0] > 0) == test_labels))
        curve.append((len(losses), accuracy))
        print(f"epoch {epoch + 1:2d}  train loss {np.mean(losses[-len(train) // args.batch:]):.3f}  "
              f"test accuracy {accuracy:.3f}  {run.elapsed():5.1f} s")

    print(f"test accuracy {accuracy:.3f} (bag of words ignoring order {bag_of_words:.3f}, "
          f"majority class {max(test_labels.mean(), 1 - test_labels.mean()):.3f}) "
          f"in {run.elapsed():.1f} s")
    if args.plot:
        plot(losses, curve, args.plot)
    return {"losses": losses, "accuracy": accuracy, "bag_of_words_accuracy": float(bag_of_words)}


def plot(losses, curve, path):
    plt = pyplot()

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(np.arange(1, len(losses) + 1), losses, alpha=0.6)
    loss_axes.set(xlabel="step", ylabel="binary cross-entropy", title="training loss")
    accuracy_axes.plot(*zip(*curve), "o-")
    accuracy_axes.set(xlabel="step", ylabel="accuracy", title="held-out accuracy")
    save(figure, path)


if __name__ == "__main__":
    main()
