#!/usr/bin/env bash
# Mutation testing with cosmic-ray: does each module's fast test set notice small bugs in it?
#
#   pip install cosmic-ray==8.7.0       # not a test dependency: only this script needs it
#   benchmarks/mutation.sh [MODULE...]  # lm_model generate rotary stats (default: all four)
#   DSMOE_MUTATION_COUNT_ONLY=1 benchmarks/mutation.sh   # how many mutants each would run
#   DSMOE_MUTATION_SAMPLE=60 benchmarks/mutation.sh lm_model   # a seeded random 60 of them
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
# Each mutant's pytest is forked from a server that has imported torch and lm-eval once
# (benchmarks/mutation_forkserver.py), which saves most of a mutant's time; hypothesis' and anyio's
# pytest plugins (seconds of imports) are off: none of these tests uses them.
SOCKET="$WORK/forkserver.sock"
# Tests are named one by one, cheapest first: with -x a killed mutant stops at its first failure.
PYTEST="$PYTHON $REPO/benchmarks/mutation_forkserver.py run $SOCKET -x -q -p no:cacheprovider -p no:hypothesispytest -p no:anyio"
MODULES[lm_model]="evals/lm_model.py||$PYTEST tests/test_eval.py::test_unknown_model_argument_is_one_clear_error tests/test_eval_progress.py::test_projected_seconds_by_hand tests/test_eval.py::test_greedy_flag_matches_argmax tests/test_eval.py::test_loglikelihood_equals_lm_eval_over_a_plain_forward_pass tests/test_eval.py::test_token_boundaries_follow_lm_eval tests/test_eval.py::test_loglikelihood_left_truncates_like_lm_eval tests/test_eval.py::test_rolling_loglikelihood_equals_direct tests/test_eval.py::test_rolling_windows_cover_every_token_once tests/test_eval.py::test_generate_until_is_greedy_and_stops tests/test_eval_reference.py::test_estimate_counts_requests_and_tokens_then_projects tests/test_eval_reference.py::test_chat_template_methods_render_the_chat_models_format tests/test_eval_reference.py::test_text_starting_with_bos_text_gets_no_second_bos tests/test_eval_reference.py::test_rolling_scores_text_given_bos_and_the_hf_way_on_request 'tests/test_eval_reference.py::test_every_max_token_alias_limits_generation[max_tokens]' tests/test_eval_reference.py::test_unshared_rows_project_only_the_continuations tests/test_eval_reference.py::test_one_token_choices_one_row_per_question_batched_across_questions tests/test_eval_reference.py::test_empty_context_splits_a_leading_prefix_token_off_like_lm_eval tests/test_eval_reference.py::test_empty_context_rule_with_large_ids_and_without_bos tests/test_eval_reference.py::test_generation_kwargs_read_as_lm_eval_s_hf_model_reads_them tests/test_eval_reference.py::test_chat_template_edges tests/test_eval_reference.py::test_model_args_as_lm_eval_passes_them tests/test_eval_progress.py::test_without_sharing_one_context_is_one_unshared_batch tests/test_eval_progress.py::test_rows_read_are_lm_eval_s_left_truncated_windows tests/test_eval_progress.py::test_a_one_token_row_batched_with_a_longer_continuation tests/test_eval_progress.py::test_padding_with_a_bos_id_of_zero tests/test_eval_progress.py::test_a_continuation_longer_than_max_length_is_refused tests/test_eval_progress.py::test_many_requests_done_in_one_step_get_no_projection tests/test_eval_progress.py::test_generation_estimate_and_warm_up_on_a_scripted_clock tests/test_eval_progress.py::test_score_pairs_schedule_counts_and_warm_up tests/test_eval.py::test_offload_budgets_as_model_args_give_the_resident_scores"
MODULES[generate]="model/generate.py|$sampling_first-$sampling_last|$PYTEST tests/test_generate.py::test_bad_settings_are_usage_errors tests/test_generate.py::test_top_p_keeps_only_the_nucleus tests/test_generate.py::test_top_p_stops_at_a_nucleus_that_reaches_p_exactly tests/test_generate.py::test_repetition_penalty_discourages_seen_tokens tests/test_generate.py::test_repetition_penalty_pushes_negative_scores_further_down tests/test_generate.py::test_temperature_sharpens_and_flattens tests/test_generate.py::test_top_p_samples_an_unsorted_nucleus_in_proportion tests/test_generate.py::test_top_p_with_temperature_and_top_k tests/test_generate.py::test_sampling_without_limits_follows_the_softmax tests/test_generate.py::test_top_k_one_is_greedy tests/test_generate.py::test_unset_settings_stop_a_reply_at_256_new_tokens tests/test_generate.py::test_seeded_sampling_is_reproducible_and_differs_from_greedy"
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
if [ -z "${DSMOE_MUTATION_COUNT_ONLY:-}" ]; then
  "$PYTHON" "$REPO/benchmarks/mutation_forkserver.py" serve "$SOCKET" &
  server=$!
  trap 'kill $server 2>/dev/null; rm -f "$SOCKET"' EXIT
  for _ in $(seq 600); do [ -S "$SOCKET" ] && break; sleep 0.1; done
fi

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
    if [ -n "${DSMOE_MUTATION_SAMPLE:-}" ]; then  # run only N of the mutants, a seeded random choice
      "$PYTHON" - "$session" "$DSMOE_MUTATION_SAMPLE" <<'EOF'
import random
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

with use_db(sys.argv[1], WorkDB.Mode.open) as db:
    def where(item):  # job ids are random: order by the mutation itself, so seed 0 picks the same set
        m = item.mutations[0]
        return (m.start_pos, m.operator_name, m.occurrence)

    pending = sorted(db.pending_work_items, key=where)
    keep = {item.job_id for item in random.Random(0).sample(pending, min(int(sys.argv[2]), len(pending)))}
    for item in pending:
        if item.job_id not in keep:
            db.set_result(item.job_id, WorkResult(output="not sampled", worker_outcome=WorkerOutcome.SKIPPED))
EOF
    fi
    echo "== $module: $(cr-report "$session" --show-pending | grep -c '^\[job-id\]') mutants, $(cr-report "$session" --show-pending | grep -c 'SKIPPED') skipped by the filters"
    if [ -n "${DSMOE_MUTATION_COUNT_ONLY:-}" ]; then continue; fi
    baseline_started=$(date +%s)
    cosmic-ray baseline "$config"  # the tests pass on the unmutated copy
    # cosmic-ray counts a timeout as a kill: the limit must sit well above a full test run, which
    # on a loaded machine is minutes for lm_model (a fixed 120 s made survivors look killed).
    sed -i "s/^timeout = .*/timeout = $(( 3 * ($(date +%s) - baseline_started) + 60 )).0/" "$config"
    started=$(date +%s)
    cosmic-ray exec "$config" "$session"
    cr-report "$session" --show-diff --surviving-only > "$WORK/$module.survivors.txt"
    cr-report "$session" --show-output > "$WORK/$module.txt"
    echo "== $module ($path${lines:+ lines $lines}): $(( $(date +%s) - started )) s"
    cr-report "$session" | tail -n 3
  done
done
