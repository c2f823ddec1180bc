#!/usr/bin/env bash
# Mutation testing with cosmic-ray: does each module's fast test set notice small bugs in it?
#
#   pip install cosmic-ray==8.7.0       # not a test dependency: only this script needs it
#   benchmarks/mutation.sh [MODULE...]  # lm_model generate rotary stats (default: all four)
#   DSMOE_MUTATION_COUNT_ONLY=1 benchmarks/mutation.sh   # how many mutants each would run
#
# Not part of CI: each mutant reruns its module's tests (a few seconds), hundreds of times.
# The mutants are made in a copy of the working tree (DSMOE_MUTATION_DIR, default
# /tmp/dsmoe-mutation), imported as `dsmoe` through PYTHONPATH, so the checkout is never edited.
# Reports land in $DSMOE_MUTATION_DIR/<module>.txt (survivors with diffs: <module>.survivors.txt); they are
# recorded, each with its new test or the reason it is equivalent, in docs/TESTING.md.
# On a shared machine run it under `flock /tmp/dsmoe-heavy.lock`.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${DSMOE_MUTATION_DIR:-/tmp/dsmoe-mutation}
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import cosmic_ray" 2>/dev/null || { echo "cosmic-ray is missing: pip install cosmic-ray==8.7.0" >&2; exit 2; }

# module name -> "file|line range (empty: the whole file)|test command"
# Line ranges keep a file's mutants to the part named: deepseek.py's RotaryEmbedding..apply_rotary,
# generate.py's SamplingSettings and Sampler (the text stream has its own tests, not run here).
declare -A MODULES
rotary_first=$(grep -n '^class RotaryEmbedding' "$REPO/model/deepseek.py" | cut -d: -f1)
rotary_last=$(( $(grep -n '^class Attention' "$REPO/model/deepseek.py" | cut -d: -f1) - 1 ))
sampling_first=$(grep -n '^class SamplingSettings' "$REPO/model/generate.py" | cut -d: -f1)
sampling_last=$(( $(grep -n '^def generate_ids' "$REPO/model/generate.py" | cut -d: -f1) - 2 ))
PYTEST="$PYTHON -m pytest -x -q -p no:cacheprovider"
MODULES[lm_model]="evals/lm_model.py||$PYTEST tests/test_eval.py -k 'loglikelihood or boundaries or greedy_flag or rolling or generate_until or offload_budgets or unknown_model_argument'"
MODULES[generate]="model/generate.py|$sampling_first-$sampling_last|$PYTEST tests/test_generate.py -k 'sampl or top_ or repetition or settings'"
MODULES[rotary]="model/deepseek.py|$rotary_first-$rotary_last|$PYTEST tests/test_rotary.py"
MODULES[stats]="offload/stats.py||$PYTEST tests/test_offload_stats.py tests/test_bench.py -k 'stats or scripted'"

# Operators left out. Binary-operator replacements into `|` first of all: every `|` in these files is
# a type annotation, which `from __future__ import annotations` never evaluates (equivalent
# mutants). Replacements into the rarer operators (%, **, <<, >>, &, ^, @) are left out for time:
# each arithmetic operator is still replaced by +, -, * and / and //.
EXCLUDE='"core/ReplaceBinaryOperator_.*_(BitOr|BitAnd|BitXor|LShift|RShift|MatMult|Mod|Pow)$", "core/ReplaceBinaryOperator_BitOr_.*"'

rm -rf "$WORK"
mkdir -p "$WORK/dsmoe"
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$WORK/dsmoe")
cp "$REPO"/native/_native*.so "$WORK/dsmoe/native/" 2>/dev/null || true  # the built kernels, if any
ln -s "$(cd "$REPO/.." && pwd)/shared" "$WORK/shared"  # the tests read ../shared
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"  # `import dsmoe` is the copy, ahead of an editable install

cd "$WORK/dsmoe"
"$PYTHON" -c "import dsmoe, sys; sys.exit(0 if dsmoe.__file__.startswith('$WORK') else 'dsmoe is not imported from the copy')"

for name in "${@:-lm_model generate rotary stats}"; do
  for module in $name; do
    IFS='|' read -r path lines command <<< "${MODULES[$module]:?unknown module $module (lm_model, generate, rotary, stats)}"
    config="$WORK/$module.toml"
    {
      echo "[cosmic-ray]"
      echo "module-path = \"$path\""
      echo "timeout = 120.0"
      echo "excluded-modules = []"
      echo "test-command = \"$command\""
      echo "[cosmic-ray.distributor]"
      echo "name = \"local\""
      echo "[cosmic-ray.filters.operators-filter]"
      echo "exclude-operators = [$EXCLUDE]"
      if [ -n "$lines" ]; then
        echo "[cosmic-ray.filters.line-filter]"
        echo "lines = { \"$path\" = [\"$lines\"] }"
      fi
    } > "$config"
    session="$WORK/$module.sqlite"
    cosmic-ray init "$config" "$session"
    cr-filter-operators "$session" "$config"
    if [ -n "$lines" ]; then cr-filter-lines --config "$config" "$session"; fi
    echo "== $module: $(cr-report "$session" --show-pending | grep -c '^\[job-id\]') mutants, $(cr-report "$session" --show-pending | grep -c 'SKIPPED') skipped by the filters"
    if [ -n "${DSMOE_MUTATION_COUNT_ONLY:-}" ]; then continue; fi
    cosmic-ray baseline "$config"  # the tests pass on the unmutated copy
    started=$(date +%s)
    cosmic-ray exec "$config" "$session"
    cr-report "$session" --show-diff --surviving-only > "$WORK/$module.survivors.txt"
    cr-report "$session" --show-output > "$WORK/$module.txt"
    echo "== $module ($path${lines:+ lines $lines}): $(( $(date +%s) - started )) s"
    cr-report "$session" | tail -n 3
  done
done
