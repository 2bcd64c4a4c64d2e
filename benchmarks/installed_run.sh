#!/usr/bin/env bash
# The benchmark as a user installs it: the wheel built from this checkout, installed (not editable) into a fresh
# virtual environment, then the smoke grid run by the console script from an empty folder. Prints the wheel's
# contents per folder, where the packages were imported from, the run's output and what the folder holds after.
#
#   DATA_ROOT=... WEIGHTS_DIR=... bash benchmarks/installed_run.sh [N_EXAMPLES]
#
# The environment sees the system's site-packages (torch and the rest are not downloaded again); the wheel is built
# without build isolation, so no network is needed.
set -euo pipefail
checkout="$(cd "$(dirname "$0")/.." && pwd)"
n_examples="${1:-2}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m venv --system-site-packages "$work/venv"
git -C "$checkout" archive HEAD | (mkdir "$work/source" && tar -x -C "$work/source")
# Built by the interpreter that runs this script (a fresh environment's own setuptools may predate wheel building).
python -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheelhouse" "$work/source"
wheel="$(ls "$work"/wheelhouse/*.whl)"
echo "== $(basename "$wheel"): files per folder"
python - "$wheel" <<'PY'
import collections, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for folder, count in sorted(collections.Counter(name.rsplit("/", 1)[0] for name in names).items()):
    print(f"{count:4d}  {folder}/")
print(f"{len(names)} files")
PY
"$work/venv/bin/pip" install -q --no-deps "$wheel"
mkdir "$work/empty" && cd "$work/empty"
echo "== in an empty folder ($(ls -A | wc -l) entries); imported from:"
"$work/venv/bin/python" -c "import harness, solvers, zoo; print(*(m.__file__ for m in (harness, solvers, zoo)), sep='\n')"
started=$(date +%s)
"$work/venv/bin/wasserstein-bench" grid=smoke "n_examples=$n_examples" executor=local \
  "data_root=${DATA_ROOT:?set DATA_ROOT}" "weights_dir=${WEIGHTS_DIR:?set WEIGHTS_DIR}" results_dir=out 2>/dev/null
echo "== exit 0 after $(( $(date +%s) - started )) s; the folder holds: $(ls -A)"
"$work/venv/bin/python" -c "
import pandas as pd
cells = pd.read_parquet('out/cells')
print(f\"{len(pd.read_parquet('out/examples'))} example rows, {len(cells)} cells; git_commit: {cells['git_commit'].iloc[0]}\")"
