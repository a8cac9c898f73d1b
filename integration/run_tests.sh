#!/usr/bin/env bash
# Run one integration suite in its environment.
#
# Usage: integration/run_tests.sh NAME [PYTEST ARGS...]
#
#   NAME   current | legacy  (the environments of integration/build_env.sh)
#
# Builds or reuses env NAME with the repository and the vLLM plugin installed editable, then
# runs `pytest -q tests/integration/NAME` from a fresh temporary directory, with the variables
# that keep upstream code off TPUs and off the GCE metadata server. pytest's "no tests ran"
# (exit 5) is an error. --confcutdir keeps the core suite's tests/conftest.py (which clears
# every TPU_* variable) out of the integration suites.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ $# -ge 1 ]] || { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
NAME="$1"; shift

# Common to every suite: no TPU runtime, no metadata server, no telemetry, no hub.
OFFLINE_ENV=(
    TPU_SKIP_MDS_QUERY=1
    TPU_NAME=local
    TPU_ACCELERATOR_TYPE=v6e-1
    TPU_WORKER_ID=0
    JAX_PLATFORMS=cpu
    VLLM_NO_USAGE_STATS=1
    DO_NOT_TRACK=1
    HF_HUB_OFFLINE=1
)
# Per suite: extra variables (space-separated NAME=VALUE).
declare -A EXTRA_ENV=(
    [current]=""
    [legacy]="PJRT_DEVICE=CPU"
)
[[ -v "EXTRA_ENV[$NAME]" ]] || { echo "run_tests.sh: unknown suite '$NAME' (known: ${!EXTRA_ENV[*]})" >&2; exit 2; }
TESTS="$ROOT/tests/integration/$NAME"
[[ -d "$TESTS" ]] || { echo "run_tests.sh: no tests at $TESTS" >&2; exit 1; }

ENV_DIR="$("$ROOT/integration/build_env.sh" "$NAME" --with "$ROOT" --with "$ROOT/plugins/tpu-registry-vllm" | tail -n 1)"
[[ -x "$ENV_DIR/bin/python" ]] || { echo "run_tests.sh: build_env.sh gave no environment ($ENV_DIR)" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
read -r -a extra <<< "${EXTRA_ENV[$NAME]}"
set +e
env "${OFFLINE_ENV[@]}" "${extra[@]}" "$ENV_DIR/bin/python" -m pytest -q -p no:cacheprovider \
    --rootdir "$TESTS" --confcutdir "$TESTS" "$TESTS" "$@"
rc=$?
set -e
if (( rc == 5 )); then
    echo "run_tests.sh: pytest collected no tests in $TESTS" >&2
    exit 1
fi
exit "$rc"
