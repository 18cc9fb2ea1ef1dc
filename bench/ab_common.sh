# Shared by the bench/*_ab.sh scripts (sourced): two revisions, each checked out in a
# temporary worktree run with this checkout's virtualenv, measured in one run, alternating,
# so that both see the same machine.
#   ab_setup NAME DEFAULT_RUNS "$@"   parses BEFORE_REV AFTER_REV [RUNS] [-- ARGS...] and makes
#                                     the worktrees ($TMP/before, $TMP/after); sets ROOT, PY,
#                                     BEFORE, AFTER, RUNS and AB_ARGS (the ARGS).
#   ab_alternate FN                   runs `FN before N ARGS...` and `FN after N ARGS...` for
#                                     N = 1..RUNS, which goes first alternating.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}

ab_setup() {
    local name=$1 default_runs=$2; shift 2
    BEFORE=${1:?before revision}; AFTER=${2:?after revision}; RUNS=${3:-$default_runs}
    shift $(( $# >= 3 ? 3 : $# )); [ "${1:-}" = "--" ] && shift
    AB_ARGS=("$@")
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/jobq-$name.XXXXXX")
    trap 'git -C "$ROOT" worktree remove --force "$TMP/before" 2>/dev/null || true;
          git -C "$ROOT" worktree remove --force "$TMP/after" 2>/dev/null || true; rm -rf "$TMP"' EXIT
    git -C "$ROOT" worktree add --detach -q "$TMP/before" "$BEFORE"
    git -C "$ROOT" worktree add --detach -q "$TMP/after" "$AFTER"
}

ab_alternate() {
    local fn=$1 i
    for i in $(seq 1 "$RUNS"); do
        if (( i % 2 )); then "$fn" before "$i" "${AB_ARGS[@]}"; "$fn" after "$i" "${AB_ARGS[@]}"
        else "$fn" after "$i" "${AB_ARGS[@]}"; "$fn" before "$i" "${AB_ARGS[@]}"; fi
    done
}
