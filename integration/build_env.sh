#!/usr/bin/env bash
# Build (or reuse) an integration virtualenv for tpu-registry.
#
# Usage:
#   integration/build_env.sh NAME [--with PATH]... [--prune]
#
#   NAME       current | legacy
#              current: Python 3.12, vllm-tpu 0.32.0 (sdist, built with
#                       VLLM_TARGET_DEVICE=tpu) -> tpu-inference 0.32.0, jax 0.11.2
#              legacy:  Python 3.11, torch 2.9.0 + torch-xla[pallas] 2.9.0 +
#                       vllm 0.13.0 + torchax 0.0.7 (--no-deps)
#   --with P   after the stack is ready, `pip install -e P` into the env
#              (repeatable; not part of the env hash; the installed stack is
#              frozen as a constraint so an editable install cannot change it)
#   --prune    delete other NAME-* environments in the cache (older hashes)
#
# The env lives in ${TPU_REGISTRY_CACHE:-$HOME/.cache/tpu-registry}/envs/NAME-<hash>,
# where <hash> = first 12 hex digits of sha256(requirement file(s) + this script).
# An existing env is reused when its .healthy marker exists and the health
# check passes; otherwise it is deleted and rebuilt.  The marker is written
# last.  All progress output goes to stderr; the last (only) line on stdout is
# the env path, so `ENV=$(integration/build_env.sh current)` works.
#
# Interpreter overrides: TPU_REGISTRY_PYTHON_CURRENT / TPU_REGISTRY_PYTHON_LEGACY
# (path or command of a Python 3.12 / 3.11 interpreter).  Otherwise pyenv's
# newest installed 3.12.x / 3.11.x is used, then python3.12 / python3.11 on PATH.
# TPU_REGISTRY_MIN_FREE_GB (default 15): refuse to build with less free disk.
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
HERE="$(dirname "$SCRIPT_PATH")"

log() { printf '[build_env] %s\n' "$*" >&2; }
die() { printf '[build_env] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,28p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------- arguments
[[ $# -ge 1 ]] || usage
NAME="$1"; shift
WITH_PATHS=()
PRUNE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --with)
            [[ $# -ge 2 ]] || die "--with needs a PATH"
            [[ -d "$2" ]] || die "--with: not a directory: $2"
            WITH_PATHS+=("$(cd "$2" && pwd)"); shift 2 ;;
        --with=*)
            p="${1#--with=}"; [[ -d "$p" ]] || die "--with: not a directory: $p"
            WITH_PATHS+=("$(cd "$p" && pwd)"); shift ;;
        --prune) PRUNE=1; shift ;;
        -h|--help) usage ;;
        *) die "unknown argument: $1" ;;
    esac
done

# Env vars that keep torch_xla / tpu-inference / JAX off TPUs and off the GCE
# metadata server (used for the health check and for --with installs).
OFFLINE_TPU_ENV=(
    JAX_PLATFORMS=cpu
    PJRT_DEVICE=CPU
    TPU_SKIP_MDS_QUERY=1
    TPU_NAME=local
    TPU_ACCELERATOR_TYPE=v6e-1
    TPU_WORKER_ID=0
    VLLM_NO_USAGE_STATS=1
    DO_NOT_TRACK=1
    HF_HUB_OFFLINE=1
)

case "$NAME" in
    current)
        PY_MINOR=3.12
        PY_OVERRIDE="${TPU_REGISTRY_PYTHON_CURRENT:-}"
        REQ_FILES=("$HERE/requirements-current.txt")
        NODEPS_FILES=()
        BUILD_ENV=(VLLM_TARGET_DEVICE=tpu)
        HEALTH_PY='
import importlib.metadata as md, sys
assert sys.version_info[:2] == (3, 12), sys.version
import numpy, pytest, hypothesis, jax, torch, vllm, tpu_inference
import tpu_inference.layers.common.attention_backend
import tpu_inference.kernels.ragged_paged_attention.v3.kernel
want = {"vllm-tpu": "0.32.0", "tpu-inference": "0.32.0", "jax": "0.11.2"}
for dist, ver in want.items():
    got = md.version(dist)
    assert got == ver, f"{dist} {got} != {ver}"
print("ok", "vllm", vllm.__version__, "tpu_inference", md.version("tpu-inference"),
      "jax", jax.__version__, "torch", torch.__version__)
'
        ;;
    legacy)
        PY_MINOR=3.11
        PY_OVERRIDE="${TPU_REGISTRY_PYTHON_LEGACY:-}"
        REQ_FILES=("$HERE/requirements-legacy.txt")
        NODEPS_FILES=("$HERE/requirements-legacy-nodeps.txt")
        BUILD_ENV=()
        HEALTH_PY='
import importlib.metadata as md, importlib.util, sys
assert sys.version_info[:2] == (3, 11), sys.version
assert importlib.util.find_spec("libtpu") is None, "libtpu must not be installed (vLLM would select TpuPlatform)"
assert importlib.util.find_spec("tpu_inference") is None, "tpu_inference must not be installed"
import numpy, pytest, hypothesis, jax, torchax, torch, torch_xla, vllm
import vllm.v1.attention.backends.pallas
want = {"torch": "2.9.0", "torch-xla": "2.9.0", "vllm": "0.13.0", "torchax": "0.0.7"}
for dist, ver in want.items():
    got = md.version(dist).split("+")[0]
    assert got == ver, f"{dist} {got} != {ver}"
print("ok", "vllm", vllm.__version__, "torch", torch.__version__,
      "torch_xla", torch_xla.__version__, "jax", jax.__version__)
'
        ;;
    *) die "unknown environment '$NAME' (expected: current | legacy)" ;;
esac

for f in "${REQ_FILES[@]}" "${NODEPS_FILES[@]}"; do
    [[ -f "$f" ]] || die "missing requirement file: $f"
done

# ---------------------------------------------------------------- interpreter
py_is_minor() {  # $1 = interpreter; true if it runs and is Python $PY_MINOR
    local out
    out="$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || return 1
    [[ "$out" == "$PY_MINOR" ]]
}

find_python() {
    local cand
    if [[ -n "$PY_OVERRIDE" ]]; then
        py_is_minor "$PY_OVERRIDE" \
            || die "interpreter '$PY_OVERRIDE' (from TPU_REGISTRY_PYTHON_${NAME^^}) is not a working Python $PY_MINOR"
        echo "$PY_OVERRIDE"; return
    fi
    if command -v pyenv >/dev/null 2>&1; then
        local root ver
        root="$(pyenv root)"
        ver="$(pyenv versions --bare 2>/dev/null | grep -E "^${PY_MINOR//./\\.}\.[0-9]+$" | sort -t. -k3,3n | tail -n1 || true)"
        if [[ -n "$ver" ]]; then
            cand="$root/versions/$ver/bin/python$PY_MINOR"
            if py_is_minor "$cand"; then echo "$cand"; return; fi
        fi
    fi
    if command -v "python$PY_MINOR" >/dev/null 2>&1; then
        cand="$(command -v "python$PY_MINOR")"
        if py_is_minor "$cand"; then echo "$cand"; return; fi
    fi
    die "no Python $PY_MINOR interpreter found for environment '$NAME'. Install one (e.g. 'pyenv install $PY_MINOR') or set TPU_REGISTRY_PYTHON_${NAME^^}=/path/to/python$PY_MINOR"
}

PYTHON="$(find_python)"

# ---------------------------------------------------------------- env path
HASH="$(cat "${REQ_FILES[@]}" "${NODEPS_FILES[@]}" "$SCRIPT_PATH" | sha256sum | cut -c1-12)"
CACHE="${TPU_REGISTRY_CACHE:-$HOME/.cache/tpu-registry}"
ENVS="$CACHE/envs"
ENV_DIR="$ENVS/$NAME-$HASH"
mkdir -p "$ENVS"

# Serialise concurrent builds of the same env.
exec 9>"$ENV_DIR.lock"
if ! flock -n 9; then
    log "waiting for another build of $ENV_DIR ..."
    flock 9
fi

health_check() {
    [[ -x "$ENV_DIR/bin/python" ]] || return 1
    env "${OFFLINE_TPU_ENV[@]}" timeout 600 "$ENV_DIR/bin/python" -c "$HEALTH_PY" >&2
}

pip_() {  # pip in the env, output to stderr
    "$ENV_DIR/bin/python" -m pip --disable-pip-version-check --no-input "$@" >&2
}

if [[ -f "$ENV_DIR/.healthy" ]] && health_check; then
    log "reusing healthy env $ENV_DIR"
else
    if [[ -e "$ENV_DIR" ]]; then
        log "env $ENV_DIR is incomplete or unhealthy; removing it"
        rm -rf "$ENV_DIR"
    fi
    min_free_gb="${TPU_REGISTRY_MIN_FREE_GB:-15}"
    free_kb="$(df -Pk "$ENVS" | awk 'NR==2 {print $4}')"
    if (( free_kb < min_free_gb * 1024 * 1024 )); then
        die "only $((free_kb / 1024 / 1024)) GB free under $ENVS; need ${min_free_gb} GB (an env is ~11 GB). Free space or lower TPU_REGISTRY_MIN_FREE_GB."
    fi
    log "building $NAME env in $ENV_DIR with $PYTHON ($("$PYTHON" --version 2>&1))"
    start=$SECONDS
    "$PYTHON" -m venv "$ENV_DIR" >&2
    for f in "${REQ_FILES[@]}"; do
        log "pip install -r $f"
        env "${BUILD_ENV[@]}" "$ENV_DIR/bin/python" -m pip --disable-pip-version-check --no-input \
            install --no-cache-dir -r "$f" >&2
    done
    for f in "${NODEPS_FILES[@]}"; do
        log "pip install --no-deps -r $f"
        pip_ install --no-cache-dir --no-deps -r "$f"
    done
    log "pip check"
    pip_ check || die "pip check failed for $ENV_DIR"
    log "health check"
    health_check || die "health check failed for freshly built env $ENV_DIR"
    "$ENV_DIR/bin/python" -m pip --disable-pip-version-check list --format=freeze > "$ENV_DIR/pip-freeze.txt"
    date -u +%Y-%m-%dT%H:%M:%SZ > "$ENV_DIR/.healthy"
    log "built $ENV_DIR in $((SECONDS - start)) s ($(du -sh "$ENV_DIR" | cut -f1))"
fi

if (( PRUNE )); then
    for d in "$ENVS/$NAME"-*; do
        [[ -d "$d" && "$d" != "$ENV_DIR" ]] || continue
        log "pruning old env $d"
        rm -rf "$d" "$d.lock"
    done
fi

# ---------------------------------------------------------------- --with
if (( ${#WITH_PATHS[@]} )); then
    # Freeze the stack so editable installs cannot upgrade/downgrade it.
    constraints="$ENV_DIR/stack-constraints.txt"
    "$ENV_DIR/bin/python" -m pip --disable-pip-version-check list --format=freeze --exclude-editable \
        | grep -v -E '^(pip|setuptools|wheel)==' > "$constraints"
    args=()
    for p in "${WITH_PATHS[@]}"; do args+=(-e "$p"); done
    log "pip install (editable) ${WITH_PATHS[*]}"
    env "${OFFLINE_TPU_ENV[@]}" "$ENV_DIR/bin/python" -m pip --disable-pip-version-check --no-input \
        install --no-cache-dir -c "$constraints" "${args[@]}" >&2
fi

echo "$ENV_DIR"
