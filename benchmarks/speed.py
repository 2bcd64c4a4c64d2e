"""The project's CPU costs, before and after a change: one Markdown table (a script, not a test).

Measured on the CPU, each beside the model-only floor (200 forward and
backward passes, cross-entropy input gradient, of the same model on the
same batch) and the ratio of the two:

* ``suite``: seconds per example of the standard evaluation
  (:func:`harness.evaluate`) of each model on the first ``--examples`` MNIST
  test images; floor: seconds per example of the 200 passes;
* ``certify linear_bounds`` and ``certify milp``: seconds per example of
  :func:`~harness.certify.run.certify_batch` at the radii 0.001, 0.01, 0.05
  and 0.1 in the boxed ball, the model on the CPU in float64 as a certify
  cell runs it (MILP with ``--milp-time-limit`` seconds per example and
  radius); floor: as for the suite, in float64;
* ``training attack``: milliseconds per example-step of the inner attack of
  the ``mnist_wasserstein_plan_pgd`` recipe on ``--train-batch`` training
  images against ``--train-model`` (the attack's seconds over examples times
  the steps it took); floor: milliseconds per example of one pass;
  ``training attack (fast)``: the same for ``mnist_wasserstein_plan_pgd_fast``
  (inexact box projection), beside it in the same run.

For the suite a second table gives, per model and code, the suite's
version, verified robust accuracy at the standard radii, median minimal
radius, which member found each minimal radius first, and each member's
seconds (``--frames DIR`` keeps the per-example frames). With
``--verify-workers N`` the suite's exact LPs run in N processes, started
once before any measurement (as a run's workers keep theirs).

With ``--baseline COMMIT`` the same measurements also run on that commit:
in a temporary ``git worktree`` of it, this script runs itself with
``--json`` and that worktree first on ``PYTHONPATH``; the table then shows
both and the speed-up (baseline over current). A measurement the baseline
cannot make (code it lacks) is named in the table.

Usage::

    python benchmarks/speed.py [--examples 100] [--models ...]
        [--certifiers linear_bounds milp] [--no-suite] [--verify-workers 2]
        [--baseline COMMIT | --baseline-rows FILE]
        [--frames DIR] [--markdown PATH] [--quick] [--json]

The data root (folder containing ``MNIST/raw``) defaults to ``$DATA_ROOT``;
the weights folder to ``$WEIGHTS_DIR``. ``--quick`` (1 example, one model,
the linear bounds only, one attack on 2 training images, and no suite, which
alone takes minutes per example) checks the script; ``--no-suite`` leaves the
suite out of a full run. ``--baseline-rows FILE`` takes the baseline's rows
from an earlier ``--json`` run of the baseline checkout instead (the table
names the commit and when it was measured).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

try:  # run as a script from a checkout that is not pip-installed
    import zoo  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAPER_MODELS = ("mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial")
CERTIFY_RADII = (0.001, 0.01, 0.05, 0.1)
FLOOR_PASSES = 200
# The training attack's rows: measure name -> recipe.
TRAINING_RECIPES = {"training attack": "mnist_wasserstein_plan_pgd", "training attack (fast)": "mnist_wasserstein_plan_pgd_fast"}
# What older code may lack: a measurement that meets one of these is reported as missing, not fatal.
MISSING_CODE = (ImportError, AttributeError, KeyError, TypeError, ValueError)


def floor_seconds(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds of :data:`FLOOR_PASSES` forward and backward passes of ``model`` on the batch (input gradient)."""
    model.eval()
    started = time.perf_counter()
    for _ in range(FLOOR_PASSES):
        x = images.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        torch.autograd.grad(loss, x)
    return time.perf_counter() - started


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def measure_suite(model_name: str, images, labels, weights_dir: str, frames: str | None, verify_pool) -> dict:
    import harness
    import zoo
    from harness.attack.ball import Ball

    model = _frozen(zoo.model(model_name, weights_dir=weights_dir))
    count = images.shape[0]
    # Only when asked for: a baseline checkout may predate the option.
    pooled = {} if verify_pool is None else {"verify_executor": verify_pool}
    started = time.perf_counter()
    frame = harness.evaluate(model, images, labels, Ball.wasserstein(5, 1.0), **pooled)
    seconds = time.perf_counter() - started
    if frames is not None:
        Path(frames).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(Path(frames) / f"{model_name.replace('/', '_')}.parquet")
    return {
        "value": seconds / count, "floor": floor_seconds(model, images, labels) / count, "suite": frame.attrs["suite"],
        "robust_accuracy": {str(radius): value for radius, value in frame.attrs["robust_accuracy"].items()},
        "median_radius": frame.attrs["median_radius"], "member_seconds": frame.attrs["member_seconds"],
        "found_by": frame["found_by"].value_counts().to_dict(),
    }


def measure_certifier(model_name: str, certifier_name: str, images, labels, weights_dir: str, milp_time_limit: float) -> dict:
    import zoo
    from harness.attack.ball import Ball
    from harness.certify.run import CertifySettings, certify_batch
    from harness.vocabulary import Certifier

    model = _frozen(zoo.model(model_name, weights_dir=weights_dir, device="cpu"))
    settings = CertifySettings(Certifier(certifier_name), radii=CERTIFY_RADII, box=True, time_limit=milp_time_limit)
    count = images.shape[0]
    started = time.perf_counter()
    certify_batch(model, images.cpu(), labels.cpu(), Ball.wasserstein(5, 1.0).transport, settings)
    seconds = time.perf_counter() - started
    # The certifiers compute in float64: so does their floor.
    floor = floor_seconds(copy.deepcopy(model).double(), images.cpu().double(), labels.cpu())
    return {"value": seconds / count, "floor": floor / count}


def measure_training_attack(recipe_name: str, model_name: str, batch: int, data_root: str, weights_dir: str) -> dict:
    import zoo
    from harness.data import load_dataset
    from harness.train.recipes import recipe

    adversarial = recipe(recipe_name).adversarial
    model = _frozen(zoo.model(model_name, weights_dir=weights_dir))
    images, labels = load_dataset("mnist", data_root, train=True)
    images, labels = images[:batch], labels[:batch]
    attack = adversarial.attack.attack(model, adversarial.ball, seed=0)
    started = time.perf_counter()
    result = attack.run(images, labels)
    seconds = time.perf_counter() - started
    example_steps = int(result.steps.sum())
    if example_steps == 0:  # every image already misclassified: no step to time
        return {"missing": "the attack took no step"}
    return {
        "value": 1000 * seconds / example_steps,
        "floor": 1000 * floor_seconds(model, images, labels) / (FLOOR_PASSES * batch),
        "steps": example_steps,
    }


def started_pool(workers: int) -> ProcessPoolExecutor | None:
    """The suite's verification processes, started before any clock runs, as a run's workers keep theirs."""
    if workers == 0:
        return None
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    from harness.attack.verify import robust_accuracy  # what a claim's LP imports in the worker

    list(pool.map(robust_accuracy, [[1.0]] * workers, [0.5] * workers))
    return pool


def _guarded(measurement, *arguments) -> dict:
    try:
        return measurement(*arguments)
    except MISSING_CODE as error:
        return {"missing": f"{type(error).__name__}: {error}"}


def measure(arguments: argparse.Namespace) -> list[dict]:
    """Every row of the table for the code on ``sys.path``: measure, model, unit, value and floor (or missing)."""
    from harness.data import test_subset

    torch.manual_seed(0)
    images, labels = test_subset("mnist", arguments.data_root, arguments.examples)
    verify_pool = started_pool(arguments.verify_workers) if arguments.suite else None
    try:
        return _measured_rows(arguments, images, labels, verify_pool)
    finally:
        if verify_pool is not None:
            verify_pool.shutdown()


def _measured_rows(arguments: argparse.Namespace, images, labels, verify_pool) -> list[dict]:
    rows = []
    for model_name in arguments.models:
        if arguments.suite:
            rows.append({"measure": "suite", "model": model_name, "unit": "s/example",
                         **_guarded(measure_suite, model_name, images, labels, arguments.weights_dir, arguments.frames,
                                    verify_pool)})
        for certifier_name in arguments.certifiers:
            rows.append({"measure": f"certify {certifier_name}", "model": model_name, "unit": "s/example",
                         **_guarded(measure_certifier, model_name, certifier_name, images, labels, arguments.weights_dir,
                                    arguments.milp_time_limit)})
    for measure_name, recipe_name in TRAINING_RECIPES.items():
        rows.append({"measure": measure_name, "model": arguments.train_model, "unit": "ms/example-step",
                     **_guarded(measure_training_attack, recipe_name, arguments.train_model, arguments.train_batch,
                                arguments.data_root, arguments.weights_dir)})
    return rows


def _commit(folder: Path, revision: str = "HEAD") -> str:
    return subprocess.run(["git", "rev-parse", "--short", revision], cwd=folder, capture_output=True, text=True,
                          check=True).stdout.strip()


def _forwarded(arguments: argparse.Namespace) -> list[str]:
    """The command-line options that choose the measurements, to repeat them on the baseline."""
    return [
        "--examples", str(arguments.examples), "--models", *arguments.models, "--certifiers", *arguments.certifiers,
        "--milp-time-limit", str(arguments.milp_time_limit), "--train-model", arguments.train_model,
        "--train-batch", str(arguments.train_batch), "--data-root", arguments.data_root,
        "--weights-dir", arguments.weights_dir, "--suite" if arguments.suite else "--no-suite",
        *(["--frames", str(Path(arguments.frames).parent / "baseline")] if arguments.frames else []),
    ]


def measure_baseline(arguments: argparse.Namespace, checkout: Path) -> tuple[str, list[dict] | str]:
    """The baseline's short commit and its rows, or the reason it gave none, measured in a temporary worktree."""
    commit = _commit(checkout, arguments.baseline)
    with tempfile.TemporaryDirectory() as parent:
        worktree = Path(parent) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), commit], cwd=checkout, check=True,
                       capture_output=True)
        try:
            environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(worktree), os.environ.get("PYTHONPATH")]))}
            finished = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json", *_forwarded(arguments)],
                                      cwd=worktree, env=environment, capture_output=True, text=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=checkout, capture_output=True)
    if finished.returncode != 0:
        last_line = (finished.stderr.strip().splitlines() or ["no output"])[-1]
        return commit, f"the baseline run failed: {last_line}"
    return commit, json.loads(finished.stdout)["rows"]


def saved_baseline(path: str) -> tuple[str, list[dict]]:
    """The commit and rows of an earlier ``--json`` run (of a baseline checkout, on this machine)."""
    saved = json.loads(Path(path).read_text())
    return f"{saved['commit']} (measured {saved['measured']})", saved["rows"]


def verdicts(current: list[dict], baseline: list[dict] | str | None) -> str:
    """The suite's verified robust accuracy and median radius per model, current beside baseline."""
    before = {row["model"]: row for row in baseline if row["measure"] == "suite"} if isinstance(baseline, list) else {}
    lines = [
        "| model | code | suite | robust accuracy by radius | median radius | minimal radius found first by | seconds by member |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in current:
        if row["measure"] != "suite":
            continue
        for code, measured in (("current", row), ("baseline", before.get(row["model"]))):
            if measured is None or "robust_accuracy" not in measured:
                continue
            accuracy = ", ".join(f"{radius}: {100 * value:.0f}%" for radius, value in measured["robust_accuracy"].items())
            found = ", ".join(f"{name or 'none'} {count}" for name, count in sorted(measured["found_by"].items(), key=lambda item: -item[1]))
            seconds = ", ".join(f"{name} {value:.0f}" for name, value in measured["member_seconds"].items())
            lines.append(
                f"| {row['model']} | {code} | {measured['suite']} | {accuracy} | {_number(measured['median_radius'])} | {found} | {seconds} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4g}"


def _cells(row: dict | None) -> list[str]:
    if row is None:
        return ["not measured", "-", "-"]
    if "missing" in row:
        return [f"missing ({row['missing']})", "-", "-"]
    return [_number(row["value"]), _number(row["floor"]), _number(row["value"] / row["floor"])]


def markdown(header: str, current: list[dict], baseline: list[dict] | str | None, baseline_commit: str | None) -> str:
    """The table: one row per measurement, the current code's columns, then the baseline's and the speed-up."""
    columns = ["measure", "model", "unit", "value", "floor", "ratio"]
    if baseline is not None:
        columns += [f"baseline {baseline_commit}", "baseline floor", "baseline ratio", "speed-up"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    before = {(row["measure"], row["model"]): row for row in baseline} if isinstance(baseline, list) else {}
    for row in current:
        cells = [row["measure"], row["model"], row["unit"], *_cells(row)]
        if baseline is not None:
            if isinstance(baseline, str):
                cells += [baseline, "-", "-", "-"]
            else:
                earlier = before.get((row["measure"], row["model"]))
                cells += _cells(earlier)
                measured = earlier is not None and "missing" not in earlier and "missing" not in row
                cells.append(_number(earlier["value"] / row["value"]) if measured else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"floor: {FLOOR_PASSES} forward and backward passes per example (s) for the suite and the "
              "certifiers, one pass per example (ms) for the training attack; ratio: value / floor; "
              "speed-up: baseline / current."]
    return "\n".join(lines)


def header_line(checkout: Path, examples: int, verify_workers: int) -> str:
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; commit {_commit(checkout)}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; N = {examples}; "
        f"the current code's suite verifies in {verify_workers or 'no'} worker processes, a baseline in its own process"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100, help="first MNIST test images of the suite and certifiers")
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS))
    parser.add_argument("--certifiers", nargs="*", default=["linear_bounds"], choices=["linear_bounds", "milp"])
    parser.add_argument("--milp-time-limit", type=float, default=5.0, help="MILP seconds per example and radius")
    parser.add_argument("--train-model", default="mnist/standard", help="the model the training attack runs against")
    parser.add_argument("--train-batch", type=int, default=64, help="training images of the training attack")
    parser.add_argument("--suite", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the standard suite (minutes per example on a busy CPU)")
    parser.add_argument("--verify-workers", type=int, default=0,
                        help="processes that run the suite's exact LPs (harness.evaluate's verify_executor); 0: in this one")
    parser.add_argument("--baseline", help="a commit to measure too, in a temporary git worktree")
    parser.add_argument("--baseline-rows", help="the --json output of an earlier run of a baseline checkout, in place of --baseline")
    parser.add_argument("--frames", help="a folder for the suite's per-example frames (Parquet, one per model)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH (a results page's block)")
    parser.add_argument("--quick", action="store_true", help="1 example, one model, linear bounds, no suite, 2 training images")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (the baseline run's output)")
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data"))
    parser.add_argument("--weights-dir", default=os.environ.get("WEIGHTS_DIR"))
    arguments = parser.parse_args(argv)
    if arguments.verify_workers < 0:
        parser.error(f"--verify-workers {arguments.verify_workers} is invalid: it must be 0 (no pool) or more")
    if arguments.quick:
        arguments.examples, arguments.models, arguments.certifiers = 1, arguments.models[:1], ["linear_bounds"]
        arguments.train_batch, arguments.suite = 2, False
    if arguments.frames and not arguments.json:
        arguments.frames = str(Path(arguments.frames) / "current")
    checkout = Path(__file__).resolve().parents[1]
    current = measure(arguments)
    if arguments.json:
        commit = _commit(Path(os.environ.get("PYTHONPATH", str(checkout)).split(os.pathsep)[0]))
        print(json.dumps({"commit": commit, "measured": datetime.datetime.now().isoformat(timespec="seconds"), "rows": current}))
        return
    baseline_commit, baseline = None, None
    if arguments.baseline_rows:
        baseline_commit, baseline = saved_baseline(arguments.baseline_rows)
    elif arguments.baseline:
        baseline_commit, baseline = measure_baseline(arguments, checkout)
    output = markdown(header_line(checkout, arguments.examples, arguments.verify_workers), current, baseline, baseline_commit)
    suite_table = verdicts(current, baseline)
    if suite_table:
        output += "\n\n" + suite_table
    print(output)
    if arguments.markdown:
        Path(arguments.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.markdown).write_text(output + "\n", encoding="utf-8")


BLOCK_KINDS = ("markdown",)


def generate(kind: str, folders, options: dict) -> str:
    """A generated block (``benchmarks/regenerate_results.py``): the ``--markdown`` file this script wrote."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generated_blocks import markdown_block

    return markdown_block(Path(__file__).name, "speed.md", kind, folders, options)


if __name__ == "__main__":
    main()
