#!/usr/bin/env bash
# Mutation testing ([tool.mutmut] in pyproject.toml): mutmut changes the modules that keep the
# protocol's promises one small edit at a time, runs the tests that reach each change, and
# counts the changes no test noticed (survivors). Everything it writes is under mutants/;
# results are kept there, so a second run tests only the functions that changed since.
#
#   scripts/mutation.sh                          every module in the scope (hours on 2 cores)
#   scripts/mutation.sh 'llm_service.breaker.*'  one module (mutant names are globs)
#   scripts/mutation.sh --summary                the table of the last results, running nothing
#   scripts/mutation.sh --check                  the table, failing when a module has more
#                                                survivors than MUTATION_MAX_SURVIVORS allows
#                                                ("llm_service/breaker.py=0 ...", as .ci/mutation)
#
# MUTMUT_CHILDREN sets the number of mutants tested at once (default: the CPU count).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
mutmut="$(dirname "$python")/mutmut"

summary() {
    # One row per module. score: (killed + timeout) / (killed + survived + timeout), a mutant
    # that hangs the tests being caught; "no tests": no test in the test process reaches it.
    "$python" - "$@" <<'PY'
import json
import os
import pathlib
import sys
import tomllib

KILLED, SURVIVED, TIMEOUT, NO_TESTS = {1, 3}, {0}, {-24, 24, 152, 255, 36}, {5, 33}
config = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["tool"]["mutmut"]
limits = dict(
    entry.split("=", 1) for entry in os.environ.get("MUTATION_MAX_SURVIVORS", "").split()
)
check = sys.argv[1:] == ["--check"]
over = []
print(f"{'module':32} {'total':>6} {'killed':>7} {'survived':>9} {'timeout':>8} "
      f"{'no tests':>9} {'other':>6} {'unrun':>6} {'score':>6}")
for module in config["only_mutate"]:
    meta = pathlib.Path("mutants") / f"{module}.meta"
    if not meta.exists():
        print(f"{module:32} not mutated yet")
        continue
    codes = list(json.loads(meta.read_text())["exit_code_by_key"].values())
    killed = sum(code in KILLED for code in codes)
    survived = sum(code in SURVIVED for code in codes)
    timeout = sum(code in TIMEOUT for code in codes)
    no_tests = sum(code in NO_TESTS for code in codes)
    unrun = sum(code is None for code in codes)
    other = len(codes) - killed - survived - timeout - no_tests - unrun
    checked = killed + survived + timeout
    score = f"{100 * (killed + timeout) / checked:.0f}%" if checked else "-"
    print(f"{module:32} {len(codes):6} {killed:7} {survived:9} {timeout:8} "
          f"{no_tests:9} {other:6} {unrun:6} {score:>6}")
    if check and module in limits and survived > int(limits[module]):
        over.append(f"{module}: {survived} survivors, {limits[module]} recorded")
    elif check and module not in limits:
        print(f"    {module}: no number recorded ({survived} survivors)")
for line in over:
    print(f"more survivors than recorded: {line}", file=sys.stderr)
sys.exit(1 if over else 0)
PY
}

case "${1:-}" in
    --summary) summary; exit 0 ;;
    --check) summary --check; exit ;;
esac

"$mutmut" run --max-children "${MUTMUT_CHILDREN:-$(nproc)}" "$@"
summary
echo "survivors (mutmut show NAME shows the change; mutmut browse explores them):"
"$mutmut" results
