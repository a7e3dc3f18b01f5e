# Sourced by the test scripts. `run_with_deadline SECONDS COMMAND...` runs COMMAND; if it is
# still running after SECONDS, it prints what the command's processes (and any process in
# uninterruptible sleep) are waiting for, kills the command and everything it started, aborts
# the FUSE connections of furcate mounts left behind, and returns 124. A hung test run then fails
# in minutes, saying where it hung, instead of running into CI's own time limit silently.

# The pids of PID's descendants, each before its own children.
descendants() {
  local pid=$1 child
  for child in $(ps -eo pid=,ppid= | awk -v p="$pid" '$2 == p { print $1 }'); do
    echo "$child"
    descendants "$child"
  done
}

# The FUSE control filesystem (each connection's waiting count and abort switch), as root.
mount_fusectl() {
  if [ -d /sys/fs/fuse/connections ] && ! mountpoint -q /sys/fs/fuse/connections; then
    mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || true
  fi
}

# What each process is doing: state, kernel wait channel and, as root, the kernel stack of
# every thread in uninterruptible sleep (D) — the trace a FUSE deadlock leaves.
report_stuck() {
  local pid=$1 p t
  echo "deadline: the process tree of $pid:"
  # shellcheck disable=SC2046
  ps -o pid,ppid,stat,wchan:32,etime,args -p "$pid" $(descendants "$pid" | sed 's/^/-p /') || true
  echo "deadline: what the threads of each process in the tree wait in (count, state, kernel function):"
  for p in $pid $(descendants "$pid"); do
    echo "-- pid $p ($(cut -c1-80 "/proc/$p/comm" 2>/dev/null))"
    for t in /proc/"$p"/task/[0-9]*; do
      echo "$(awk '{ print $3 }' "$t/stat" 2>/dev/null) $(cat "$t/wchan" 2>/dev/null)"
    done | sort | uniq -c | sort -rn
  done
  echo "deadline: threads in uninterruptible sleep, host-wide:"
  for t in /proc/[0-9]*/task/[0-9]*; do
    [ "$(awk '{ print $3 }' "$t/stat" 2>/dev/null)" = D ] || continue
    p=${t#/proc/}; p=${p%%/*}
    echo "-- pid $p thread ${t##*/} ($(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-160))"
    cat "$t/stack" 2>/dev/null || true
  done
  echo "deadline: FUSE mounts and their waiting requests:"
  mount_fusectl
  grep ' fuse' /proc/mounts || true
  for c in /sys/fs/fuse/connections/*; do
    [ -e "$c/waiting" ] && echo "connection ${c##*/}: $(cat "$c/waiting") waiting"
  done
  return 0
}

# Aborts the FUSE connection of each furcate mount the tests made (under the temporary
# directory) whose server is gone or stuck, and detaches it, so that processes blocked on it get
# errors instead of waiting forever.
abort_furcate_mounts() {
  local mp dev tmp
  tmp=$(realpath -m "${TMPDIR:-/tmp}")
  mount_fusectl
  while read -r _ _ dev _ mp _ rest; do
    case " $rest " in *" - fuse.furcate "*) ;; *) continue ;; esac
    case "$mp" in "$tmp"/furcate-*) ;; *) continue ;; esac
    [ -w "/sys/fs/fuse/connections/${dev#*:}/abort" ] && echo 1 > "/sys/fs/fuse/connections/${dev#*:}/abort"
    umount -l "$mp" 2>/dev/null || true
    echo "deadline: aborted and detached the FUSE mount $mp"
  done < /proc/self/mountinfo
}

run_with_deadline() {
  local limit=$1 pid waited=0 rc=0 tree
  shift
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge "$limit" ]; then
      echo "deadline: '$*' still running after ${limit}s; killing it" >&2
      report_stuck "$pid" >&2
      tree="$pid $(descendants "$pid")"
      # shellcheck disable=SC2086
      kill -KILL $tree 2>/dev/null || true
      abort_furcate_mounts >&2
      wait "$pid" 2>/dev/null || true
      return 124
    fi
    sleep 2
    waited=$((waited + 2))
  done
  wait "$pid" || rc=$?
  return "$rc"
}
