"""Time-series forecasting: predict a noisy sum of sines ``--horizon`` steps ahead.

The series is generated here: three sines (periods 25, 61 and 9.7 steps) plus Gaussian noise.
At every step t the model reads the observations up to t and predicts the observation at
t + horizon (many-to-many: an MSE at every step but the first few, while the state warms up).
It trains on random windows of the first 75% of the series and is scored on the rest, read
as one long sequence. The naive baselines are persistence (the value in `horizon` steps is
today's) and the training mean (ignore the input); no forecast can beat the noise variance,
which is in the target itself.

    python examples/forecast.py                       # ~2 s with the cpp backend
    python examples/forecast.py --plot forecast.png   # the forecast against the truth
"""
import argparse

import numpy as np

import pyrnn
from common import Run, add_run_options, pyplot, save
from pyrnn.losses import mse
from pyrnn.optim import adam, clip_grad_norm, parameters


def make_series(n, noise, rng):
    """(observed, clean): n steps of the sum of sines, with and without noise."""
    t = np.arange(n)
    clean = (np.sin(2 * np.pi * t / 25) + 0.5 * np.sin(2 * np.pi * t / 61 + 1)
             + 0.3 * np.sin(2 * np.pi * t / 9.7 + 2))
    return clean + noise * rng.standard_normal(n), clean


def forecast(rnn, head, series):
    """Predictions (len(series),): at each t, the value expected at t + horizon."""
    output, _ = rnn(series[:, None, None].astype(rnn.dtype))  # one sequence: (T, 1, 1)
    return head(output)[:, 0, 0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=8000, help="steps in the series")
    parser.add_argument("--noise", type=float, default=0.1, help="standard deviation of the noise")
    parser.add_argument("--horizon", type=int, default=10, help="how many steps ahead to predict")
    parser.add_argument("--steps", type=int, default=600, help="training batches")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=100, help="training window length")
    parser.add_argument("--warmup", type=int, default=20, help="first steps of a window left unscored")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2, help="initial learning rate, decayed linearly to 0")
    parser.add_argument("--clip", type=float, default=1.0, help="max global gradient norm")
    parser.add_argument("--eval-every", type=int, default=100)
    add_run_options(parser, "the forecast against the truth")
    args = parser.parse_args(argv)
    run = Run(args)
    rng = run.rng

    series, clean = make_series(args.length, args.noise, rng)
    split = int(0.75 * args.length)
    test = series[split:]
    h, warm = args.horizon, args.warmup
    truth = test[warm + h:]  # what is predicted at steps warm .. len(test) - h - 1
    persistence = float(np.mean((test[warm:-h] - truth) ** 2))
    mean_only = float(np.mean((series[:split].mean() - truth) ** 2))  # ignores the input entirely
    print(f"series of {args.length} steps, noise {args.noise}, predicting {h} steps ahead; backend {run.backend}")

    rnn = pyrnn.RNN(1, args.hidden, args.layers, backend=args.backend, seed=rng,
                     precision=args.precision)
    head = pyrnn.Linear(args.hidden, 1, seed=rng)
    params, grads = parameters(rnn=rnn, head=head)
    state, losses, curve = {}, [], []
    T = args.window
    scored = (np.arange(T) >= warm)[:, None, None]  # (T, 1, 1): broadcasts over the batch
    for step in range(args.steps):
        starts = rng.integers(0, split - T - h, size=args.batch)
        windows = series[starts[None, :] + np.arange(T + h)[:, None]]  # (T + h, B)
        x, target = windows[:T, :, None], windows[h:, :, None]
        output, _ = rnn(x.astype(rnn.dtype))
        loss, grad_prediction = mse(head(output), target, scored)
        rnn.backward(head.backward(grad_prediction))
        clip_grad_norm(grads, args.clip)
        adam(params, grads, state, lr=args.lr * (1 - step / args.steps))
        losses.append(loss)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            predictions = forecast(rnn, head, test)
            test_mse = float(np.mean((predictions[warm:-h] - truth) ** 2))
            curve.append((step + 1, test_mse))
            print(f"step {step + 1:4d}  train MSE {np.mean(losses[-args.eval_every:]):.4f}  "
                  f"test MSE {test_mse:.4f}  {run.elapsed():5.1f} s")

    print(f"test MSE {test_mse:.4f} (persistence baseline {persistence:.4f}, training mean "
          f"{mean_only:.4f}, noise floor {args.noise ** 2:.4f}) in {run.elapsed():.1f} s")
    if args.plot:
        plot(test, clean[split:], predictions, h, warm, losses, curve, args.plot)
    return {"losses": losses, "mse": test_mse, "persistence_mse": persistence}


def plot(test, clean, predictions, h, warm, losses, curve, path):
    plt = pyplot()

    figure, (series_axes, loss_axes) = plt.subplots(2, 1, figsize=(9, 7))
    shown = np.arange(warm + h, min(len(test), warm + h + 250))
    series_axes.plot(shown, test[shown], ".", color="grey", markersize=3, label="observed")
    series_axes.plot(shown, clean[shown], color="black", linewidth=1, label="clean signal")
    series_axes.plot(shown, predictions[shown - h], label=f"RNN, {h} steps ahead")
    series_axes.plot(shown, test[shown - h], alpha=0.6, label="persistence")
    series_axes.set(xlabel="test step", title="forecast against the truth")
    series_axes.legend(loc="upper right", fontsize=8)
    loss_axes.semilogy(np.arange(1, len(losses) + 1), losses, alpha=0.5, label="train MSE")
    loss_axes.semilogy(*zip(*curve), "o-", label="test MSE")
    loss_axes.set(xlabel="step", ylabel="MSE")
    loss_axes.legend()
    save(figure, path)


if __name__ == "__main__":
    main()
