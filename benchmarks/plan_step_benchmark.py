"""Seconds per ``plan_pgd_box`` attack step on MNIST, optionally beside an earlier commit (a script, not a test).

The first ``--n`` MNIST test images are attacked by plan-space PGD with the
box (``PlanPGDIterate``: 5x5 window, ``--p``, ``step_size`` 0.1) against a
paper model for ``--steps`` steps, the radius growing geometrically from
``--eps-start`` to ``--eps-end``. The whole batch stays in every step (no
example leaves when fooled), so every step does the same work. Each step is
one cross-entropy gradient of the model at the current image and one
``iterate.step``; only ``iterate.step`` is timed.

With ``--baseline COMMIT`` the ``solvers`` package of that commit (``git
archive``) is imported beside this checkout's as a separate package, and
the two attacks run side by side, alternating step by step (each with its
own trajectory), so machine load hits both alike. Reported per version: the
median and total seconds per step, Newton iterations per step and
unconverged example-steps; and the largest difference between the two
trajectories' images (``max |z - z_baseline|``) after the first step and
after the last (trajectories may drift apart once a model's argmax flips,
so the first step is the like-for-like check).

Usage::

    python benchmarks/plan_step_benchmark.py [--n 100] [--steps 20] [--model mnist/standard]
        [--p 1] [--eps-start 0.05] [--eps-end 0.5] [--baseline COMMIT] [--threads N]

The data root (folder containing ``MNIST/raw``) defaults to ``$DATA_ROOT``;
the weights folder to ``$WEIGHTS_DIR``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from harness.data import mnist_test_subset  # noqa: E402


def baseline_solvers(commit: str, folder: str):
    """The ``solvers`` package of ``commit``, imported as ``baseline_solvers`` (its imports are relative)."""
    archive = subprocess.run(["git", "archive", commit, "solvers"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    os.rename(os.path.join(folder, "solvers"), os.path.join(folder, "baseline_solvers"))
    sys.path.insert(0, folder)
    return importlib.import_module("baseline_solvers.plan_space")


class Trajectory:
    """One attack on the batch: its iterate, state and per-step records."""

    def __init__(self, name, plan_space, model, x, y, args):
        self.name, self.model, self.y = name, model, y
        self.iterate = plan_space.PlanPGDIterate(kernel_size=5, p=args.p, step_size=0.1, box=True)
        self.state = self.iterate.start(x, args.eps_start)
        self.seconds, self.iterations, self.unconverged, self.images = [], [], 0, []

    def step(self, eps: float, index: int) -> None:
        image = self.state.image.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(self.model(image), self.y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, image)
        started = time.perf_counter()
        with torch.no_grad():
            self.state, report = self.iterate.step(self.state, grad, eps, index)
        self.seconds.append(time.perf_counter() - started)
        self.iterations.append(float(report.solver_iterations.double().mean()))
        self.unconverged += int((~report.converged).sum())
        self.images.append(self.state.image.detach().clone())

    def summary(self) -> str:
        return (
            f"{self.name:>9}: median {statistics.median(self.seconds):.3f} s/step, total {sum(self.seconds):.2f} s, "
            f"Newton iterations/step (mean over examples) median {statistics.median(self.iterations):.1f}, "
            f"unconverged example-steps {self.unconverged}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT"))
    parser.add_argument("--weights-dir", default=os.environ.get("WEIGHTS_DIR"))
    parser.add_argument("--model", default="mnist/standard")
    parser.add_argument("--n", type=int, default=100, help="test images (default 100)")
    parser.add_argument("--steps", type=int, default=20, help="attack steps (default 20)")
    parser.add_argument("--p", type=float, default=1.0)
    parser.add_argument("--eps-start", type=float, default=0.05)
    parser.add_argument("--eps-end", type=float, default=0.5)
    parser.add_argument("--baseline", metavar="COMMIT", help="also time this commit's solvers, alternating step by step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.data_root is None:
        parser.error("--data-root (or $DATA_ROOT) is required")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x, y = mnist_test_subset(args.data_root, args.n)
    model = zoo.model(args.model, weights_dir=args.weights_dir).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    import solvers.plan_space as current

    with tempfile.TemporaryDirectory() as folder:
        runs = [Trajectory("current", current, model, x, y, args)]
        if args.baseline:
            runs.insert(0, Trajectory(f"{args.baseline[:9]}", baseline_solvers(args.baseline, folder), model, x, y, args))
        growth = (args.eps_end / args.eps_start) ** (1 / max(args.steps - 1, 1))
        for index in range(args.steps):
            eps = args.eps_start * growth**index
            # Alternate which version goes first, so neither always runs right after the model's pass.
            for run in runs if index % 2 == 0 else runs[::-1]:
                run.step(eps, index)
    print(
        f"plan_pgd_box steps: {args.model}, first {args.n} MNIST test images, 5x5, p={args.p:g}, "
        f"eps {args.eps_start:g} -> {args.eps_end:g} over {args.steps} steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for run in runs:
        print(run.summary())
    if len(runs) == 2:
        before, after = runs
        ratio = statistics.median(before.seconds) / statistics.median(after.seconds)
        per_step = [b / a for b, a in zip(before.seconds, after.seconds)]
        print(f"speed-up (median before / median after): {ratio:.2f}x; median of per-step ratios {statistics.median(per_step):.2f}x")
        first = float((before.images[0] - after.images[0]).abs().max())
        last = float((before.images[-1] - after.images[-1]).abs().max())
        print(f"max |z - z_baseline|: after step 1 {first:.2e}, after step {args.steps} {last:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
