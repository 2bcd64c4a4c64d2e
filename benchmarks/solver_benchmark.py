"""Speed and accuracy of the projection solvers on real MNIST (a script, not a test).

Setup (Wong, Schmidt, Kolter 2019, MNIST): the first ``--n`` test images ``x``,
one l_inf step ``w = x + 0.1 * sign(randn)`` (``torch.Generator`` seeded 0),
local 5x5 transport, ``lam = 1000``, ``eps`` in {0.1, 0.5}, ``p`` in {1, 2}.
Every solver projects the whole batch ``w`` onto the balls around ``x``; one
row per (eps, p, solver) reports

* ``time``: median wall time of ``--repeats`` projections of the batch, after
  one warm-up (``time.perf_counter``; torch's default thread count);
* iterations (median, max) and the fraction that converged;
* ``budget used``: exact local OT distance from ``x[i]`` to ``z[i]`` divided
  by eps (median, min, max over all images; ``solvers.exact``);
* ``mass err``: max relative mass difference ``|m(z) - m(x)| / m(x)``;
* ``min z`` (and ``max z``);
* ``dist to exact``: ``||z - z*|| / ||w - z*||`` per image on the first
  ``--exact-images`` images, ``z*`` the exact projection (Clarabel QP; with
  the box ``z <= 1`` for the box solver).

``--paper-implementation`` also runs the authors' public code
(github.com/locuslab/projected_sinkhorn) if it is importable, called as its
attack does. Usage::

    python benchmarks/solver_benchmark.py --data-root PATH [--n 100] [--repeats 5]
        [--exact-images 3] [--paper-implementation] [--markdown PATH]

The data root (folder containing ``MNIST/raw``) defaults to ``$DATA_ROOT``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

try:  # run as a script from a checkout that is not pip-installed
    import zoo  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from harness.data import mnist_test_subset  # noqa: E402
from solvers import exact  # noqa: E402

KERNEL_SIZE = 5
LAM = 1000.0
STEP = 0.1
SOLVERS = ("projected_sinkhorn", "projected_sinkhorn_box")
PAPER = "paper (locuslab)"
PAPER_MAXITERS = 400
PAPER_HINT = (
    "paper implementation: module 'projected_sinkhorn' not importable; to compare, install it with "
    "`pip install git+https://github.com/locuslab/projected_sinkhorn` (or clone that repository and put its "
    "folder on PYTHONPATH). Skipping it."
)
# An output counts as inside the ball when the exact LP moves all of x to z
# (up to this fraction of the mass) at a cost of at most eps * (1 + this).
FEASIBILITY_TOL = 1e-5


@dataclass
class Row:
    eps: float
    p: float
    solver: str
    times: list[float]
    iterations: np.ndarray | None  # per image; None when unknown
    converged: float | None
    budget: np.ndarray  # exact distance / eps, per image
    in_ball: float
    mass_error: float
    min_z: float
    max_z: float
    box: bool
    dist_exact: list[float]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------


def timed(fn, repeats: int):
    """Run ``fn`` once (warm-up), then ``repeats`` times; return last output and times."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, times


def exact_reference(x: torch.Tensor, w: torch.Tensor, eps: float, p: float, box: bool, count: int) -> list[np.ndarray]:
    return [exact.exact_projection(x[i], w[i], eps, KERNEL_SIZE, p, box=box) for i in range(count)]


def quality(x, w, z, eps, p, z_exact) -> dict:
    """Metrics of an output batch ``z`` that need no solver internals."""
    x64 = x.double().flatten(1)
    z64 = z.detach().double().flatten(1)
    mass_x = x64.sum(1)
    mass_error = float(((z64.sum(1) - mass_x).abs() / mass_x).max())
    budget, in_ball = [], []
    for i in range(x.shape[0]):
        result = exact.local_ot_distance(x[i], z[i], KERNEL_SIZE, p)
        budget.append(result.cost / eps)
        moved = max(result.undelivered_mass, result.unused_mass) / result.mass_x
        in_ball.append(moved <= FEASIBILITY_TOL and result.cost <= eps * (1 + FEASIBILITY_TOL))
    w64 = w.double().flatten(1).numpy()
    dist = []
    for i, star in enumerate(z_exact):
        star = star.reshape(-1)
        dist.append(float(np.linalg.norm(z64[i].numpy() - star) / np.linalg.norm(w64[i] - star)))
    return dict(
        budget=np.array(budget),
        in_ball=float(np.mean(in_ball)),
        mass_error=mass_error,
        min_z=float(z64.min()),
        max_z=float(z64.max()),
        dist_exact=dist,
    )


def run_solver(name, x, w, eps, p, repeats, z_exact, hyperparameters) -> Row:
    solver = zoo.solver(name, kernel_size=KERNEL_SIZE, p=p, lam=LAM, **hyperparameters)
    (z, info), times = timed(lambda: solver.project(x, w, eps), repeats)
    box = name.endswith("_box")
    row = Row(
        eps=eps, p=p, solver=name, times=times,
        iterations=info.iterations.numpy(), converged=float(info.converged.float().mean()),
        box=box, **quality(x, w, z, eps, p, z_exact),
    )
    statuses = info.status_names()
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    if set(counts) != {"CONVERGED"}:
        row.notes.append("status " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    returned_x = int((info.repair >= 0.999).sum())
    if returned_x:
        row.notes.append(f"repair >= 0.999 (output is x, nothing moved) on {returned_x} of {x.shape[0]} images")
    if bool(info.log_domain.any()):
        row.notes.append(f"log-domain path on {int(info.log_domain.sum())} images")
    moved = row.budget > 1e-9  # the ratio is 0/0 where nothing moved
    ratio = info.transport_cost.double().numpy()[moved] / (eps * row.budget[moved])
    row.notes.append(
        f"max marginal error {float(info.marginal_error.max()):.1e}, max repair {float(info.repair.max()):.1e}, "
        f"own plan cost / exact distance: median {float(np.median(ratio)) if ratio.size else float('nan'):.3f}"
    )
    return row


# ----------------------------------------------------------------------------
# The paper's implementation (optional, never vendored)
# ----------------------------------------------------------------------------


def import_paper_module():
    """The paper's ``projected_sinkhorn.projected_sinkhorn`` module, or None.

    Its module does ``from lambertw import lambertw`` (a sibling file imported
    as a top-level module), so the package folder is appended to ``sys.path``
    before the import, as running from its own checkout would allow.
    """
    try:
        spec = importlib.util.find_spec("projected_sinkhorn")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        if location not in sys.path:
            sys.path.append(location)
    try:
        module = importlib.import_module("projected_sinkhorn.projected_sinkhorn")
    except ImportError:
        module = importlib.import_module("projected_sinkhorn")
    if not (hasattr(module, "projected_sinkhorn") and hasattr(module, "wasserstein_cost")):
        return None
    return module


def run_paper(module, x, w, eps, p, repeats, z_exact) -> Row:
    batch = x.shape[0]
    cost = module.wasserstein_cost(x, p=p, kernel_size=KERNEL_SIZE)
    epsilon = x.new_ones(batch) * eps  # as its attack code (pgd.py) passes it

    def project():
        normalization = x.view(batch, -1).sum(-1).view(batch, 1, 1, 1)
        return module.projected_sinkhorn(
            x.clone() / normalization, w / normalization, cost, epsilon, LAM, maxiters=PAPER_MAXITERS
        ) * normalization

    # Count iterations on the warm-up run: its loop calls lamw once per iteration.
    iterations = None
    original = getattr(module, "lamw", None)
    if callable(original):
        calls = [0]

        def counting(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        module.lamw = counting
        try:
            project()
        finally:
            module.lamw = original
        iterations = calls[0]
    z, times = timed(project, repeats)
    row = Row(
        eps=eps, p=p, solver=PAPER, times=times,
        iterations=None if iterations is None else np.full(batch, iterations),
        # Its loop stops for the whole batch, by its own test or after maxiters + 1 iterations.
        converged=None if iterations is None else float(iterations <= PAPER_MAXITERS),
        box=False, **quality(x, w, z, eps, p, z_exact),
    )
    if iterations is not None:
        row.notes.append("one iteration count for the whole batch (its loop stops when every objective is stable)")
    return row


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------

COLUMNS = [
    "eps", "p", "solver", "time [s]", "(min-max)", "iters med/max", "conv", "budget med [min, max]",
    "in ball", "mass err", "min z", "max z", "dist to exact: per image | med",
]


def cells(row: Row) -> list[str]:
    t = row.times
    iters = "-" if row.iterations is None else f"{int(np.median(row.iterations))}/{int(row.iterations.max())}"
    conv = "-" if row.converged is None else f"{row.converged:.2f}"
    b = row.budget
    dist = " ".join(f"{d:.3f}" for d in row.dist_exact)
    dist = f"{dist} | {statistics.median(row.dist_exact):.3f}" if row.dist_exact else "-"
    return [
        f"{row.eps:g}", f"{row.p:g}", row.solver,
        f"{statistics.median(t):.3f}", f"{min(t):.2f}-{max(t):.2f}", iters, conv,
        f"{np.median(b):.4f} [{b.min():.4f}, {b.max():.4f}]", f"{row.in_ball:.2f}",
        f"{row.mass_error:.1e}", f"{row.min_z:.2e}", f"{row.max_z:.4f}", dist,
    ]


def text_table(rows: list[Row]) -> str:
    body = [cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(COLUMNS)]
    line = lambda values: "  ".join(v.rjust(w) if i not in (2, 12) else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))
    out = [line(COLUMNS), "  ".join("-" * w for w in widths)]
    previous = None
    for row, c in zip(rows, body):
        if previous is not None and (row.eps, row.p) != previous:
            out.append("")
        previous = (row.eps, row.p)
        out.append(line(c).rstrip())
    return "\n".join(out)


def markdown_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---:" if i not in (2, 12) else ":---" for i in range(len(COLUMNS))) + "|"]
    for row in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |")
    return "\n".join(out)


def legend(args) -> str:
    return (
        f"time: median wall time of {args.repeats} projections of the {args.n}-image batch after one warm-up "
        "(min-max in brackets); iters: per image (paper: one count for the batch); conv: fraction converged; "
        "budget: exact local OT distance(x, z) / eps (HiGHS LP); in ball: fraction with all of x moved to z "
        f"(to {FEASIBILITY_TOL:g} of the mass) at cost <= eps (1 + {FEASIBILITY_TOL:g}); mass err: max |m(z)-m(x)|/m(x); "
        f"dist to exact: ||z - z*|| / ||w - z*|| on the first {args.exact_images} images, z* the exact projection "
        "(Clarabel QP; with z <= 1 for the box solver)."
    )


def code_version() -> str:
    """Commit of the checkout and whether solvers/ or zoo/ differ from it (read-only git calls)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        run = lambda *cmd: subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--", "solvers", "zoo")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not commit:
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty.splitlines()]
    return f"commit {commit}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def header(args) -> str:
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    return "\n".join([
        "Projection solver benchmark (Wasserstein ball, local transport)",
        f"command: {command}",
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}; python {platform.python_version()}; "
        f"torch {torch.__version__}; torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); "
        f"cpu count {os.cpu_count()}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"{platform.machine()} {platform.system()}",
        f"code: {code_version()}",
        f"setup: first {args.n} MNIST test images, w = x + {STEP} * sign(randn) (torch.Generator seed {args.seed}), "
        f"kernel {KERNEL_SIZE}x{KERNEL_SIZE}, lam {LAM:g}, float32 on CPU, "
        + (f"tol {args.tol:g}, " if args.tol is not None else "")
        + "solver defaults otherwise",
    ])


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT"),
                        help="folder that contains MNIST/raw (default: $DATA_ROOT)")
    parser.add_argument("--n", type=int, default=100, help="number of test images (default 100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up (default 5)")
    parser.add_argument("--exact-images", type=int, default=3,
                        help="images compared with the exact projection, ~0.5 s each per row (default 3)")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--p", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the l_inf step's signs (default 0)")
    parser.add_argument("--paper-implementation", action="store_true",
                        help="also time the paper's code (module projected_sinkhorn) if it is installed")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown to PATH")
    parser.add_argument("--tol", type=float, default=None, help="solver tolerance (default: the solver's own)")
    parser.add_argument("--download", action="store_true",
                        help="download MNIST into the data root through torchvision if it is not there")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) before timing (default: leave torch's default)")
    args = parser.parse_args(argv)
    if not args.data_root:
        parser.error("no data root: pass --data-root PATH (the folder containing MNIST/raw) or set DATA_ROOT")
    if args.n < 1 or args.repeats < 1 or args.exact_images < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--n, --repeats and --threads must be >= 1 and --exact-images >= 0")
    args.exact_images = min(args.exact_images, args.n)
    return args


BLOCK_KINDS = ("markdown",)


def generate(kind: str, folders, options: dict) -> str:
    """A generated block (``benchmarks/regenerate_results.py``): the ``--markdown`` file this script wrote."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generated_blocks import markdown_block

    return markdown_block(Path(__file__).name, "solver_benchmark.md", kind, folders, options)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    head = header(args)
    print(head, flush=True)

    # An invalid tolerance stops the run here, before any data is read.
    hyperparameters = {} if args.tol is None else {"tol": args.tol}
    for name in SOLVERS:
        zoo.solver(name, **hyperparameters)

    x, _ = mnist_test_subset(args.data_root, args.n, download=args.download)
    generator = torch.Generator().manual_seed(args.seed)
    w = x + STEP * torch.sign(torch.randn(x.shape, generator=generator))

    paper = None
    if args.paper_implementation:
        paper = import_paper_module()
        if paper is None:
            print(PAPER_HINT, flush=True)
        else:
            print(f"paper implementation: {getattr(paper, '__file__', paper.__name__)}", flush=True)
    print(flush=True)

    rows: list[Row] = []
    for eps in args.eps:
        for p in args.p:
            references = {}
            for name in SOLVERS:
                box = name.endswith("_box")
                if box not in references:
                    references[box] = exact_reference(x, w, eps, p, box, args.exact_images)
                rows.append(run_solver(name, x, w, eps, p, args.repeats, references[box], hyperparameters))
                print(f"  done: eps={eps:g} p={p:g} {name} ({time.perf_counter() - started:.0f} s)", flush=True)
            if paper is not None:
                rows.append(run_paper(paper, x, w, eps, p, args.repeats, references[False]))
                print(f"  done: eps={eps:g} p={p:g} {PAPER} ({time.perf_counter() - started:.0f} s)", flush=True)

    print()
    print(text_table(rows))
    print()
    print(legend(args))
    print()
    print("details:")
    for row in rows:
        for note in row.notes:
            print(f"  eps={row.eps:g} p={row.p:g} {row.solver}: {note}")
    total = time.perf_counter() - started
    print(f"\ntotal wall time {total:.1f} s")

    if args.markdown:
        text = "\n\n".join([
            "```\n" + head + "\n```",
            markdown_table(rows),
            legend(args),
            f"Total wall time of the script: {total:.0f} s.",
        ])
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
        print(f"markdown table written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
