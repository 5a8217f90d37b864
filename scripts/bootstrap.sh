#!/usr/bin/env bash
# Installs everything dist_bn needs on a Debian machine, as root, and reuses
# what is already there: Open MPI from apt, ./.venv, TensorFlow (CPU), a
# Horovod built from source against it with TensorFlow + MPI + Gloo, and
# dist_bn's MPI all-reduce kernel. A second run with nothing to do takes a
# few seconds.
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=2
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.dist_bn-ready
# The pins live in setup.py; read one by package name.
pin() { sed -n "s/^ *\"\($1==[^\"]*\)\",.*/\1/p" setup.py; }
TF_PIN=$(pin tensorflow-cpu)
HOROVOD_PIN=$(pin horovod)

log() { printf '[bootstrap] %s\n' "$*"; }

apt_packages=(openmpi-bin libopenmpi-dev cmake g++ make)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# dist_bn's MPI all-reduce kernel, compiled against this TensorFlow and MPI
# (about 10 s; a no-op when its stamp matches the source and flags).
build_kernel() { "$VENV/bin/python" -m dist_bn.build_op | sed 's/^/[bootstrap] /'; }

# Up to date when the stamp is newer than setup.py and this script.
if [[ -f $STAMP && $STAMP -nt setup.py && $STAMP -nt scripts/bootstrap.sh ]]; then
    build_kernel
    log "environment ready ($VENV)"
    exit 0
fi

[[ -x $VENV/bin/python ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade "pip<26" "setuptools<80" wheel
log "installing TensorFlow and the build requirements"
"${pip[@]}" install "$TF_PIN" "$(pin keras)" "$(pin numpy)"

# A Horovod that imports and was built against this TensorFlow is kept;
# otherwise it is built from source (about 4 minutes on 2 cores).
if ! "$VENV/bin/python" -c 'import horovod.tensorflow' 2>/dev/null; then
    log "building $HOROVOD_PIN from source against $TF_PIN"
    "${pip[@]}" uninstall -y horovod >/dev/null 2>&1 || true
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
        "${pip[@]}" install --no-build-isolation --no-cache-dir "$HOROVOD_PIN"
fi

log "installing dist_bn (editable)"
"${pip[@]}" install -e ".[test,bench]"
"${pip[@]}" install --no-deps "$(pin tf-keras)"

check=$("$VENV/bin/horovodrun" --check-build)
for need in "\[X\] TensorFlow" "\[X\] MPI" "\[X\] Gloo"; do
    grep -q "$need" <<<"$check" || { echo "$check"; log "Horovod build lacks ${need#\\[X\\] }"; exit 1; }
done
log "horovodrun --check-build: TensorFlow, MPI and Gloo present"
build_kernel
touch "$STAMP"
