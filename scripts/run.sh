#!/usr/bin/env bash
# loco-timm quick start: sets everything up on a fresh Debian/Ubuntu machine (once), then runs a job.
#
#   bash scripts/run.sh main [ARGS]    the main job: LoCo on Fashion-MNIST, then the per-stage readout
#   bash scripts/run.sh demo [ARGS]    a one-minute demo of the learner on a real Fashion-MNIST batch
#   bash scripts/run.sh test [ARGS]    lint, the layering contract, the documentation build, the test suite (pytest,
#                                      one worker per core; slow tests included), then the oldest-timm check
#   bash scripts/run.sh docs           build the documentation site into site/ (open site/index.html)
#
# Set-up: Debian's dataset-fashion-mnist (and python3-venv where missing) through apt-get when run as root or
# with sudo, then a virtual environment in .venv with `pip install -e .[test,plot,track,docs]`. It is redone only
# when pyproject.toml changes. PYTHON picks the interpreter (default python3, >= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OLDEST_TIMM=1.0.12  # keep in step with pyproject.toml

apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=sudo; else
      echo "run.sh: cannot install Debian packages $* without root; install them, then run again" >&2; return 0; fi
  fi
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

setup() {
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "run.sh: loco-timm needs Python >= 3.10; set PYTHON=python3.11 (or newer)" >&2; exit 2; }
  local need=()
  [ -d /usr/share/datasets/fashion-mnist ] || [ -n "${LOCO_TIMM_DATA:-}" ] || need+=(dataset-fashion-mnist)
  "$PY" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
  if [ ${#need[@]} -gt 0 ]; then apt_install "${need[@]}"; fi
  local stamp
  stamp=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [ -x .venv/bin/python ] && [ "$(cat .venv/.loco-stamp 2>/dev/null)" = "$stamp" ]; then return; fi
  echo "run.sh: setting up .venv (a few minutes the first time)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test,plot,track,docs]'
  echo "$stamp" > .venv/.loco-stamp
}

job=${1:-}
shift || true
MAIN_RECIPE=loco_resnet18_small.simclr_fmnist
case "$job" in
  main)
    setup
    run_dir=${LOCO_RUN_DIR:-runs/fmnist-loco}
    # --resume: a finished run is read out again, an interrupted one continues
    .venv/bin/loco-timm train --config "$MAIN_RECIPE" --out-dir "$run_dir" --resume "$@"
    exec .venv/bin/loco-timm readout "$run_dir" --config "$MAIN_RECIPE" ;;
  demo)
    setup
    exec .venv/bin/python -m loco_timm.demo "$@" ;;
  test)
    setup
    # lint (pyproject.toml [tool.ruff]) and the layering contract ([tool.importlinter]): layers import only
    # downwards, no package's modules import each other in a cycle
    .venv/bin/ruff check .
    .venv/bin/lint-imports --no-cache
    # the documentation site, offline, warnings as errors (a broken link or API reference fails)
    NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
    # one pytest worker per core, one thread each: most of the suite is single-threaded Python (tracing, model
    # construction), so workers use the cores better than threads; tests that compare runs pin their own threads
    # (a third worker on two cores measured no faster: 10:57 against 10:47)
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest -q -n "${LOCO_TEST_WORKERS:-auto}" --dist loadgroup "$@"
    # the oldest supported timm, on the core tests
    old=.venv/oldest-timm-$OLDEST_TIMM
    [ -d "$old/timm" ] || .venv/bin/python -m pip install -q --no-deps --target "$old" "timm==$OLDEST_TIMM"
    echo "run.sh: core tests with timm $OLDEST_TIMM"
    PYTHONPATH="$old" .venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" \
      tests/test_stages.py tests/test_learner.py tests/test_losses.py tests/test_families.py ;;
  docs)
    setup
    NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
    echo "run.sh: documentation built: open site/index.html (or serve it: .venv/bin/mkdocs serve)" ;;
  *)
    echo "usage: bash scripts/run.sh {main|demo|test|docs} [ARGS]" >&2; exit 2 ;;
esac
