#!/usr/bin/env bash
# Runs `python -m align_jax.main <args>` on every worker of a Cloud TPU slice (or on N local processes).
# ./launch_tpu.sh --help lists every option; README.md ("TPU pods") has a worked example.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=${0##*/}

usage() {
  cat <<EOF
Usage: $PROG [options] -- <arguments of python -m align_jax.main>

Runs the same align-jax command on every worker of a Cloud TPU slice, one process per TPU VM host
(ALIGN_JAX_DISTRIBUTED=auto: jax.distributed finds the slice's hosts), or with --local on N processes of
this machine. Everything after -- goes to \`python -m align_jax.main\` unchanged (e.g.
--config=configs/dpo.py --workdir=gs://bucket/run --config.mesh.fsdp=-1).

Pod steps: describe the slice (create it if missing, reuse it if READY); pack the code and scp it to
--worker=all; install (pip install -r requirements.txt, then the TPU jax build) into a venv on every
worker; run the command on every worker over \`gcloud compute tpus tpu-vm ssh --worker=all\`, each worker
logging to its own file; copy the logs back; exit non-zero if the run failed.

Slice:
  --name NAME              TPU (and queued-resource) name. Required, except with --local.
  --zone ZONE              e.g. us-east5-a. Required, except with --local.
  --project PROJECT        Google Cloud project (default: gcloud's configured project).
  --accelerator-type TYPE  e.g. v5p-64, v5litepod-256, v6e-64, v4-32. Required to create a slice.
  --version VERSION        TPU VM runtime (software) version. Default by generation: v5p -> v2-alpha-tpuv5,
                           v5litepod/v5e -> v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e,
                           v2/v3/v4 -> tpu-ubuntu2204-base.
  --spot                   Create Spot TPU VMs (cheaper; can be preempted at any time).
  --preemptible            Create preemptible TPU VMs (the older kind; not with --queued: use --spot).
  --queued                 Request the slice as a queued resource (gcloud compute tpus queued-resources create)
                           and wait until it is ACTIVE, instead of tpu-vm create. Pass it with --delete too.
  --delete                 Delete the slice (the queued resource with --queued) and exit.

Code and environment:
  --commit REV             Ship \`git archive REV\` (a commit, tag or branch). Default: the working tree as it is
                           (tracked and untracked files that .gitignore does not exclude, except tpu_logs/).
  --code-dir DIR           Where the code goes on every worker (default: align-jax, in the home directory;
                           replaced at each launch). The venv is DIR-venv, the worker logs DIR-logs/.
  --jax-tpu-spec SPEC      What pip installs after requirements.txt (default: jax[tpu]==<the jax version
                           pinned in requirements.txt>, now $(jax_tpu_default_spec)).
  --logs-dir DIR           Where the workers' logs are copied back to (default: tpu_logs/<name>).

Run:
  --workdir DIR            The run's --workdir (or pass --workdir=... after --). A gs://BUCKET/PATH is mounted
                           with gcsfuse on every worker (/tmp/align_jax_gcs/BUCKET) and the run is given that
                           path; so is every other gs:// path among the arguments (data, init_from). Every
                           worker needs the same workdir: use gs:// (or a shared filesystem) on a pod.
  --no-gcsfuse             Pass gs:// paths to the run unchanged instead.
  --max-restarts K         Preemption: when the run fails and the slice is PREEMPTED/TERMINATED (a queued
                           resource SUSPENDED/FAILED), delete and recreate it, ship, install and run the same
                           command again, at most K times (default 0). The run resumes from the last checkpoint
                           in its workdir (on SIGTERM align-jax also saves one at the end of the current step).
  --local N                Run N processes on this machine instead of a pod (a test of the multi-process path
                           without a TPU): coordinator 127.0.0.1 on a free port, CPU collectives through gloo,
                           --local-devices CPU devices each, logs in <workdir>/logs/process_<i>.log. If one
                           process fails the others are stopped and the exit status is non-zero.
  --local-devices D        CPU devices per local process (default 2).
  --python PY              The local interpreter for --local (default: python, i.e. your activated venv).

  --dry-run                Print every command (quoted, ready to copy-paste), run none.
  -h, --help               This help.

Examples:
  $PROG --name dpo-8b --zone us-east5-a --accelerator-type v5p-64 --spot --max-restarts 3 -- \\
      --config=configs/dpo.py --workdir=gs://my-bucket/dpo-8b --config.mesh.fsdp=-1
  $PROG --local 2 -- --config=configs/dpo.py:tiny --workdir=/tmp/dpo_2proc
  $PROG --name dpo-8b --zone us-east5-a --delete
EOF
}

die() { printf 'error: %s\n' "$*" >&2; exit 2; }
log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }

jax_tpu_default_spec() {
  local v
  v=$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$ROOT/requirements.txt" 2>/dev/null | head -n 1)
  [[ -n $v ]] || die "no 'jax==<version>' line in $ROOT/requirements.txt: pass --jax-tpu-spec"
  printf 'jax[tpu]==%s' "$v"
}

# Shell-quotes each argument (plain words stay as they are) so a printed command can be copy-pasted.
quote() {
  local out="" a plain='^[A-Za-z0-9_./:=@%+,-]+$'
  for a in "$@"; do
    if [[ ! $a =~ $plain ]]; then
      [[ $a == *"'"* ]] && a=$(printf '%s' "$a" | sed "s/'/'\\\\''/g")
      a="'$a'"
    fi
    out+="${out:+ }$a"
  done
  printf '%s' "$out"
}

DRY_RUN=0
exec 3>&1  # the script's stdout: dry-run output, even from inside $(...)
# Every command with an effect goes through here: printed (dry run: to stdout, else to stderr with "+ "), then run.
run() {
  if ((DRY_RUN)); then printf '%s\n' "$(quote "$@")" >&3; return 0; fi
  printf '+ %s\n' "$(quote "$@")" >&2
  "$@"
}
# A shell pipeline as one command (bash -c), printed the same way.
run_sh() { run bash -c "set -euo pipefail; $1"; }
# gcloud, always through here (one place: what --dry-run prints is exactly what runs).
gc() {
  if [[ -n $PROJECT ]]; then run gcloud "$@" --project "$PROJECT"; else run gcloud "$@"; fi
}
# A gcloud query: its stdout (stderr dropped); the dry run prints it and answers "" (status 1).
gc_query() {
  local cmd=(gcloud "$@")
  [[ -z $PROJECT ]] || cmd+=(--project "$PROJECT")
  if ((DRY_RUN)); then printf '%s\n' "$(quote "${cmd[@]}")" >&3; return 1; fi
  printf '+ %s\n' "$(quote "${cmd[@]}")" >&2
  "${cmd[@]}" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------------- options
NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" SPOT=0 PREEMPTIBLE=0 QUEUED=0 DELETE=0
COMMIT="" CODE_DIR="align-jax" JAX_TPU_SPEC="" LOGS_DIR="" WORKDIR="" GCSFUSE=1 MAX_RESTARTS=0
LOCAL="" LOCAL_DEVICES=2 PY=python
ARGS=()

need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see $PROG --help)"; }
while (($#)); do
  opt=$1
  if [[ $opt == --*=* && $opt != --=* ]]; then  # --opt=value -> --opt value
    set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
    opt=$1
    case $opt in
      --dry-run | --spot | --preemptible | --queued | --delete | --no-gcsfuse | --help) die "$opt takes no value" ;;
    esac
  fi
  case $opt in
    -h | --help) usage; exit 0 ;;
    --) shift; ARGS=("$@"); break ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --queued) QUEUED=1 ;;
    --delete) DELETE=1 ;;
    --no-gcsfuse) GCSFUSE=0 ;;
    --name | --zone | --project | --accelerator-type | --version | --commit | --code-dir | --jax-tpu-spec | \
      --logs-dir | --workdir | --max-restarts | --local | --local-devices | --python)
      need_value "$@"
      case $opt in
        --name) NAME=$2 ;; --zone) ZONE=$2 ;; --project) PROJECT=$2 ;; --accelerator-type) ACCEL=$2 ;;
        --version) VERSION=$2 ;; --commit) COMMIT=$2 ;; --code-dir) CODE_DIR=$2 ;; --jax-tpu-spec) JAX_TPU_SPEC=$2 ;;
        --logs-dir) LOGS_DIR=$2 ;; --workdir) WORKDIR=$2 ;; --max-restarts) MAX_RESTARTS=$2 ;; --local) LOCAL=$2 ;;
        --local-devices) LOCAL_DEVICES=$2 ;; --python) PY=$2 ;;
      esac
      shift ;;
    *) die "unknown option $opt (the run's own flags go after --; see $PROG --help)" ;;
  esac
  shift
done

is_count() { [[ $1 =~ ^[0-9]+$ ]] && (($1 >= $2)); }
[[ -z $LOCAL ]] || is_count "$LOCAL" 1 || die "--local $LOCAL: expected a number of processes >= 1"
is_count "$LOCAL_DEVICES" 1 || die "--local-devices $LOCAL_DEVICES: expected a number of CPU devices >= 1"
is_count "$MAX_RESTARTS" 0 || die "--max-restarts $MAX_RESTARTS: expected a number >= 0"

# The run's workdir: --workdir, or --workdir=... / --workdir ... among the run's arguments (taken out; added back last).
RUN_ARGS=()
i=0
while ((i < ${#ARGS[@]})); do
  a=${ARGS[i]} w=""
  case $a in
    --workdir=*) w=${a#--workdir=} ;;
    --workdir) ((i + 1 < ${#ARGS[@]})) || die "--workdir after -- needs a value"; i=$((i + 1)); w=${ARGS[i]} ;;
    *) RUN_ARGS+=("$a") ;;
  esac
  if [[ -n $w ]]; then
    [[ -z $WORKDIR || $WORKDIR == "$w" ]] || die "two workdirs: --workdir $WORKDIR and --workdir=$w after --"
    WORKDIR=$w
  fi
  i=$((i + 1))
done

if ((!DELETE)); then
  [[ -n $WORKDIR ]] || die "no workdir: pass --workdir DIR (or --workdir=DIR after --)"
  has_config=0
  for a in ${RUN_ARGS[@]+"${RUN_ARGS[@]}"}; do [[ $a == --config=* || $a == --config ]] && has_config=1; done
  ((has_config)) || die "no --config=... after -- (e.g. -- --config=configs/dpo.py; see README.md)"
fi

# ------------------------------------------------------------------------------------------- local processes
run_local() {
  [[ $WORKDIR != gs://* ]] || die "--local runs on this machine: --workdir must be a local path, not $WORKDIR"
  local n=$LOCAL logs="$WORKDIR/logs" port i pid rc first_rc=0 failed="" alive line
  local pids=()
  if ((DRY_RUN)); then port='<free-port>'; else
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
      die "--python $PY: cannot run it (activate the venv, or pass --python path/to/python)"
  fi
  run mkdir -p "$logs"
  stop_all() {  # the processes this script started, by pid: SIGTERM, then SIGKILL after 10 s
    local p _
    for p in ${pids[@]+"${pids[@]}"}; do [[ -z $p ]] || kill -TERM "$p" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      alive=0
      for p in ${pids[@]+"${pids[@]}"}; do [[ -n $p ]] && kill -0 "$p" 2>/dev/null && alive=1; done
      ((alive)) || return 0
      sleep 1
    done
    for p in ${pids[@]+"${pids[@]}"}; do [[ -z $p ]] || kill -KILL "$p" 2>/dev/null || true; done
  }
  trap 'log "interrupted: stopping the local processes"; stop_all; exit 130' INT TERM
  for ((i = 0; i < n; i++)); do
    local cmd=(env "ALIGN_JAX_COORDINATOR=127.0.0.1:$port" "ALIGN_JAX_NUM_PROCESSES=$n" "ALIGN_JAX_PROCESS_ID=$i"
      "ALIGN_JAX_LOCAL_DEVICES=$LOCAL_DEVICES" JAX_PLATFORMS=cpu "$PY" -m align_jax.main
      ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} "--workdir=$WORKDIR")
    line="$(quote "${cmd[@]}") > $(quote "$logs/process_$i.log") 2>&1 &"
    if ((DRY_RUN)); then printf '%s\n' "$line"; continue; fi
    printf '+ %s\n' "$line" >&2
    "${cmd[@]}" >"$logs/process_$i.log" 2>&1 &
    pids+=($!)
  done
  ((DRY_RUN)) && return 0
  log "$n processes x $LOCAL_DEVICES CPU devices, coordinator 127.0.0.1:$port; logs: $logs/process_<i>.log"
  # Wait for all; the first failure stops the others.
  while :; do
    alive=0
    for i in "${!pids[@]}"; do
      pid=${pids[i]}
      [[ -n $pid ]] || continue
      if kill -0 "$pid" 2>/dev/null; then alive=1; continue; fi
      rc=0; wait "$pid" || rc=$?
      pids[i]=""
      if ((rc != 0 && first_rc == 0)); then
        first_rc=$rc failed=$i
        log "process $i exited with status $rc: stopping the others"
        stop_all
      fi
    done
    ((alive)) || break
    sleep 0.5
  done
  trap - INT TERM
  if ((first_rc != 0)); then
    log "process $failed failed (status $first_rc); last lines of $logs/process_$failed.log:"
    tail -n 20 "$logs/process_$failed.log" >&2 || true
    exit "$first_rc"
  fi
  log "all $n processes finished; logs: $logs/"
}

if [[ -n $LOCAL ]]; then run_local; exit 0; fi

# ------------------------------------------------------------------------------------------------- TPU slice
[[ -n $NAME ]] || die "--name is required (or --local N to run on this machine)"
[[ -n $ZONE ]] || die "--zone is required"
((!(SPOT && PREEMPTIBLE))) || die "--spot and --preemptible exclude each other"
((!(QUEUED && PREEMPTIBLE))) || die "--queued takes --spot, not --preemptible"
[[ $CODE_DIR =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ || $CODE_DIR =~ ^/[A-Za-z0-9_][A-Za-z0-9_./-]*$ ]] &&
  [[ $CODE_DIR != *..* && $CODE_DIR =~ [A-Za-z] ]] ||
  die "--code-dir $CODE_DIR: expected a directory path (letters, digits, _ . / -), replaced at each launch"
CODE_DIR=${CODE_DIR%/}
LOGS_DIR=${LOGS_DIR:-tpu_logs/$NAME}
if ((!DELETE)); then
  [[ -n $ACCEL ]] || die "--accelerator-type is required (e.g. v5p-64, v5litepod-256, v6e-64)"
  [[ $ACCEL =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
    die "--accelerator-type $ACCEL: expected e.g. v5p-64, v5litepod-256, v6e-64"
  if [[ -z $VERSION ]]; then
    case $ACCEL in
      v5p-*) VERSION=v2-alpha-tpuv5 ;;
      v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;;
      v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
      *) die "no default --version for $ACCEL: pass --version (the TPU VM runtime version)" ;;
    esac
  fi
  JAX_TPU_SPEC=${JAX_TPU_SPEC:-$(jax_tpu_default_spec)}
  if [[ -n $COMMIT ]]; then
    git -C "$ROOT" rev-parse --verify --quiet "$COMMIT^{commit}" >/dev/null ||
      die "--commit $COMMIT: not a commit of $ROOT"
  fi
  [[ $WORKDIR == gs://* || $WORKDIR == /* ]] ||
    log "warning: --workdir $WORKDIR is relative to each worker's code directory and not shared between workers"
fi

# Remote paths: relative ones are under the worker's home directory.
# shellcheck disable=SC2016  # "$HOME" is the worker's
remote_path() { if [[ $1 == /* ]]; then quote "$1"; else printf '"$HOME"/%s' "$(quote "$1")"; fi; }
R_CODE=$(remote_path "$CODE_DIR")
R_VENV=$(remote_path "$CODE_DIR-venv")
R_LOGS=$(remote_path "$CODE_DIR-logs")
R_LOGS_REL="$CODE_DIR-logs"
GCS_ROOT=/tmp/align_jax_gcs

# The run's arguments on the workers: each gs://BUCKET/... becomes the worker's gcsfuse mount of BUCKET.
BUCKETS=()
FINAL_ARGS=()
gs_re='^(.*)gs://([a-z0-9][a-z0-9._-]*)(.*)$'
for a in ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} "--workdir=$WORKDIR"; do
  tail_=""
  while ((GCSFUSE)) && [[ $a =~ $gs_re ]]; do  # right to left: "a=gs://x/1,gs://y/2"
    b=${BASH_REMATCH[2]} tail_="$GCS_ROOT/${BASH_REMATCH[2]}${BASH_REMATCH[3]}$tail_" a=${BASH_REMATCH[1]}
    [[ " ${BUCKETS[*]-} " == *" $b "* ]] || BUCKETS+=("$b")
  done
  FINAL_ARGS+=("$a$tail_")
done

slice_kind() { if ((QUEUED)); then printf 'queued-resources'; else printf 'tpu-vm'; fi; }

# "STATE TYPE" of the slice ("" when it does not exist). A queued resource that is ACTIVE reports its node's state.
slice_state() {
  local node qr
  if ((QUEUED)); then
    qr=$(gc_query compute tpus queued-resources describe "$NAME" --zone "$ZONE" --format='value(state.state)') ||
      return 0
    [[ -n $qr ]] || return 0
    if [[ $qr != ACTIVE ]]; then printf '%s' "$qr"; return 0; fi
  fi
  node=$(gc_query compute tpus tpu-vm describe "$NAME" --zone "$ZONE" --format='value(state,acceleratorType)') ||
    return 0
  printf '%s' "$node" | tr '\t' ' '
}

create_slice() {
  local spot=()
  ((SPOT)) && spot=(--spot)
  ((PREEMPTIBLE)) && spot=(--preemptible)
  if ((QUEUED)); then
    gc compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" \
      --runtime-version "$VERSION" ${spot[@]+"${spot[@]}"}
  else
    gc compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$VERSION" \
      ${spot[@]+"${spot[@]}"}
  fi
}

delete_slice() {
  if ((QUEUED)); then
    gc compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
  else
    gc compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet
  fi
}

is_gone() { [[ $1 == PREEMPTED* || $1 == TERMINATED* || $1 == SUSPENDED* || $1 == FAILED* ]]; }

# Creates the slice if missing (or preempted), reuses it when READY; waits until it is READY.
ensure_slice() {
  local state last="" type
  state=$(slice_state)
  if is_gone "$state"; then
    log "$NAME is ${state%% *}: deleting and recreating it"
    delete_slice
    state=""
  fi
  if [[ -z $state ]]; then
    create_slice
    ((DRY_RUN)) && return 0
  fi
  while :; do
    state=$(slice_state)
    case ${state%% *} in
      READY)
        type=${state#* }
        [[ $type == "$ACCEL" || $type == READY ]] ||
          die "$NAME exists as a $type slice, not $ACCEL: delete it first" \
            "($PROG --name $NAME --zone $ZONE --delete) or choose another --name"
        log "$NAME is READY ($ACCEL)"
        return 0 ;;
      "") die "$NAME does not exist after create (gcloud compute tpus $(slice_kind) describe $NAME --zone $ZONE)" ;;
    esac
    is_gone "$state" && die "$NAME is ${state%% *} before the run started"
    [[ $state == "$last" ]] || log "$NAME is ${state%% *}; waiting"
    last=$state
    sleep "${LAUNCH_TPU_POLL_S:-30}"
  done
}

ship_code() {
  local tgz="$TMP/align_jax_code.tgz" remote_tgz=/tmp/align_jax_code.tgz
  if [[ -n $COMMIT ]]; then
    run git -C "$ROOT" archive --format=tar.gz -o "$tgz" "$COMMIT"
  else
    # tracked and untracked files that .gitignore keeps (not tpu_logs/), but no deleted tracked file
    local pack
    pack="cd $(quote "$ROOT") && git ls-files -z -co --exclude-standard --exclude=/tpu_logs/ | "
    pack+="while IFS= read -r -d '' f; do [ -e \"\$f\" ] && printf '%s\\0' \"\$f\"; done | "
    run_sh "${pack}tar --null -T - -czf $(quote "$tgz")"
  fi
  gc compute tpus tpu-vm scp "$tgz" "$NAME:$remote_tgz" --zone "$ZONE" --worker=all
  gc compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command \
    "set -e; rm -rf $R_CODE; mkdir -p $R_CODE; tar -xzf $remote_tgz -C $R_CODE; rm -f $remote_tgz"
}

install_env() {
  local script="set -e; command -v python3.11 >/dev/null || { sudo apt-get update -qq && "
  script+="sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; }; "
  script+="[ -x $R_VENV/bin/python ] || python3.11 -m venv $R_VENV; "
  script+="$R_VENV/bin/pip install -q -r $R_CODE/requirements.txt; "
  script+="$R_VENV/bin/pip install -q $(quote "$JAX_TPU_SPEC"); "
  script+="$R_VENV/bin/pip install -q --no-deps -e $R_CODE"
  if ((${#BUCKETS[@]})); then  # gcsfuse from Google's apt repository (cloud.google.com/storage/docs/gcsfuse-install)
    script+="; command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
    script+="https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" "
    script+="| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL "
    script+="https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc "
    script+=">/dev/null && sudo apt-get update -qq && "
    script+="sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse; }"
  fi
  gc compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$script"
}

run_workers() {
  local script="set -o pipefail; mkdir -p $R_LOGS; " b mnt
  for b in ${BUCKETS[@]+"${BUCKETS[@]}"}; do
    mnt=$(quote "$GCS_ROOT/$b")
    script+="mkdir -p $mnt && { mountpoint -q $mnt || "
    script+="gcsfuse --implicit-dirs --rename-dir-limit=200000 $(quote "$b") $mnt; } && "
  done
  script+="cd $R_CODE && ALIGN_JAX_DISTRIBUTED=auto $R_VENV/bin/python -m align_jax.main $(quote "${FINAL_ARGS[@]}")"
  script+=" 2>&1 | tee $R_LOGS/\"\$(hostname)\".log"
  # keepalives: a worker that vanishes (preemption) ends the session within minutes instead of hanging it
  gc compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$script" \
    --ssh-flag=-oServerAliveInterval=60 --ssh-flag=-oServerAliveCountMax=5
}

pull_logs() {
  run mkdir -p "$LOGS_DIR"
  gc compute tpus tpu-vm scp "$NAME:$R_LOGS_REL/*" "$LOGS_DIR/" --zone "$ZONE" --worker=all
}

if ((DELETE)); then delete_slice; exit 0; fi

if ((DRY_RUN)); then TMP="${TMPDIR:-/tmp}/launch_tpu.$$"; else
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/launch_tpu.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
fi

restarts=0
while :; do
  ensure_slice
  ship_code
  install_env
  rc=0
  run_workers || rc=$?
  pull_logs || log "warning: could not copy the workers' logs back"
  if ((rc == 0)); then
    ((DRY_RUN)) || log "the run finished on every worker; logs: $LOGS_DIR/"
    exit 0
  fi
  state=$(slice_state)
  if is_gone "$state" && ((restarts < MAX_RESTARTS)); then
    restarts=$((restarts + 1))
    log "the run failed (status $rc) and $NAME is ${state%% *}: recreating it and resuming" \
      "(restart $restarts of $MAX_RESTARTS)"
    continue
  fi
  if is_gone "$state"; then
    log "the run failed (status $rc): $NAME is ${state%% *} and --max-restarts $MAX_RESTARTS is used up"
  else
    log "the run failed (status $rc); logs: $LOGS_DIR/"
  fi
  exit "$rc"
done
