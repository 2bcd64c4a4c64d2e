"""``python -m harness.train MODEL [MODEL ...]``: train zoo entries by their recipes (resumes a killed run)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import zoo

from .loop import TrainingDiverged, train


def main(argv=None) -> int:
    trainable = sorted(spec.name for spec in zoo.models() if spec.recipe is not None)
    parser = argparse.ArgumentParser(prog="python -m harness.train", description=__doc__.split(":")[1].strip())
    parser.add_argument("models", nargs="+", help=f"models with a recipe: {', '.join(trainable)}")
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data"))
    parser.add_argument("--weights-dir", default=None, help="default: $WASSERSTEIN_BENCH_WEIGHTS, else the cache folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=None, help="instead of the recipe's (recorded)")
    parser.add_argument("--train-examples", type=int, default=None, help="only the first this many training images (recorded)")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0,
                        help="also checkpoint within an epoch this often (training time); 0: after every batch")
    parser.add_argument("--download", action="store_true")
    args = parser.parse_args(argv)
    if args.checkpoint_minutes < 0:
        parser.error(f"--checkpoint-minutes {args.checkpoint_minutes} is invalid: it must be 0 or more")
    unknown = [name for name in args.models if name not in trainable]
    if unknown:
        parser.error(f"{', '.join(map(repr, unknown))}: no recipe; models with recipes: {', '.join(trainable)}")
    for name in args.models:
        try:
            record = train(
                name, data_root=args.data_root, weights_dir=args.weights_dir, device=args.device, epochs=args.epochs,
                train_examples=args.train_examples, download=args.download,
                checkpoint_seconds=60.0 * args.checkpoint_minutes,
            )
        except TrainingDiverged as error:
            print(error, file=sys.stderr)
            return 1
        summary = {key: record[key] for key in ("model", "epochs", "train_examples", "clean_accuracy", "seconds", "device")}
        for key in ("certified_linf_eps", "certified_accuracy"):
            if key in record:
                summary[key] = record[key]
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
