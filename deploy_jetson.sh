#!/usr/bin/env bash
# Deploy FLQ to Jetson boards (or any Linux host with systemd) over SSH, as systemd services.
#
#   ./deploy_jetson.sh [-i INVENTORY] [--only HOST]... [--jobs N] [--dry-run] [--wheel FILE]
#   ./deploy_jetson.sh [-i INVENTORY] [--only HOST]... --status
#   ./deploy_jetson.sh [-i INVENTORY] [--only HOST]... --uninstall
#
# The inventory (default: inventory.toml; every key is documented in inventory.example.toml) says
# which host runs the master and which run workers, and how to reach them. Per host, a deploy:
#   1. builds a wheel of this tree (once for all hosts, reproducibly; or takes --wheel FILE),
#   2. stages the wheel, configs, /etc/flq env files and the units of systemd/ rendered for the
#      install prefix, with a manifest of their checksums,
#   3. rsyncs the stage over ssh to PREFIX/opt/flq/incoming,
#   4. on the host: a venv with --system-site-packages (NVIDIA's TensorFlow stays visible), pip
#      install, env files to PREFIX/etc/flq, units to PREFIX/etc/systemd/system, daemon-reload,
#      enable --now (restart what changed on later runs).
# A host whose manifest equals the installed one is left alone and reported "unchanged". A host
# that cannot be reached is reported and the others go on; a summary table ends every run and the
# exit status is 1 when any host failed (2 for a bad command line or inventory). Hosts are handled
# --jobs at a time (default 4); every output line starts with its host's name.
#
# Environment: PYTHON = the local Python that reads the inventory and builds the wheel
# (default: .venv/bin/python beside this script, else python3; Python >= 3.11, or tomli).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INVENTORY=inventory.toml
MODE=deploy
DRY_RUN=0
WHEEL_FILE=""
LOG_LINES=10
JOBS=4
ONLY=()

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  echo "See the header of $0 and inventory.example.toml for details."
}

die() {
  echo "deploy_jetson.sh: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    -i | --inventory) INVENTORY=${2:?--inventory needs a file}; shift ;;
    --only) ONLY+=("${2:?--only needs a host}"); shift ;;
    --dry-run) DRY_RUN=1 ;;
    --status) MODE=status ;;
    --uninstall) MODE=uninstall ;;
    --wheel) WHEEL_FILE=${2:?--wheel needs a file}; shift ;;
    --jobs) JOBS=${2:?--jobs needs a number}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

[ -f "$INVENTORY" ] || die "no inventory at $INVENTORY (copy inventory.example.toml)"
case "$JOBS" in '' | *[!0-9]* | 0) die "--jobs: expected a positive number, got $JOBS" ;; esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON=$HERE/.venv/bin/python; else PYTHON=python3; fi
fi
if [ -n "$WHEEL_FILE" ]; then
  [ -f "$WHEEL_FILE" ] || die "no wheel at $WHEEL_FILE"
  WHEEL_FILE=$(cd "$(dirname "$WHEEL_FILE")" && pwd)/$(basename "$WHEEL_FILE")
fi

# ---------------------------------------------------------------- the inventory

# Prints bash assignments (shell-quoted) for the targets: one per host, master first.
read_inventory() {
  # As a module from this checkout (flq/inventory.py, standard library only): no install needed.
  PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m flq.inventory "$1"
}

# Filled from the inventory: T_* per target host, W_* per worker, M_* for the master.
T_HOST=() T_SSH_USER=() T_SSH_PORT=() T_SSH_KEY=() T_KNOWN_HOSTS=() T_PREFIX=() T_PYTHON=()
T_PIP_ARGS=() T_SUDO=() T_MASTER=() T_WORKERS=() T_EXTRAS=() W_IDS=() W_CONFIG=() W_ARGS=()
W_ENV_FILE=() M_CONFIG="" M_ENV_FILE="" M_ARGS="" M_ADDRESS=""
plan=$(read_inventory "$INVENTORY") || exit 2
eval "$plan"

# ---------------------------------------------------------------- local helpers

WORK=$(mktemp -d "${TMPDIR:-/tmp}/flq-deploy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Print a command as it would be typed; run it unless --dry-run.
run() {
  printf '+ %s\n' "$(quoted "$@")"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

quoted() {
  local out="" word
  for word in "$@"; do out+="$(printf '%q' "$word") "; done
  printf '%s' "${out% }"
}

sha256() {
  if command -v sha256sum >/dev/null; then sha256sum "$@"; else shasum -a 256 "$@"; fi
}

build_wheel() {
  local src=$WORK/src isolation=()
  mkdir -p "$src" "$WORK/dist"
  # A clean copy: no stale build/ directory, no caches. SOURCE_DATE_EPOCH makes the wheel
  # byte-for-byte reproducible, so an unchanged tree gives an unchanged checksum.
  local item
  for item in pyproject.toml README.md LICENSE MANIFEST.in setup.cfg setup.py; do
    if [ -e "$HERE/$item" ]; then cp "$HERE/$item" "$src/"; fi
  done
  rsync -a --exclude '__pycache__' --exclude '*.pyc' "$HERE/flq" "$src/"
  # setuptools >= 77 already here: build offline, without an isolated build environment.
  if "$PYTHON" -c 'import importlib.metadata as m, sys
sys.exit(int(m.version("setuptools").split(".")[0]) < 77)' 2>/dev/null; then
    isolation=(--no-build-isolation)
  fi
  export SOURCE_DATE_EPOCH=315532800
  run "$PYTHON" -m pip wheel --quiet --no-deps ${isolation[@]+"${isolation[@]}"} \
    -w "$WORK/dist" "$src"
}

# ---------------------------------------------------------------- on the target
# These functions run on the board: `declare -f` sends them over ssh to `bash -s`.

step() {
  echo "+ $*"
  "$@"
}

# The checksum a manifest records for one staged file ("" when absent).
entry() {
  [ -f "$1" ] || return 0
  awk -v p="$2" '$2 == p { print $1 }' "$1"
}

differs() {
  [ "$(entry "$1" "$3")" != "$(entry "$2" "$3")" ]
}

target_install() {
  local inc=$APP/incoming old=$APP/installed.manifest
  cd "$inc"
  if [ -f "$old" ] && cmp -s "$old" MANIFEST && [ -x "$APP/venv/bin/flq-worker" ]; then
    echo "RESULT unchanged"
    return 0
  fi
  local fresh=1 venv_new=0 wheel_new=0 units_new=0 svc unit file
  if [ -f "$old" ]; then
    fresh=0
    echo "changed since the last deploy: $(sort "$old" MANIFEST | uniq -u | awk '{ print $2 }' \
      | sort -u | tr '\n' ' ')"
  fi

  if [ ! -x "$APP/venv/bin/python" ] || [ "$(cat "$APP/venv/.flq-python" 2>/dev/null)" != "$PY" ]; then
    step rm -rf "$APP/venv"
    step "$PY" -m venv --system-site-packages "$APP/venv"
    printf '%s\n' "$PY" >"$APP/venv/.flq-python"
    venv_new=1
  fi
  if [ "$venv_new" = 1 ] || differs "$old" MANIFEST "$WHEEL" || differs "$old" MANIFEST settings; then
    # The new flq itself (same version, new content), then whatever it needs that is missing;
    # pip_args "--no-deps" skips the second step (offline boards with everything installed).
    local pip_args=() arg
    for arg in $PIP_ARGS; do [ "$arg" = --no-deps ] || pip_args+=("$arg"); done
    step "$APP/venv/bin/pip" install --disable-pip-version-check --quiet \
      ${pip_args[@]+"${pip_args[@]}"} --no-deps --force-reinstall "$inc/$WHEEL"
    case " $PIP_ARGS " in
      *" --no-deps "*) ;;
      *) step "$APP/venv/bin/pip" install --disable-pip-version-check --quiet \
        ${pip_args[@]+"${pip_args[@]}"} "$inc/$WHEEL${EXTRAS:+[$EXTRAS]}" ;;
    esac
    wheel_new=1
  fi

  step mkdir -p "$ETC" "$UNITDIR"
  for file in etc/*; do
    case "$file" in
      *.env) step install -m 0600 "$file" "$ETC/" ;;  # read by systemd (root) only
      *) step install -m 0644 "$file" "$ETC/" ;;  # read by the service's own user
    esac
  done
  for file in units/*; do
    if differs "$old" MANIFEST "$file" || [ ! -f "$UNITDIR/${file#units/}" ]; then
      step install -m 0644 "$file" "$UNITDIR/"
      units_new=1
    fi
  done

  # Roles the inventory no longer gives this host: stop them, remove their files and units.
  if [ -f "$old" ]; then
    while IFS= read -r file; do
      [ ! -f "$file" ] || continue
      case "$file" in
        etc/master.env) step systemctl disable --now flq-master.service || true ;;
        etc/worker-*.env)
          unit=${file#etc/worker-}
          step systemctl disable --now "flq-worker@${unit%.env}.service" || true ;;
      esac
      case "$file" in
        etc/*) step rm -f "$ETC/${file#etc/}" ;;
        units/*) step rm -f "$UNITDIR/${file#units/}"; units_new=1 ;;
      esac
    done < <(awk '$2 ~ /^(etc|units)\// { print $2 }' "$old")
  fi

  if [ "$units_new" = 1 ]; then step systemctl daemon-reload; fi
  for svc in $SERVICES; do
    local name=${svc%.service} block=() unit_file=flq-master.service
    case "$name" in
      flq-master) name=master ;;
      *) name="worker-${name#flq-worker@}"; block=(--no-block); unit_file="flq-worker@.service" ;;
    esac
    # Workers report READY only once connected: never wait for them here.
    if [ "$fresh" = 1 ] || [ -z "$(entry "$old" "etc/$name.env")" ]; then
      step systemctl enable --now ${block[@]+"${block[@]}"} "$svc"
    elif [ "$wheel_new" = 1 ] || differs "$old" MANIFEST "etc/$name.env" \
      || differs "$old" MANIFEST "etc/$name.toml" || differs "$old" MANIFEST "units/$unit_file"; then
      step systemctl restart ${block[@]+"${block[@]}"} "$svc"
    fi
  done
  cp MANIFEST "$old"
  if [ "$fresh" = 1 ]; then echo "RESULT installed"; else echo "RESULT updated"; fi
}

target_status() {
  local svc state text inactive=0
  for svc in $SERVICES; do
    state=$(systemctl is-active "$svc" 2>/dev/null) || true
    text=$(systemctl show -p StatusText --value "$svc" 2>/dev/null) || true
    echo "$svc: ${state:-unknown}${text:+ ($text)}"
    journalctl -u "$svc" -n "$LOG_LINES" --no-pager -o cat 2>/dev/null | sed 's/^/    /' || true
    [ "$state" = active ] || inactive=$((inactive + 1))
  done
  if [ "$inactive" = 0 ]; then echo "RESULT active"; else echo "RESULT $inactive not active"; fi
}

target_uninstall() {
  local svc file
  for file in "$ETC"/master.env "$ETC"/worker-*.env; do
    [ -f "$file" ] || continue
    case "$file" in
      */master.env) svc=flq-master.service ;;
      *) svc=${file##*/worker-}; svc="flq-worker@${svc%.env}.service" ;;
    esac
    step systemctl disable --now "$svc" || true
  done
  step rm -f "$UNITDIR/flq-master.service" "$UNITDIR/flq-worker@.service"
  step systemctl daemon-reload
  step rm -rf "$APP"
  step rm -f "$ETC"/master.env "$ETC"/master.toml "$ETC"/worker-*.env "$ETC"/worker-*.toml
  rmdir "$ETC" 2>/dev/null || true
  echo "results and checkpoints under the state directory (/var/lib/flq) are kept"
  echo "RESULT uninstalled"
}

# ---------------------------------------------------------------- per target (local side)

set_target() {
  local i=$1 root
  NAME=${T_HOST[i]}
  root=${T_PREFIX[i]%/}
  APP=$root/opt/flq
  ETC=$root/etc/flq
  UNITDIR=$root/etc/systemd/system
  PY=${T_PYTHON[i]}
  PIP_ARGS=${T_PIP_ARGS[i]}
  EXTRAS=${T_EXTRAS[i]}
  SERVICES=""
  if [ "${T_MASTER[i]}" = 1 ]; then SERVICES="flq-master.service"; fi
  local id
  for id in ${T_WORKERS[i]}; do SERVICES="$SERVICES flq-worker@$id.service"; done
  SERVICES=${SERVICES# }
  SUDO=()
  if [ "${T_SUDO[i]}" = 1 ]; then SUDO=(sudo -n); fi
  SSH=(ssh -p "${T_SSH_PORT[i]}" -o BatchMode=yes -o ConnectTimeout=10
    -o StrictHostKeyChecking=accept-new)
  if [ -n "${T_SSH_KEY[i]}" ]; then SSH+=(-i "${T_SSH_KEY[i]}" -o IdentitiesOnly=yes); fi
  if [ -n "${T_KNOWN_HOSTS[i]}" ]; then SSH+=(-o "UserKnownHostsFile=${T_KNOWN_HOSTS[i]}"); fi
  DEST=$NAME
  if [ -n "${T_SSH_USER[i]}" ]; then DEST="${T_SSH_USER[i]}@$NAME"; fi
  SSH+=("$DEST")
}

roles() {
  local i=$1 out=""
  if [ "${T_MASTER[i]}" = 1 ]; then out="master"; fi
  local id
  for id in ${T_WORKERS[i]}; do out="${out:+$out, }$id"; done
  printf '%s' "$out"
}

stage_target() {
  local i=$1 stage=$2 n id
  mkdir -p "$stage/etc" "$stage/units"
  cp "$WHEEL_PATH" "$stage/"
  local header="# Written by deploy_jetson.sh from the inventory: edit that and deploy again."
  if [ "${T_MASTER[i]}" = 1 ]; then
    cp "$M_CONFIG" "$stage/etc/master.toml"
    printf '%s\nFLQ_MASTER_ARGS="--config %s %s"\n' "$header" "$ETC/master.toml" "$M_ARGS" \
      >"$stage/etc/master.env"
    if [ -n "$M_ENV_FILE" ]; then cat "$M_ENV_FILE" >>"$stage/etc/master.env"; fi
    render_unit flq-master.service "$stage/units"
  fi
  for n in "${!W_IDS[@]}"; do
    id=${W_IDS[n]}
    case " ${T_WORKERS[i]} " in *" $id "*) ;; *) continue ;; esac
    cp "${W_CONFIG[n]}" "$stage/etc/worker-$id.toml"
    printf '%s\nFLQ_WORKER_ARGS="--master %s --config %s%s"\n' "$header" "$M_ADDRESS" \
      "$ETC/worker-$id.toml" "${W_ARGS[n]:+ ${W_ARGS[n]}}" >"$stage/etc/worker-$id.env"
    if [ -n "${W_ENV_FILE[n]}" ]; then cat "${W_ENV_FILE[n]}" >>"$stage/etc/worker-$id.env"; fi
    render_unit "flq-worker@.service" "$stage/units"
  done
  printf 'python=%s\npip_args=%s\nextras=%s\n' "$PY" "$PIP_ARGS" "$EXTRAS" >"$stage/settings"
  (cd "$stage" && find . -type f | sed 's#^\./##' | LC_ALL=C sort \
    | while IFS= read -r file; do sha256 "$file"; done) >"$stage.MANIFEST"
  mv "$stage.MANIFEST" "$stage/MANIFEST"
}

# The units of systemd/ with the paths of this host's install prefix.
render_unit() {
  sed -e "s#/opt/flq/#$APP/#g" -e "s#/etc/flq/#$ETC/#g" "$HERE/systemd/$1" >"$2/$1"
}

# Run one of the target_* functions on the host, as root (sudo -n unless we log in as root).
on_target() {
  local fn=$1
  {
    echo "set -euo pipefail"
    declare -p APP ETC UNITDIR PY PIP_ARGS EXTRAS SERVICES WHEEL LOG_LINES
    declare -f step entry differs target_install target_status target_uninstall
    echo "$fn"
  } | "${SSH[@]}" "$(quoted ${SUDO[@]+"${SUDO[@]}"} bash -s)"
}

# Runs `on_target FN`, shows its output and sets RESULT from its last "RESULT ..." line.
remote_step() {
  local fn=$1 rc line
  local out=$WORK/$NAME.$fn.log
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ %s <<< %s (APP=%s ETC=%s SERVICES="%s")\n' \
      "$(quoted "${SSH[@]}" ${SUDO[@]+"${SUDO[@]}"} bash -s)" "$fn" "$APP" "$ETC" "$SERVICES"
    RESULT="dry run"
    return 0
  fi
  set +e
  on_target "$fn" 2>&1 | tee "$out" | while IFS= read -r line; do
    case "$line" in RESULT*) ;; *) printf '%s\n' "$line" ;; esac
  done
  rc=${PIPESTATUS[0]}
  set -e
  RESULT=$(sed -n 's/^RESULT //p' "$out" | tail -n 1)
  if [ "$rc" != 0 ]; then RESULT="failed (exit $rc on the host)"; fi
  return "$rc"
}

# Run one command on the host (as root); ssh's own failure (255) means the host is unreachable.
on_host() {
  local rc=0
  run "${SSH[@]}" "$(quoted ${SUDO[@]+"${SUDO[@]}"} "$@")" || rc=$?
  if [ "$rc" = 255 ]; then
    RESULT=unreachable
  elif [ "$rc" != 0 ]; then
    RESULT="failed ($1: exit $rc)"
  fi
  return "$rc"
}

deploy_target() {
  local i=$1 stage=$WORK/stage/$NAME rsync_path=()
  if [ "$DRY_RUN" = 0 ]; then stage_target "$i" "$stage"; else echo "+ (stage $stage for $SERVICES)"; fi
  # 0700: the staged env files may hold tokens (env_file).
  on_host install -d -m 0700 "$APP/incoming" || return 1
  if [ "${#SUDO[@]}" -gt 0 ]; then rsync_path=(--rsync-path "sudo -n rsync"); fi
  local rsh
  rsh=$(rsync_rsh)
  run rsync -rlt --checksum --delete ${rsync_path[@]+"${rsync_path[@]}"} -e "$rsh" "$stage/" \
    "$DEST:$APP/incoming/" || { RESULT="failed (rsync)"; return 1; }
  remote_step target_install
}

# rsync's -e takes one string; it splits on spaces and honours single quotes.
rsync_rsh() {
  local out="" word
  for word in "${SSH[@]}"; do
    [ "$word" = "$DEST" ] && continue
    case "$word" in *[[:space:]]*) out+="'$word' " ;; *) out+="$word " ;; esac
  done
  printf '%s' "${out% }"
}

# ---------------------------------------------------------------- main

if [ "${#ONLY[@]}" -gt 0 ]; then
  for host in "${ONLY[@]}"; do
    found=0
    for i in "${!T_HOST[@]}"; do [ "${T_HOST[i]}" = "$host" ] && found=1; done
    [ "$found" = 1 ] || die "--only $host: not in $INVENTORY (hosts: ${T_HOST[*]})"
  done
fi

WHEEL=""
WHEEL_PATH=""
if [ "$MODE" = deploy ]; then
  if [ -n "$WHEEL_FILE" ]; then
    WHEEL_PATH=$WHEEL_FILE
  else
    echo "== building the wheel"
    build_wheel
    if [ "$DRY_RUN" = 1 ]; then
      WHEEL_PATH=$WORK/dist/flq-VERSION-py3-none-any.whl
    else
      WHEEL_PATH=$(find "$WORK/dist" -name 'flq-*.whl' | head -n 1)
      [ -n "$WHEEL_PATH" ] || die "the wheel build produced no flq-*.whl"
    fi
  fi
  WHEEL=$(basename "$WHEEL_PATH")
fi

# One host, start to end; its result goes to a file (hosts may run in parallel).
one_host() {
  local i=$1
  set_target "$i"
  echo "== $(roles "$i"): $MODE"
  RESULT=""
  case "$MODE" in
    deploy) deploy_target "$i" || true ;;
    status) { on_host true && remote_step target_status; } || true ;;
    uninstall) { on_host true && remote_step target_uninstall; } || true ;;
  esac
  printf '%s\n' "${RESULT:-failed}" >"$WORK/result.$i"
}

# Every output line of a host starts with its name, so parallel hosts stay readable.
prefixed() {
  local line
  while IFS= read -r line; do printf '[%s] %s\n' "$1" "$line"; done
}

# Hosts in parallel (--jobs, default 4), where bash can wait for any one job (bash >= 4.3).
if [ "${BASH_VERSINFO[0]}" -lt 4 ] || { [ "${BASH_VERSINFO[0]}" = 4 ] && [ "${BASH_VERSINFO[1]}" -lt 3 ]; }; then
  JOBS=1
fi
selected=()
for i in "${!T_HOST[@]}"; do
  if [ "${#ONLY[@]}" -gt 0 ]; then
    case " ${ONLY[*]} " in *" ${T_HOST[i]} "*) ;; *) continue ;; esac
  fi
  selected+=("$i")
done
for i in "${selected[@]}"; do
  if [ "$JOBS" -le 1 ]; then
    one_host "$i" 2>&1 | prefixed "${T_HOST[i]}"
    continue
  fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  { one_host "$i" 2>&1 | prefixed "${T_HOST[i]}"; } &
done
wait

FAILED=0
echo
printf '%-24s %-28s %s\n' HOST ROLES RESULT
for i in "${selected[@]}"; do
  RESULT=$(cat "$WORK/result.$i" 2>/dev/null || echo failed)
  case "$RESULT" in
    installed | updated | unchanged | uninstalled | active | "dry run") ;;
    *) FAILED=$((FAILED + 1)) ;;
  esac
  printf '%-24s %-28s %s\n' "${T_HOST[i]}" "$(roles "$i")" "$RESULT"
done
if [ "$FAILED" -gt 0 ]; then
  echo "$FAILED host(s) failed"
  exit 1
fi
