#!/usr/bin/env bash
# Create (or reuse) ./.venv-mergekit with mergekit 0.1.5 on the CPU build of torch.
#
# mergekit is kept out of the project venv: it is only a reference for the parity
# test and the speed benchmark. torch is installed first and pinned, so that
# mergekit's plain `torch>=2.0.0` requirement is already satisfied and pip does
# not pull a multi-GB CUDA build. Idempotent: a venv whose mergekit-yaml already
# runs is left alone. Exits non-zero, with one clear line, when it cannot install.
#
# Usage: experiments/mergekit_env.sh [VENV_DIR]   (default: .venv-mergekit in the repo root)
# Env:   PYTHON (default python3), MERGEKIT_TORCH (default torch==2.13.0; the
#        cap file on these machines also allows torch==2.14.1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-mergekit}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${MERGEKIT_TORCH:-torch==2.13.0}"
MERGEKIT_SPEC="mergekit==0.1.5"
STAMP="$VENV/.mergekit-installed"

fail() { echo "mergekit_env: error: $*" >&2; exit 1; }

if [[ -f "$STAMP" && -x "$VENV/bin/mergekit-yaml" ]] \
   && "$VENV/bin/python" -c "import mergekit, torch" >/dev/null 2>&1; then
    echo "mergekit_env: $VENV is ready ($(cat "$STAMP"))"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV" || fail "cannot create a venv at $VENV with $PYTHON"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

"${PIP[@]}" "$TORCH_SPEC" \
    || fail "cannot install $TORCH_SPEC into $VENV (set MERGEKIT_TORCH to a torch on this disk, e.g. torch==2.14.1)"
# Keep the torch just installed: the constraint stops any resolver from swapping it.
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
"${PIP[@]}" -c "$CONSTRAINTS" "$MERGEKIT_SPEC" \
    || fail "cannot install $MERGEKIT_SPEC beside torch $TORCH_VERSION into $VENV"

"$VENV/bin/mergekit-yaml" --help >/dev/null 2>&1 \
    || fail "$MERGEKIT_SPEC installed but $VENV/bin/mergekit-yaml --help fails"
VERSIONS="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in ("mergekit", "torch", "transformers", "safetensors")))')"
echo "$VERSIONS" > "$STAMP"
echo "mergekit_env: installed into $VENV: $VERSIONS"
