# Shared environment of the tagi-ds Slurm scripts; sourced, never run. Sets REPO, PYTHON, the offline HF switches
# and the helpers tagi_port, tagi_print_env, tagi_run_requeueable.
#
# Slurm copies a batch script to its spool folder before running it, so the script's own path says nothing about
# the repository: REPO is $TAGI_REPO, else the submit folder ($SLURM_SUBMIT_DIR; submit from the repo root), else
# the folder above this file (plain `bash slurm/x.sbatch`, as in a dry run).

if [[ -n "${TAGI_REPO:-}" ]]; then
  REPO="$TAGI_REPO"
elif [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/slurm/common.sh" ]]; then
  REPO="$SLURM_SUBMIT_DIR"
else
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
cd "$REPO" || { echo "tagi-ds slurm: cannot cd to repo $REPO" >&2; exit 2; }

# The project's venv when there is one (`make setup`), else whatever python is on PATH (a cluster module/conda).
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON="python"; fi
fi
export PYTHON

# Compute nodes are often offline: every model, tokenizer and data set must already be on disk (pre-fetch them on
# a login node into HF_HOME). These make a missing file fail fast instead of hanging on a network timeout.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
# One OpenMP thread per CPU Slurm gave the task (torch otherwise starts one per core of the whole node).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# Slurm opens --output before the script runs and does not create folders: `mkdir -p logs` before sbatch.
[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$REPO/logs"

# Port from an array index or job id. MUST equal tagi_ds.train.launch.port_for (tests check both):
# 29500 + n % 3000 stays below Linux's ephemeral range (32768+), and two array elements placed on the same node
# get different ports unless their indices differ by a multiple of 3000.
tagi_port() { echo $(( 29500 + ${1:?tagi_port needs a number} % 3000 )); }

# The environment a run sees (the part that matters to it), one KEY=VALUE a line.
tagi_print_env() {
  local k
  for k in $(compgen -e | LC_ALL=C sort); do
    case "$k" in
      HF_*|TRANSFORMERS_*|TOKENIZERS_*|NCCL_*|TORCH_NCCL_*|MASTER_*|OMP_NUM_THREADS|CUDA_VISIBLE_DEVICES|TAGI_*|PYTHON|DS_*)
        echo "env: $k=${!k}" ;;
    esac
  done
}

# The Slurm reference of this job for `scontrol requeue`: <array job>_<index> for array elements.
tagi_job_ref() {
  if [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; else echo "${SLURM_JOB_ID:-}"; fi
}

# Run "$@" in the background and wait. With `#SBATCH --signal=B:USR1@<s>` Slurm sends USR1 to this batch shell
# <s> seconds before the time limit (or on pre-emption): we forward SIGTERM to the run, wait for it to stop, and
# requeue the job. Every stage checkpoints periodically and resumes from its latest checkpoint (`resume: auto`),
# and a teacher/cache unit skips work already published, so the requeued job continues where this one stopped.
tagi_run_requeueable() {
  TAGI_REQUEUE=0
  trap 'TAGI_REQUEUE=1; echo "[tagi-slurm] USR1: time limit or pre-emption near; stopping pid $TAGI_CHILD and requeueing" >&2; kill -TERM "$TAGI_CHILD" 2>/dev/null || true' USR1
  "$@" &
  TAGI_CHILD=$!
  local rc
  while :; do
    rc=0; wait "$TAGI_CHILD" || rc=$?
    # `wait` also returns (>128) when a trapped signal arrives: keep waiting while the child still runs.
    kill -0 "$TAGI_CHILD" 2>/dev/null || break
  done
  trap - USR1
  if [[ "$TAGI_REQUEUE" == 1 ]]; then
    local ref; ref="$(tagi_job_ref)"
    if [[ -n "$ref" ]] && command -v scontrol >/dev/null; then
      scontrol requeue "$ref" && echo "[tagi-slurm] requeued $ref" >&2
    fi
    return 0
  fi
  return "$rc"
}

# Body of both array scripts: `tagi_array_main <stage> CONFIG [key=value ...]` runs
# `tagi-ds <stage> --config CONFIG array_index=$SLURM_ARRAY_TASK_ID [key=value ...]` (as `$PYTHON -m tagi_ds.cli`,
# the same entry point). DRY_RUN=1 prints the unit the index maps to, the environment and the exact command, and
# runs nothing; an index outside the config's units fails there with the valid range.
tagi_array_main() {
  local stage="$1"; shift
  local config="${1:?usage: sbatch --array=0-N%C slurm/<script>.sbatch CONFIG [key=value ...]}"; shift
  local idx="${SLURM_ARRAY_TASK_ID:?not an array element: submit with sbatch --array=..., or set SLURM_ARRAY_TASK_ID for a dry run}"
  # Single-process units, but anything that initialises torch.distributed binds MASTER_PORT: derive it from the
  # index so array elements sharing a node never collide on the default 29500.
  export MASTER_ADDR=127.0.0.1
  MASTER_PORT="$(tagi_port "$idx")"; export MASTER_PORT
  local cmd=("$PYTHON" -m tagi_ds.cli "$stage" --config "$config" "array_index=$idx" "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local unit
    unit="$("$PYTHON" -m tagi_ds.run.units --config "$config" --index "$idx" "$@")" || return $?
    echo "unit: ${unit#*$'\t'} (array index $idx)"
    tagi_print_env
    local quoted; quoted="$(printf '%q ' "${cmd[@]}")"
    echo "command: ${quoted% }"
    return 0
  fi
  echo "[tagi-slurm] $(date -Is) $(hostname) job $(tagi_job_ref) stage=$stage index=$idx port=$MASTER_PORT" >&2
  tagi_run_requeueable "${cmd[@]}"
}
