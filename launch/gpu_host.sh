#!/usr/bin/env bash
# Train BiFlow on one host using all of its local GPUs (single process; JAX
# sees every visible GPU and the trainer shards the batch across them).
#
# Usage:
#   launch/gpu_host.sh --config=configs/NAME.py[:ARG] --workdir=DIR [options] \
#       [-- extra args for biflow_jax.main, e.g. --config.key=value]
#
# Arguments (all --key=value; `--key value` also works):
#   --config=SPEC        configs/NAME.py[:ARG] passed to main (required).
#   --workdir=DIR        Checkpoint/log directory (required); rerunning the same
#                        command resumes from its last checkpoint.
#   --backend=jit|pmap   Data-parallel backend (default: jit, i.e. jit with
#                        sharded arrays); pmap passes --config.parallel.backend=pmap.
#   --install            First `pip install -r requirements.txt -e .` and the CUDA
#                        build of JAX (pinned to requirements.txt's jax version).
#   --cuda=cuda12|cuda13 Which jax[...] CUDA extra --install uses (default: cuda12).
#   --mem_fraction=F     Export XLA_PYTHON_CLIENT_MEM_FRACTION=F (see below).
#   --gpus=LIST          Export CUDA_VISIBLE_DEVICES=LIST (default: all GPUs).
#   --python=BIN         Interpreter (default: python, or $PYTHON).
#   --dry-run            Print the commands (prefixed with "+ ") instead of running them,
#                        after checking the config file and the --config.KEY=VALUE keys
#                        (with biflow_jax's own loader, when it is importable here).
#   -h, --help           Show this header.
#
# Environment worth knowing (set it before calling, or via the flags above):
#   XLA_PYTHON_CLIENT_MEM_FRACTION  Fraction of each GPU's memory JAX preallocates
#                                   (JAX default 0.75; 0.9 leaves room for big models).
#   XLA_PYTHON_CLIENT_PREALLOCATE   "false" allocates on demand (slower, fragments,
#                                   but lets other processes share the GPU).
#   XLA_FLAGS                       Extra XLA options, e.g.
#                                   --xla_gpu_enable_latency_hiding_scheduler=true
#   CUDA_VISIBLE_DEVICES            Which GPUs this run may use.
#   TF_CPP_MIN_LOG_LEVEL            2 silences TensorFlow's (input pipeline) info logs.
#   NCCL_DEBUG                      WARN/INFO to debug collective hangs.
#
# Example (config paths are relative to the repository root):
#   launch/gpu_host.sh --install --mem_fraction=0.9 \
#       --config=configs/imagenet64.py:p2 --workdir=/data/runs/imagenet64 \
#       -- --config.train.batch_size=256
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

CONFIG=""
WORKDIR=""
BACKEND="jit"
INSTALL=0
CUDA="cuda12"
MEM_FRACTION=""
GPUS=""
PYTHON_BIN="${PYTHON:-python}"
DRY_RUN=0
EXTRA_ARGS=()

usage() {
  sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
  echo "gpu_host.sh: error: $*" >&2
  exit 2
}

# Quote one word for display; plain words stay readable.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Run a command, or print it with a "+ " prefix under --dry-run.
run() {
  if (( DRY_RUN )); then
    local out="+" word
    for word in "$@"; do out+=" $(quote "${word}")"; done
    echo "${out}"
  else
    "$@"
  fi
}

# Export a variable, echoing it under --dry-run so the printout is complete.
set_env() {
  export "$1=$2"
  if (( DRY_RUN )); then echo "+ export $1=$(quote "$2")"; fi
}

while (( $# )); do
  arg="$1"
  shift
  case "${arg}" in
    --) EXTRA_ARGS+=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run|--dry_run) DRY_RUN=1; continue ;;
    --install) INSTALL=1; continue ;;
    --*=*) key="${arg%%=*}"; value="${arg#*=}" ;;
    --*)
      (( $# )) || die "${arg} needs a value"
      key="${arg}"; value="$1"; shift ;;
    *) die "unexpected argument '${arg}' (pass main's extra flags after --)" ;;
  esac
  case "${key}" in
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --backend) BACKEND="${value}" ;;
    --cuda) CUDA="${value}" ;;
    --mem_fraction) MEM_FRACTION="${value}" ;;
    --gpus) GPUS="${value}" ;;
    --python) PYTHON_BIN="${value}" ;;
    *) die "unknown option '${key}' (see --help)" ;;
  esac
done

[[ -n "${CONFIG}" ]] || die "--config is required"
[[ -n "${WORKDIR}" ]] || die "--workdir is required"
[[ "${BACKEND}" == jit || "${BACKEND}" == pmap ]] || die "--backend must be jit or pmap, got '${BACKEND}'"
[[ "${CUDA}" =~ ^cuda[0-9]+$ ]] || die "--cuda must look like cuda12, got '${CUDA}'"
if [[ -n "${MEM_FRACTION}" ]]; then
  [[ "${MEM_FRACTION}" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem_fraction must be in (0, 1], got '${MEM_FRACTION}'"
fi

# The config file exists, and (when biflow_jax can be imported here) it loads and every
# --config.KEY=VALUE names a real key: a typo stops the launch, not the job an hour later.
config_file="${CONFIG%%:*}"
[[ "${config_file}" == /* ]] || config_file="${REPO_ROOT}/${config_file}"
[[ -f "${config_file}" ]] || die "config file not found: ${CONFIG%%:*} (paths are relative to ${REPO_ROOT})"
if (cd "${REPO_ROOT}" && "${PYTHON_BIN}" -c "import biflow_jax.config_files" >/dev/null 2>&1); then
  overrides=()
  for word in "${EXTRA_ARGS[@]}"; do
    [[ "${word}" == --config.* ]] && overrides+=("${word}")
  done
  check="$(cd "${REPO_ROOT}" && "${PYTHON_BIN}" -c '
import sys
from biflow_jax import config_files
from biflow_jax.errors import ConfigError
try:
    _, overrides = config_files.split_overrides(sys.argv[2:])
    config_files.apply_overrides(config_files.load(sys.argv[1]), overrides)
except ConfigError as e:
    print(str(e).splitlines()[0])
' "${CONFIG}" "${overrides[@]}" 2>&1)" || check="could not check the config: ${check##*$'\n'}"
  [[ -z "${check}" ]] || die "${check}"
elif (( DRY_RUN )); then
  echo "# biflow_jax is not importable with ${PYTHON_BIN}: config keys not checked" >&2
fi

# main runs from the repo root (configs/ paths); keep a relative local workdir
# pointing where the caller meant it.
if [[ "${WORKDIR}" != /* && "${WORKDIR}" != *://* ]]; then
  WORKDIR="${PWD}/${WORKDIR}"
fi
run cd "${REPO_ROOT}"

if (( INSTALL )); then
  jax_pin="$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "${REPO_ROOT}/requirements.txt" | head -n1 || true)"
  run "${PYTHON_BIN}" -m pip install -r requirements.txt -e .
  run "${PYTHON_BIN}" -m pip install "jax[${CUDA}]${jax_pin:+==${jax_pin}}"
fi

if [[ -n "${MEM_FRACTION}" ]]; then set_env XLA_PYTHON_CLIENT_MEM_FRACTION "${MEM_FRACTION}"; fi
if [[ -n "${GPUS}" ]]; then set_env CUDA_VISIBLE_DEVICES "${GPUS}"; fi

# One process owns all local GPUs, so multi-host initialisation stays off.
run "${PYTHON_BIN}" -m biflow_jax.main \
  --config="${CONFIG}" --workdir="${WORKDIR}" --distributed=off \
  --config.parallel.backend="${BACKEND}" "${EXTRA_ARGS[@]}"
