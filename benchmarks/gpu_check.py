"""One prepared device check: the suite, plan-space PGD throughput and a training epoch (a script, not a test).

Three measurements on one device (``--device``, default the first CUDA
device), sized to fit a short lease:

* ``suite``: seconds per example of the standard suite (:func:`harness.evaluate`,
  its exact LPs in ``--verify-workers`` processes) on each paper MNIST model,
  over the first ``--suite-examples`` test images in batches of
  ``--suite-batch``, each model stopping after the batch that spends its share
  of ``--suite-seconds``; the row says how many images it finished and their
  verified robust accuracy at 0.1;
* ``plan_pgd_box``: example-steps per second of a fixed-radius attack
  (eps 0.1, 100 steps, no early stop for the batch) on ``--throughput-batch``
  test images against ``mnist/standard``;
* ``train``: one epoch of ``cifar10/resnet18`` by its recipe on the first
  ``--train-examples`` training images (weights to a temporary folder):
  seconds and training images per second.

Prints a Markdown table; ``--json PATH`` also writes the rows. Needs no Ray
and no Hydra: it calls the library directly.

Usage::

    python benchmarks/gpu_check.py --data-root PATH --weights-dir PATH [--suite-seconds 240] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
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

import harness  # noqa: E402
import zoo  # noqa: E402
from harness.attack.ball import Ball  # noqa: E402
from harness.attack.pgd import EpsSchedule  # noqa: E402
from harness.attack.spec import AttackSpec  # noqa: E402
from harness.attack.verify import robust_accuracy  # noqa: E402
from harness.data import test_subset  # noqa: E402

PAPER_MODELS = ("mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_suite(model_name, images, labels, device, batch, seconds, pool, weights_dir) -> dict:
    model = zoo.model(model_name, weights_dir=weights_dir, device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    distances, spent, done = [], 0.0, 0
    while done < images.shape[0] and spent < seconds:
        x, y = images[done : done + batch].to(device), labels[done : done + batch].to(device)
        started = time.perf_counter()
        frame = harness.evaluate(model, x, y, Ball.wasserstein(5, 1.0), batch_size=batch, verify_executor=pool)
        _synchronize(device)
        spent += time.perf_counter() - started
        distances.extend(frame["verified_distance"].tolist())
        done += x.shape[0]
    return {
        "measure": "suite", "model": model_name, "examples": done, "value": spent / done, "unit": "s/example",
        "robust_accuracy_0.1": robust_accuracy(distances, 0.1), "suite": frame.attrs["suite"],
    }


def measure_plan_pgd(images, labels, device, weights_dir) -> dict:
    model = zoo.model("mnist/standard", weights_dir=weights_dir, device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x, y = images.to(device), labels.to(device)
    spec = AttackSpec("plan_pgd_box", EpsSchedule.fixed(0.1, 100), (("step_size", 0.1),))
    attack = spec.attack(model, Ball.wasserstein(5, 1.0), seed=0)
    attack.run(x[:2], y[:2])  # first-call costs (kernels, caches) are not throughput
    _synchronize(device)
    started = time.perf_counter()
    result = attack.run(x, y)
    _synchronize(device)
    seconds = time.perf_counter() - started
    steps = int(result.steps.sum())
    return {"measure": "plan_pgd_box", "model": "mnist/standard", "examples": x.shape[0], "value": steps / seconds,
            "unit": "example-steps/s"}


def measure_training_epoch(data_root, device, train_examples) -> dict:
    from harness.train.loop import train

    with tempfile.TemporaryDirectory() as weights_dir:
        record = train(
            "cifar10/resnet18", data_root=data_root, weights_dir=weights_dir, device=str(device), epochs=1,
            train_examples=train_examples, progress=False, checkpoint_seconds=None,
        )
    return {"measure": "train", "model": "cifar10/resnet18", "examples": record["train_examples"],
            "value": record["train_examples"] / record["seconds"], "unit": "training images/s",
            "seconds": record["seconds"], "clean_accuracy": record["clean_accuracy"]}


def table(rows: list[dict], device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [f"device: {name}; torch {torch.__version__}; {os.cpu_count()} cores", "",
             "| measure | model | examples | value | unit | notes |", "|---|---|---|---|---|---|"]
    for row in rows:
        notes = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                          for key, value in row.items() if key not in {"measure", "model", "examples", "value", "unit"})
        lines.append(f"| {row['measure']} | {row['model']} | {row['examples']} | {row['value']:.4g} | {row['unit']} | {notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--suite-seconds", type=float, default=240.0, help="the suite's seconds, shared by the models")
    parser.add_argument("--suite-examples", type=int, default=1000)
    parser.add_argument("--suite-batch", type=int, default=100)
    parser.add_argument("--throughput-batch", type=int, default=500)
    parser.add_argument("--train-examples", type=int, default=None, help="default: the whole training set")
    parser.add_argument("--verify-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS))
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data"))
    parser.add_argument("--weights-dir", default=os.environ.get("WASSERSTEIN_BENCH_WEIGHTS"))
    parser.add_argument("--json", metavar="PATH", help="also write the rows to PATH")
    arguments = parser.parse_args(argv)
    device = torch.device(arguments.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (pass --device cpu to check the script)")
    for name in ("suite_seconds", "suite_examples", "suite_batch", "throughput_batch", "verify_workers"):
        if getattr(arguments, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(arguments, name)} is invalid: it must be positive")
    images, labels = test_subset("mnist", arguments.data_root, max(arguments.suite_examples, arguments.throughput_batch))
    rows = []
    with ProcessPoolExecutor(arguments.verify_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        per_model = arguments.suite_seconds / len(arguments.models)
        for model_name in arguments.models:
            rows.append(measure_suite(model_name, images[: arguments.suite_examples], labels[: arguments.suite_examples],
                                      device, arguments.suite_batch, per_model, pool, arguments.weights_dir))
            print(table(rows[-1:], device).splitlines()[-1], flush=True)
    rows.append(measure_plan_pgd(images[: arguments.throughput_batch], labels[: arguments.throughput_batch], device,
                                 arguments.weights_dir))
    if not arguments.skip_training:
        rows.append(measure_training_epoch(arguments.data_root, device, arguments.train_examples))
    output = table(rows, device)
    print(output)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
