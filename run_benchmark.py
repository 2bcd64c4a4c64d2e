"""Run a benchmark grid: ``python run_benchmark.py grid=full``.

Hydra composes ``conf/config.yaml`` with the grid (``grid=NAME``, one of
``conf/grid/*.yaml``) and the executor (``executor=ray|local``); any setting
can be overridden on the command line (``n_examples=200 results_dir=out
ray.address=auto``). Results land in ``results_dir`` as Parquet (see
``harness.store``); rerunning the same command resumes an interrupted run.
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.run.benchmark import run_benchmark


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(config: DictConfig) -> None:
    code = run_benchmark(OmegaConf.to_container(config, resolve=True))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
