"""Throughput of the attacks: seconds per example per (model, solver), on CPU and CUDA (a script, not a test).

For each model and solver, the protocol's attack (default the paper's MNIST
text protocol: 5x5 plans, p = 1, eps 0.3 x1.1 every 10 of 200 steps) runs on
the first ``--n`` test images in batches of ``--batch-size``, and every claim
is verified exactly, as a benchmark cell does. Printed as a Markdown table:
attack and verification seconds per example, examples per second, steps and
solver iterations per example, unconverged steps, verified robust accuracy
at a few radii, and, with ``--before RESULTS_DIR`` (a result store written by
an earlier revision, e.g. ``run_benchmark.py ... results_dir=DIR``), the
seconds per example that store recorded for the same model and solver and
the same first test images. ``--estimate-n`` adds the time the whole
protocol on that many images would take at the measured rate.

Usage::

    python benchmarks/throughput.py --data-root PATH --weights-dir PATH
        [--models ...] [--solvers plan_pgd_box frank_wolfe_box] [--n 100]
        [--devices cpu cuda] [--before RESULTS_DIR] [--estimate-n 10000] [--markdown PATH]

The data root (folder containing ``MNIST/raw``) defaults to ``$DATA_ROOT``;
the weights folder to ``$WASSERSTEIN_BENCH_WEIGHTS`` or the cache folder.
CUDA rows are skipped, with a line saying so, where no GPU is visible.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

try:  # run as a script from a checkout that is not pip-installed
    import zoo  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from harness.attack.ball import Ball  # noqa: E402
from harness.attack.evaluate import attack_and_verify  # noqa: E402
from harness.attack.spec import PROTOCOLS  # noqa: E402
from harness.attack.verify import robust_accuracy  # noqa: E402
from harness.data import test_subset  # noqa: E402
from harness.run.runner import default_verify_workers  # noqa: E402
from harness.vocabulary import DATASETS  # noqa: E402

PAPER_MODELS = ("mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial")
RADII = (0.1, 0.5, 1.0)


def _before(results_dir: str | None, n: int) -> dict[tuple[str, str], float]:
    """Seconds per example an earlier store recorded, per (model, solver), over its first ``n`` examples."""
    if results_dir is None:
        return {}
    from harness.run.store import Table, read_table

    frame = read_table(results_dir, Table.EXAMPLES)
    frame = frame[frame["example_index"] < n]
    frame = frame.assign(total=frame["attack_seconds"] + frame["verify_seconds"], model=frame["model"].astype(str))
    return {key: float(value) for key, value in frame.groupby(["model", "solver"])["total"].mean().items()}


def measure(model_name, solver_name, protocol, images, labels, device, batch_size, weights_dir, verify_executor=None) -> dict:
    model = zoo.model(model_name, weights_dir=weights_dir, device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    ball = Ball.wasserstein(protocol.kernel_size, protocol.p)
    spec = zoo.solver_spec(solver_name)
    iterate = protocol.for_solver(spec).iterate(ball)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    columns = attack_and_verify(
        model, images.to(device), labels.to(device), ball, iterate, protocol.schedule, batch_size=batch_size,
        verify_executor=verify_executor,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    n = images.shape[0]
    return {
        "wall": wall,
        "attack": float(columns["attack_seconds"].sum()) / n,
        "verify": float(columns["verify_seconds"].sum()) / n,
        "steps": float(columns["steps"].mean()),
        "iterations": float(columns["solver_iterations"].sum() / max(columns["steps"].sum(), 1)),
        "unconverged": int(columns["unconverged_steps"].sum()),
        "robust": {eps: robust_accuracy(columns["verified_distance"], eps) for eps in RADII},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data"))
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS))
    parser.add_argument("--solvers", nargs="+", default=["plan_pgd_box", "frank_wolfe_box"])
    parser.add_argument("--protocol", default="paper_mnist", choices=sorted(PROTOCOLS))
    parser.add_argument("--n", type=int, default=100, help="first test images attacked")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 100 on CPU, 1000 on CUDA")
    parser.add_argument(
        "--verify-workers", type=int, default=None,
        help="processes running the exact LPs beside the attack (default: 0 on CPU, half the cores, at most 8, beside CUDA)",
    )
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    parser.add_argument("--before", default=None, help="result store of an earlier revision, for its s/example")
    parser.add_argument("--estimate-n", type=int, default=10000, help="images of the whole protocol, for the time estimate")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    for name in args.models:
        zoo.model_spec(name)
    for name in args.solvers:
        zoo.solver_spec(name)
    if args.n < 1:
        parser.error(f"--n {args.n} is invalid: it must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = PROTOCOLS[args.protocol]
    before = _before(args.before, args.n)
    images, labels = None, None
    lines = [
        f"Command: `python benchmarks/throughput.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        f"Protocol {protocol.name}: {protocol.description}; first {args.n} test images.",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads.",
        "",
        "| device | model | solver | s / example | before | examples / s | attack s | verify s | steps / example "
        "| iterations / step | unconverged steps | " + " | ".join(f"robust @ {eps}" for eps in RADII)
        + f" | {args.estimate_n} images |",
        "| :--- | :--- | :--- | " + " | ".join(["---:"] * (9 + len(RADII))) + " |",
    ]
    skipped = []
    for device_name in args.devices:
        if device_name == "cuda" and not torch.cuda.is_available():
            skipped.append("cuda: no GPU visible, rows skipped")
            continue
        device = torch.device(device_name)
        batch_size = args.batch_size or DATASETS["mnist"].batch_size(device.type)
        workers = default_verify_workers(device) if args.verify_workers is None else args.verify_workers
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers else None
        if pool is not None:
            pool.submit(int).result()  # started before the clock runs
        for model_name in args.models:
            dataset = zoo.model_spec(model_name).dataset.value
            images, labels = test_subset(dataset, args.data_root, args.n)
            for solver_name in args.solvers:
                result = measure(
                    model_name, solver_name, protocol, images, labels, device, batch_size, args.weights_dir, pool
                )
                per_example = result["wall"] / args.n
                earlier = before.get((model_name, solver_name))
                row = [
                    device_name, model_name, solver_name, f"{per_example:.3f}",
                    "–" if earlier is None else f"{earlier:.3f}", f"{1 / per_example:.1f}",
                    f"{result['attack']:.3f}", f"{result['verify']:.3f}", f"{result['steps']:.1f}",
                    f"{result['iterations']:.1f}", str(result["unconverged"]),
                    *(f"{100 * result['robust'][eps]:.1f}%" for eps in RADII),
                    f"{per_example * args.estimate_n / 3600:.2f} h",
                ]
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
        if pool is not None:
            pool.shutdown()
    lines.extend(f"\n{note}" for note in skipped)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
