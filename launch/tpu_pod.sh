#!/usr/bin/env bash
# Launch BiFlow training on a Cloud TPU VM (single host or pod slice), with a
# preemption-safe restart loop.
#
# Usage:
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=TYPE \
#       --config=configs/NAME.py[:ARG] --workdir=gs://BUCKET/PATH [options] \
#       [-- extra args for biflow_jax.main, e.g. --config.key=value]
#
# What it does, in a loop:
#   1. `gcloud compute tpus tpu-vm describe` the VM; create it if missing, delete
#      and recreate it if it was PREEMPTED/TERMINATED/STOPPED, wait while it is
#      CREATING/STARTING/REPAIRING/...
#   2. On a new (or first-seen) VM: put the code on every worker (copy of this
#      checkout, or `git clone` with --repo) and install it into a Python 3.11
#      venv: `pip install -r requirements.txt -e .` plus `jax[tpu]`.
#   3. Run the same command on all workers (`--worker=all`):
#        python -m biflow_jax.main --config=... --workdir=gs://... --distributed=on ...
#      If it fails and the VM is gone or not READY (preemption, maintenance),
#      go back to 1. Training resumes from the last checkpoint in --workdir by
#      itself, which is why --workdir must be a gs:// path that outlives the VM.
#
# Arguments (all --key=value; `--key value` also works):
#   --name=NAME            TPU VM name (required).
#   --zone=ZONE            GCP zone, e.g. us-central2-b (required).
#   --accelerator=TYPE     Accelerator type, e.g. v4-32, v5litepod-16, v6e-64
#                          (required unless the VM already exists).
#   --version=RUNTIME      TPU software version (default: tpu-ubuntu2204-base;
#                          v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
#                          v6e: v2-alpha-tpuv6e).
#   --project=PROJECT      GCP project (default: gcloud's configured project).
#   --spot                 Create a Spot VM (cheaper, may be preempted).
#   --preemptible          Create a legacy preemptible VM.
#   --config=SPEC          configs/NAME.py[:ARG] passed to main (required).
#   --workdir=gs://...     Checkpoint/log dir passed to main (required, gs:// so
#                          that a recreated VM resumes from it).
#   --repo=URL             git-clone this URL on the workers instead of copying
#                          the local checkout (uncommitted changes are then not
#                          shipped). --ref=REF picks a branch/tag (default: the
#                          remote's default branch).
#   --remote_dir=DIR       Code directory on workers, relative to $HOME
#                          (default: biflow_jax).
#   --venv=DIR             Virtualenv on workers, relative to $HOME (default: biflow_venv).
#   --python=BIN           Interpreter used to create the venv (default: python3.11,
#                          apt-installed if missing).
#   --jax_tpu=SPEC         pip spec for the TPU JAX build (default: jax[tpu] pinned
#                          to the jax version in requirements.txt).
#   --env=KEY=VALUE        Environment variable for the training command (repeatable).
#   --distributed=MODE     Passed to main (default: on; JAX reads the pod layout
#                          from the TPU metadata, which also works on one host).
#   --max_restarts=N       Give up after N recreations/reruns (default: 20).
#   --retry_wait=SECONDS   Sleep between attempts (default: 60).
#   --ready_timeout=SECONDS  Max wait for the VM to become READY (default: 1800).
#   --retry_on_failure     Also rerun when the VM is still READY after a failure
#                          (e.g. dropped SSH); by default that is a real error.
#   --skip_setup           Never copy/install (the workers are already set up).
#   --delete_on_success    Delete the VM when training finishes successfully.
#   --dry-run              Print every command (prefixed with "+ ") instead of
#                          running it; assumes the VM does not exist yet and that
#                          training succeeds. Needs no gcloud.
#   -h, --help             Show this header.
#
# Example:
#   launch/tpu_pod.sh --name=biflow-v4-32 --zone=us-central2-b \
#       --accelerator=v4-32 --version=tpu-ubuntu2204-base --spot \
#       --config=configs/imagenet64_biflow.py --workdir=gs://my-bucket/biflow/run1 \
#       -- --config.training.batch_size=1024
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

NAME=""
ZONE=""
ACCELERATOR=""
VERSION="tpu-ubuntu2204-base"
PROJECT=""
CAPACITY=""          # "", --spot or --preemptible
CONFIG=""
WORKDIR=""
REPO_URL=""
REPO_REF=""
REMOTE_DIR="biflow_jax"
VENV="biflow_venv"
PYTHON_BIN="python3.11"
JAX_TPU=""
DISTRIBUTED="on"
MAX_RESTARTS=20
RETRY_WAIT=60
READY_TIMEOUT=1800
RETRY_ON_FAILURE=0
SKIP_SETUP=0
DELETE_ON_SUCCESS=0
DRY_RUN=0
ENV_VARS=()
EXTRA_ARGS=()

usage() {
  sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 2
}

# Quote one word for display/remote use; plain words stay readable.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "${word}")"
  done
  printf '%s' "${out}"
}

# Run a command, or print it with a "+ " prefix under --dry-run.
run() {
  if (( DRY_RUN )); then
    echo "+ $(quote_all "$@")"
  else
    "$@"
  fi
}

while (( $# )); do
  arg="$1"
  shift
  case "${arg}" in
    --) EXTRA_ARGS+=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run|--dry_run) DRY_RUN=1; continue ;;
    --spot) CAPACITY="--spot"; continue ;;
    --preemptible) CAPACITY="--preemptible"; continue ;;
    --retry_on_failure) RETRY_ON_FAILURE=1; continue ;;
    --skip_setup) SKIP_SETUP=1; continue ;;
    --delete_on_success) DELETE_ON_SUCCESS=1; continue ;;
    --*=*) key="${arg%%=*}"; value="${arg#*=}" ;;
    --*)
      (( $# )) || die "${arg} needs a value"
      key="${arg}"; value="$1"; shift ;;
    *) die "unexpected argument '${arg}' (pass main's extra flags after --)" ;;
  esac
  case "${key}" in
    --name) NAME="${value}" ;;
    --zone) ZONE="${value}" ;;
    --accelerator|--accelerator_type|--accelerator-type) ACCELERATOR="${value}" ;;
    --version|--runtime_version) VERSION="${value}" ;;
    --project) PROJECT="${value}" ;;
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --repo) REPO_URL="${value}" ;;
    --ref) REPO_REF="${value}" ;;
    --remote_dir) REMOTE_DIR="${value}" ;;
    --venv) VENV="${value}" ;;
    --python) PYTHON_BIN="${value}" ;;
    --jax_tpu) JAX_TPU="${value}" ;;
    --env) [[ "${value}" == *=* ]] || die "--env wants KEY=VALUE, got '${value}'"; ENV_VARS+=("${value}") ;;
    --distributed) DISTRIBUTED="${value}" ;;
    --max_restarts) MAX_RESTARTS="${value}" ;;
    --retry_wait) RETRY_WAIT="${value}" ;;
    --ready_timeout) READY_TIMEOUT="${value}" ;;
    *) die "unknown option '${key}' (see --help)" ;;
  esac
done

[[ -n "${NAME}" ]] || die "--name is required"
[[ -n "${ZONE}" ]] || die "--zone is required"
[[ -n "${CONFIG}" ]] || die "--config is required"
[[ -n "${WORKDIR}" ]] || die "--workdir is required"
[[ "${WORKDIR}" == gs://* ]] || die "--workdir must be a gs:// path so a recreated VM can resume (got '${WORKDIR}')"
[[ "${DISTRIBUTED}" =~ ^(auto|on|off)$ ]] || die "--distributed must be auto, on or off"
for n in MAX_RESTARTS RETRY_WAIT READY_TIMEOUT; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || die "--${n,,} must be a non-negative integer"
done
[[ "${REMOTE_DIR}" != /* && "${REMOTE_DIR}" != *..* ]] || die "--remote_dir must be relative to \$HOME"

if [[ -z "${JAX_TPU}" ]]; then
  jax_pin="$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "${REPO_ROOT}/requirements.txt" 2>/dev/null | head -n1 || true)"
  JAX_TPU="jax[tpu]${jax_pin:+==${jax_pin}}"
fi

if (( ! DRY_RUN )) && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found; install the Google Cloud SDK (or use --dry-run)"
fi

GCLOUD_LOC=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then GCLOUD_LOC+=(--project="${PROJECT}"); fi
TPU=(gcloud compute tpus tpu-vm)

# Sets VM_STATE to the VM state (READY, PREEMPTED, ...) or NOT_FOUND.
# (A global instead of $(...) so the dry-run echo reaches stdout.)
VM_STATE=""
read_vm_state() {
  if (( DRY_RUN )); then
    run "${TPU[@]}" describe "${NAME}" "${GCLOUD_LOC[@]}" --format='value(state)'
    echo "# dry-run: assuming VM '${NAME}' does not exist"
    VM_STATE=NOT_FOUND
    return 0
  fi
  if VM_STATE="$("${TPU[@]}" describe "${NAME}" "${GCLOUD_LOC[@]}" --format='value(state)' 2>/dev/null)"; then
    VM_STATE="${VM_STATE:-UNKNOWN}"
  else
    VM_STATE=NOT_FOUND
  fi
}

create_vm() {
  [[ -n "${ACCELERATOR}" ]] || die "--accelerator is required to create the VM"
  local cmd=("${TPU[@]}" create "${NAME}" "${GCLOUD_LOC[@]}"
             --accelerator-type="${ACCELERATOR}" --version="${VERSION}")
  if [[ -n "${CAPACITY}" ]]; then cmd+=("${CAPACITY}"); fi
  run "${cmd[@]}"
}

delete_vm() {
  run "${TPU[@]}" delete "${NAME}" "${GCLOUD_LOC[@]}" --quiet
}

# Make sure the VM exists and is READY; sets VM_CREATED=1 if it was (re)created.
VM_CREATED=0
ensure_vm() {
  local deadline=$(( SECONDS + READY_TIMEOUT ))
  VM_CREATED=0
  while true; do
    if (( SECONDS > deadline )); then
      die "VM ${NAME} not READY after ${READY_TIMEOUT}s (last state ${VM_STATE})"
    fi
    read_vm_state
    case "${VM_STATE}" in
      READY)
        return 0 ;;
      NOT_FOUND)
        echo "VM ${NAME}: not found, creating it." >&2
        if create_vm; then
          VM_CREATED=1
          if (( DRY_RUN )); then return 0; fi
        else
          # Typically no Spot capacity right now: wait and try again.
          echo "VM ${NAME}: create failed; retrying in ${RETRY_WAIT}s." >&2
          sleep "${RETRY_WAIT}"
        fi ;;
      PREEMPTED|TERMINATED|STOPPED|STOPPING)
        echo "VM ${NAME}: ${VM_STATE}; deleting it to recreate." >&2
        delete_vm || sleep 30 ;;
      *)
        echo "VM ${NAME}: ${VM_STATE}; waiting for READY." >&2
        sleep 30 ;;
    esac
  done
}

ssh_all() {
  run "${TPU[@]}" ssh "${NAME}" "${GCLOUD_LOC[@]}" --worker=all --command="$1"
}

# Copy or clone the code on every worker, then install it into the venv.
setup_workers() {
  if [[ -n "${REPO_URL}" ]]; then
    local clone=(git clone)
    if [[ -n "${REPO_REF}" ]]; then clone+=(--branch "${REPO_REF}"); fi
    clone+=("${REPO_URL}" "${REMOTE_DIR}")
    local update="git -C $(quote "${REMOTE_DIR}") pull --ff-only"
    if [[ -n "${REPO_REF}" ]]; then update="git -C $(quote "${REMOTE_DIR}") fetch origin $(quote "${REPO_REF}") && git -C $(quote "${REMOTE_DIR}") checkout -f FETCH_HEAD"; fi
    ssh_all "set -e; if [ -d $(quote "${REMOTE_DIR}")/.git ]; then ${update}; else $(quote_all "${clone[@]}"); fi"
  else
    local tarball="${TMPDIR:-/tmp}/biflow_src_${NAME}.tar.gz"
    # Tracked and untracked-but-not-ignored files: what you see is what runs.
    if (( DRY_RUN )); then
      echo "+ (cd $(quote "${REPO_ROOT}") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(quote "${tarball}"))"
    else
      (cd "${REPO_ROOT}" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - -czf "${tarball}")
    fi
    run "${TPU[@]}" scp "${tarball}" "${NAME}:biflow_src.tar.gz" "${GCLOUD_LOC[@]}" --worker=all
    ssh_all "set -e; mkdir -p $(quote "${REMOTE_DIR}") && tar -xzf biflow_src.tar.gz -C $(quote "${REMOTE_DIR}") && rm -f biflow_src.tar.gz"
  fi
  local py; py="$(quote "${PYTHON_BIN}")"
  ssh_all "set -e; if ! command -v ${py} >/dev/null; then sudo apt-get update -y && sudo apt-get install -y ${py} ${py}-venv; fi; \
[ -x $(quote "${VENV}")/bin/python ] || ${py} -m venv $(quote "${VENV}"); \
. $(quote "${VENV}")/bin/activate && pip install -q -U pip && cd $(quote "${REMOTE_DIR}") && \
pip install -r requirements.txt -e . && pip install $(quote "${JAX_TPU}")"
}

MAIN_ARGS=(python -m biflow_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" --distributed="${DISTRIBUTED}")
MAIN_ARGS+=("${EXTRA_ARGS[@]}")
if (( ${#ENV_VARS[@]} )); then
  MAIN_ARGS=(env "${ENV_VARS[@]}" "${MAIN_ARGS[@]}")
fi
REMOTE_MAIN="cd ~/$(quote "${REMOTE_DIR}") && . ~/$(quote "${VENV}")/bin/activate && $(quote_all "${MAIN_ARGS[@]}")"

attempt=0
need_setup=1
while true; do
  ensure_vm
  if (( VM_CREATED )); then need_setup=1; fi
  if (( need_setup && ! SKIP_SETUP )); then
    setup_workers
  fi
  need_setup=0
  echo "Attempt $(( attempt + 1 )): running on all workers of ${NAME}." >&2
  rc=0
  ssh_all "${REMOTE_MAIN}" || rc=$?
  if (( rc == 0 )); then
    echo "Training command finished successfully." >&2
    if (( DELETE_ON_SUCCESS )); then delete_vm; fi
    exit 0
  fi
  read_vm_state
  if [[ "${VM_STATE}" == READY ]] && (( ! RETRY_ON_FAILURE )); then
    echo "Training failed with exit code ${rc} while VM ${NAME} is READY: not a preemption, giving up." >&2
    echo "(use --retry_on_failure to rerun anyway)" >&2
    exit "${rc}"
  fi
  attempt=$(( attempt + 1 ))
  if (( attempt > MAX_RESTARTS )); then
    echo "Giving up after ${MAX_RESTARTS} restarts (last exit code ${rc}, VM state ${VM_STATE})." >&2
    exit 1
  fi
  echo "Exit code ${rc}, VM state ${VM_STATE}: restarting in ${RETRY_WAIT}s (restart ${attempt}/${MAX_RESTARTS}); training resumes from ${WORKDIR}." >&2
  sleep "${RETRY_WAIT}"
done
