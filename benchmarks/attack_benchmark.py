"""Clean and verified robust accuracy of the paper's MNIST models (a script, not a test).

For each registered model (default: the four MNIST models of Wong, Schmidt,
Kolter 2019 with their published weights):

* clean accuracy on the full MNIST test set (10000 images);
* the Wasserstein PGD attack of a protocol (``--protocol``, default the
  paper's code: 7x7 plans, p = 2, eps 0.7 x1.1 every 10 of 200 l_inf sign
  steps of 0.1, lambda 1000) on the first ``--n`` test images, once per
  solver variant (``--variants``; default the first and the last):

  - ``projected_sinkhorn_box``: the box 0 <= z <= 1 inside the projection;
  - ``projected_sinkhorn``: no box, no clamp (images may leave [0, 1]);
  - ``projected_sinkhorn+clamp``: no box, then clamped to [0, 1] after each
    projection, as the paper's code does;

* every claimed success verified exactly (:mod:`harness.verify`); robust
  accuracy at ``--eps`` from verified distances, and from the radius the
  attack claims (what the paper's code reports), the verification verdicts,
  the median budget used (exact distance / claimed radius), and seconds per
  example (attack, verification).

Usage::

    python benchmarks/attack_benchmark.py --data-root PATH --weights-dir PATH
        [--n 500] [--protocol paper_code_mnist] [--variants ...] [--markdown PATH]

The data root (folder containing ``MNIST/raw``) defaults to ``$DATA_ROOT``;
the weights folder to ``$WASSERSTEIN_BENCH_WEIGHTS`` or the cache folder.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

try:  # run as a script from a checkout that is not pip-installed
    import zoo  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from harness.attack.ball import Ball  # noqa: E402
from harness.attack.spec import PROTOCOLS  # noqa: E402
from harness.data import load_mnist  # noqa: E402
from harness.attack.evaluate import attack_and_verify, clean_accuracy  # noqa: E402
from harness.attack.verify import VerificationStatus, robust_accuracy  # noqa: E402

PAPER_MODELS = ("mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial")
VARIANTS = ("projected_sinkhorn_box", "projected_sinkhorn+clamp")
CLAMP_SUFFIX = "+clamp"


def parse_variant(variant: str) -> tuple[str, bool]:
    """``"name+clamp"`` -> (``"name"``, True); checks that the solver is registered."""
    name, clamp = (variant[: -len(CLAMP_SUFFIX)], True) if variant.endswith(CLAMP_SUFFIX) else (variant, False)
    registered = [spec.name for spec in zoo.solver_specs()]
    if name not in registered:
        raise ValueError(f"variant {variant!r}: unknown solver {name!r}; registered: {', '.join(registered)} (append {CLAMP_SUFFIX} to clamp)")
    return name, clamp


def run(args) -> list[dict]:
    protocol = PROTOCOLS[args.protocol]
    variants = [(variant, *parse_variant(variant)) for variant in args.variants]
    models = {name: zoo.model(name, weights_dir=args.weights_dir, download=args.download) for name in args.models}
    images, labels = load_mnist(args.data_root, train=False, download=args.download)
    x, y = images[: args.n], labels[: args.n]
    rows = []
    ball = Ball.wasserstein(protocol.kernel_size, protocol.p)
    for model_name, model in models.items():
        clean = clean_accuracy(model, images, labels)
        gradient = zoo.model_spec(model_name).gradient_mode.value
        print(f"{model_name}: clean accuracy {100 * clean:.2f}% on {images.shape[0]} test images (gradients: {gradient})", flush=True)
        for variant, solver_name, clamp in variants:
            spec = zoo.solver_spec(solver_name)
            iterate = replace(protocol.for_solver(spec), clamp=clamp).iterate(ball)
            started = time.perf_counter()
            columns = attack_and_verify(model, x, y, ball, iterate, protocol.schedule, batch_size=args.batch_size)
            wall = time.perf_counter() - started
            rows.append(summarize(model_name, variant, clean, columns, args.eps, wall))
            print_row(rows[-1], args.eps)
    return rows


def summarize(model_name, variant, clean, columns, eps_grid, wall) -> dict:
    status = columns["verification_status"]
    claimed = columns["success"]
    counted = claimed & np.isin(status, [int(VerificationStatus.VERIFIED), int(VerificationStatus.CLEAN_MISCLASSIFIED)])
    verified = status == int(VerificationStatus.VERIFIED)
    budget = columns["distance"][verified] / columns["eps_found"][verified]
    failures = {}
    for code in status[claimed & ~counted]:
        failures[VerificationStatus(int(code)).name] = failures.get(VerificationStatus(int(code)).name, 0) + 1
    return {
        "model": model_name,
        "variant": variant,
        "clean": clean,
        "n": len(status),
        "robust_verified": {e: robust_accuracy(columns["verified_distance"], e) for e in eps_grid},
        "robust_claimed": {e: float(np.mean(columns["eps_found"] > e)) for e in eps_grid},
        "claimed": int(claimed.sum()),
        "verified": int(counted.sum()),
        "failures": failures,
        "budget_median": float(np.median(budget)) if budget.size else float("nan"),
        "attack_s": float(columns["attack_seconds"].mean()),
        "verify_s": float(columns["verify_seconds"].mean()),
        "unconverged_steps": int(columns["unconverged_steps"].sum()),
        "steps": int(columns["steps"].sum()),
        "wall": wall,
    }


def print_row(row, eps_grid) -> None:
    verified = " ".join(f"{100 * row['robust_verified'][e]:.1f}" for e in eps_grid)
    claimed = " ".join(f"{100 * row['robust_claimed'][e]:.1f}" for e in eps_grid)
    print(
        f"  {row['variant']:<26} robust% verified [{verified}] claimed-radius [{claimed}] "
        f"successes verified {row['verified']}/{row['claimed']} {row['failures'] or ''} "
        f"budget {row['budget_median']:.2f} attack {row['attack_s']:.3f} s/ex verify {row['verify_s']:.3f} s/ex "
        f"unconverged steps {row['unconverged_steps']}/{row['steps']}",
        flush=True,
    )


def markdown(rows, args, eps_grid) -> str:
    protocol = PROTOCOLS[args.protocol]
    eps_heads = " | ".join(f"eps {e}: verified (claimed)" for e in eps_grid)
    lines = [
        f"Protocol `{protocol.name}`: {protocol.description}; first {args.n} MNIST test images. "
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads. Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        "",
        f"| model | clean (10000) | solver variant | {eps_heads} | successes verified | rejected (why) | budget used | s / example (attack + verify) |",
        "|---" * (7 + len(eps_grid)) + "|",
    ]
    for row in rows:
        cells = " | ".join(f"{100 * row['robust_verified'][e]:.1f}% ({100 * row['robust_claimed'][e]:.1f}%)" for e in eps_grid)
        why = ", ".join(f"{k} {v}" for k, v in row["failures"].items()) or "-"
        budget = "-" if np.isnan(row["budget_median"]) else f"{row['budget_median']:.2f}"
        lines.append(
            f"| {row['model']} | {100 * row['clean']:.2f}% | {row['variant']} | {cells} | {row['verified']}/{row['claimed']} | "
            f"{why} | {budget} | {row['attack_s']:.3f} + {row['verify_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


BLOCK_KINDS = ("markdown",)


def generate(kind: str, folders, options: dict) -> str:
    """A generated block (``benchmarks/regenerate_results.py``): the ``--markdown`` file this script wrote."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generated_blocks import markdown_block

    return markdown_block(Path(__file__).name, "attack_benchmark.md", kind, folders, options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT"), help="folder containing MNIST/raw (default $DATA_ROOT)")
    parser.add_argument("--weights-dir", default=None, help="folder of the weights files (default: $WASSERSTEIN_BENCH_WEIGHTS or the cache)")
    parser.add_argument("--download", action="store_true", help="download missing data and weights (needs internet)")
    parser.add_argument("--n", type=int, default=500, help="attacked test images (default 500)")
    parser.add_argument("--protocol", default="paper_code_mnist", choices=sorted(PROTOCOLS))
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--eps", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown to PATH")
    args = parser.parse_args(argv)

    problems = []
    if not args.data_root:
        problems.append("--data-root is required (or set DATA_ROOT): the folder that contains MNIST/raw")
    if args.n < 1 or args.n > 10000:
        problems.append(f"--n={args.n} is invalid: it must be in 1..10000")
    if args.batch_size < 1:
        problems.append(f"--batch-size={args.batch_size} is invalid: it must be >= 1")
    registered = [spec.name for spec in zoo.models()]
    problems += [f"unknown model {name!r}; registered: {', '.join(registered)}" for name in args.models if name not in registered]
    for variant in args.variants:
        try:
            parse_variant(variant)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        parser.error("\n  ".join(problems))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(rows, args, args.eps))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
