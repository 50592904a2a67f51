#!/usr/bin/env bash
# Start watchdog-llm in a detached tmux session on a lab node (mode B: watch-and-yield).
#   scripts/start-tmux.sh [config.env]      attach: tmux attach -t watchdog-llm
# Closing the session sends SIGHUP, which the daemon treats like SIGTERM: it stops its model tree.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
config="$(realpath "${1:-$here/config.env}")"
session="${WATCHDOG_LLM_SESSION:-watchdog-llm}"
bin="${WATCHDOG_LLM:-$here/.venv/bin/watchdog-llm}"

command -v tmux >/dev/null || { echo "start-tmux.sh: tmux is not installed" >&2; exit 1; }
[[ -x "$bin" ]] || { echo "start-tmux.sh: $bin not found: run 'make demo' or 'make test' once to create .venv" >&2; exit 1; }
[[ -r "$config" ]] || { echo "start-tmux.sh: config $config not readable (copy config.env.example)" >&2; exit 1; }
if tmux has-session -t "$session" 2>/dev/null; then
    echo "start-tmux.sh: tmux session '$session' already exists: tmux attach -t $session" >&2
    exit 1
fi
report=$("$bin" --config "$config" doctor) || { printf '%s\n' "$report"; echo "start-tmux.sh: fix the failed checks above first" >&2; exit 1; }
printf '%s\n' "$report"
state_dir=$(sed -n 's/^ok    STATE_DIR \(.*\) is writable$/\1/p' <<<"$report")
log="${state_dir:-STATE_DIR}/logs/daemon.log"
# exec: the daemon is the session's process, so the session's SIGHUP reaches it directly.
tmux new-session -d -s "$session" "exec $(printf '%q' "$bin") --config $(printf '%q' "$config") run"
# A daemon that fails at start takes its session with it: say so, with its own log (it keeps one in
# every launch mode), instead of "started".
sleep "${WATCHDOG_LLM_START_CHECK:-3}"
if ! tmux has-session -t "$session" 2>/dev/null; then
    echo "start-tmux.sh: the daemon exited at start; its log, $log, says why:" >&2
    tail -n 5 "$log" >&2 2>/dev/null || true
    exit 1
fi
echo "started in tmux session '$session': tmux attach -t $session   (status: $bin --config $config status; log: $log)"
