"""Vanishing and exploding gradients, shown: how much of a loss's gradient reaches each step.

Nothing is trained. For weight_hh scaled to spectral radius 0.5, 1 and 1.5 (a random Gaussian
matrix divided by its largest |eigenvalue|, times the radius), one forward pass runs over T steps
and pyrnn.backward takes a loss on the last step only, L = Σ_b r_b · h_T,b with a fixed random r.
The gradient reaching step t is dL/dx_t = (Π_{s>t} J_s)ᵀ-shaped products of the step Jacobians
J_s = diag(tanh'(·)) · weight_hh: a radius below 1 shrinks it by about that factor per step back
(vanishing), above 1 it grows (exploding) while the units stay out of saturation. A strong input
saturates them (tanh' → 0), which shrinks every J_s: the same radius 1.5 driven by ten times the
input is drawn too, and its gradient no longer explodes.

Then clipping: pyrnn.optim.clip_grad_norm rescales the weights' gradients to a bounded global
norm, over a sweep of radii. It bounds the size of an update and keeps its direction; it does
not bring back the early steps' share of a vanishing gradient.

    python examples/gradient_flow.py                          # the table, in ~1 s
    python examples/gradient_flow.py --plot gradient_flow.png # the figure of docs/gradient-flow.md
"""
import argparse

import numpy as np

import pyrnn
from common import Run, add_run_options, pyplot, save
from pyrnn.optim import clip_grad_norm

RADII = (0.5, 1.0, 1.5)


def recurrent_weights(H, radius, rng):
    """A random (H, H) matrix with spectral radius `radius` (max |eigenvalue|)."""
    weight = rng.standard_normal((H, H))
    return weight * (radius / np.max(np.abs(np.linalg.eigvals(weight))))


def last_step_gradients(radius, input_scale, args, rng, backend):
    """pyrnn.Grads of a loss on the last step only, with weight_hh of spectral radius `radius`
    and inputs x of standard deviation `input_scale`."""
    T, B, I, H = args.steps, args.batch, args.input, args.hidden
    x = input_scale * rng.standard_normal((T, B, I))
    weight_ih = rng.uniform(-I**-0.5, I**-0.5, (H, I))
    weight_hh = recurrent_weights(H, radius, rng)
    output, _ = pyrnn.forward(x, weight_ih, weight_hh, backend=backend)
    grad_output = np.zeros_like(output)
    grad_output[-1] = rng.standard_normal((B, H))  # dL/dh_T: the loss reads the last step only
    return pyrnn.backward(grad_output, x, weight_ih, weight_hh, output, backend=backend)


def gradient_per_step(grads):
    """‖dL/dx_t‖ over the batch and the features, for every step t."""
    return np.sqrt(np.sum(grads.x**2, axis=(1, 2)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="sequence length T")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--input-scale", type=float, default=0.1,
                        help="standard deviation of the inputs (default: %(default)s, the units stay unsaturated)")
    parser.add_argument("--max-norm", type=float, default=100.0,
                        help="clip_grad_norm's limit (default: %(default)s, inside the range the sweep spans)")
    add_run_options(parser, "the figure")
    args = parser.parse_args(argv)
    run = Run(args)
    print(f"backend {run.backend}, T={args.steps} B={args.batch} I={args.input} H={args.hidden}, float64")

    # Every radius sees the same random draws (a generator per radius from one seed): the curves
    # differ by the scaling of weight_hh alone.
    seeds = run.rng.integers(2**32, size=2)
    cases = [(radius, args.input_scale) for radius in RADII] + [(RADII[-1], 10 * args.input_scale)]
    per_step = {case: gradient_per_step(last_step_gradients(*case, args, np.random.default_rng(seeds[0]),
                                                            run.backend))
                for case in cases}
    shown = (0, args.steps // 2, args.steps - 1)
    print(f"{'radius':>6s} {'input':>6s} " + " ".join(f"{f'‖dL/dx_{t}‖':>12s}" for t in shown))
    for (radius, scale), norms in per_step.items():
        print(f"{radius:6.2f} {scale:6.2f} " + " ".join(f"{norms[t]:12.3e}" for t in shown))

    sweep = np.linspace(0.3, 1.7, 29)
    before, after = [], []
    for radius in sweep:
        grads = last_step_gradients(radius, args.input_scale, args, np.random.default_rng(seeds[1]), run.backend)
        weights = {"weight_ih": grads.weight_ih, "weight_hh": grads.weight_hh, "bias": grads.bias}
        before.append(clip_grad_norm(weights, args.max_norm))  # returns the norm before clipping
        after.append(np.sqrt(sum(np.sum(g**2) for g in weights.values())))
    clipped_from = next((r for r, norm in zip(sweep, before) if norm > args.max_norm), None)
    print(f"clip_grad_norm(max_norm={args.max_norm:g}): the weights' gradient norm is {min(before):.2e} .. "
          f"{max(before):.2e} over radii {sweep[0]:.1f} .. {sweep[-1]:.1f}; after clipping at most "
          f"{max(after):.3g} (scaled down from radius {clipped_from:.2f} on)")

    if args.plot:
        plt = pyplot()
        figure, (flow, clipped) = plt.subplots(1, 2, figsize=(11, 4.2))
        for (radius, scale), norms in per_step.items():
            saturated = scale != args.input_scale
            flow.semilogy(np.arange(args.steps), norms, "--" if saturated else "-",
                          label=f"spectral radius {radius:g}" + (f", input ×{scale / args.input_scale:g}"
                                                                 if saturated else ""))
        flow.set_xlabel("step t (the loss reads step T - 1 only)")
        flow.set_ylabel("‖dL/dx_t‖")
        flow.set_title("The gradient reaching each step")
        flow.legend()
        clipped.semilogy(sweep, before, "o-", label="before clipping")
        clipped.semilogy(sweep, after, "s--", label=f"after clip_grad_norm(max_norm={args.max_norm:g})")
        clipped.set_xlabel("spectral radius of weight_hh")
        clipped.set_ylabel("‖dL/dweights‖ (global norm)")
        clipped.set_title("What clipping does to the weights' gradient")
        clipped.legend()
        save(figure, args.plot)
    return {"per_step": per_step, "radii": sweep, "norm_before": np.array(before),
            "norm_after": np.array(after)}


if __name__ == "__main__":
    main()
