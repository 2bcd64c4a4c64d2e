"""Run a benchmark grid from a checkout: ``python run_benchmark.py grid=full``.

The same command line as the installed ``wasserstein-bench`` and ``python -m
harness`` (:mod:`harness.cli`): any setting can be overridden (``n_examples=200
results_dir=out ray.address=auto``), and the results land in ``results_dir``.
"""

from harness.cli import main

if __name__ == "__main__":
    main()
