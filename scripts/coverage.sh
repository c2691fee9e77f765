#!/usr/bin/env bash
# The test suite (the README's `python -m pytest`) under coverage: branch coverage of
# llm_service in the test process and in every service process the tests start, combined,
# reported, and failing below `fail_under` ([tool.coverage.report] in pyproject.toml).
# Arguments go to pytest (`scripts/coverage.sh tests/test_breaker.py`: that file alone,
# which will fall under the floor). COVERAGE_HTML=1 also writes htmlcov/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}

rm -f .coverage .coverage.*
# one place for every process's data file: the services the tests start run elsewhere
export COVERAGE_FILE="$PWD/.coverage"
status=0
"$python" -m coverage run -m pytest "$@" || status=$?
"$python" -m coverage combine -q
if [ "${COVERAGE_HTML:-0}" = 1 ]; then
    "$python" -m coverage html -q
fi
# the report's own status is the floor's verdict; a failing test run fails the script too
"$python" -m coverage report || status=$?
exit "$status"
