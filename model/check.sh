#!/usr/bin/env bash
# Checks the work-lease model (model/leases.pml) with spin: every property on the
# model as it is, then each variant with one rule removed, which must produce a
# counterexample for the property that rule protects. Prints one line per check
# with the states explored; exits non-zero when a check does not come out as
# expected.
#
#   model/check.sh            the bounds CI uses (about 80 s on 2 cores, checks side by side)
#   model/check.sh --deep     larger bounds (see model/README.md for its last result)
#   model/check.sh --only NAME   one check (names as printed)
#
# Needs spin (Debian: apt-get install spin) and a C compiler.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model="$here/leases.pml"
work=$(mktemp -d "${TMPDIR:-/tmp}/leasehold-model.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Bounds: NS server processes, G ticks of grace, FAULTS faults per run, CONN_MAX streams
# per agent, EPOCH_MAX grants. The correct model is explored exhaustively; a variant's
# search stops at its first counterexample.
bounds="-DNS=2 -DG=3 -DFAULTS=1 -DCONN_MAX=3 -DEPOCH_MAX=3"
# One server and one fault is enough for most variants to fail, and fast; the self-fence bug
# needs two losses of contact.
variant_bounds="-DNS=1 -DG=3 -DFAULTS=1 -DCONN_MAX=3 -DEPOCH_MAX=3"
two_faults="-DNS=1 -DG=3 -DFAULTS=2 -DCONN_MAX=3 -DEPOCH_MAX=3"
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --deep)
      bounds="-DNS=2 -DG=4 -DFAULTS=2 -DCONN_MAX=4 -DEPOCH_MAX=4"
      shift ;;
    --only) only=$2; shift 2 ;;
    *) echo "usage: $0 [--deep] [--only NAME]" >&2; exit 2 ;;
  esac
done

command -v spin >/dev/null || { echo "spin is not installed (Debian: apt-get install spin)" >&2; exit 2; }

failures=0
# check NAME EXPECT DEFINES...
#   EXPECT: "holds", or the text of the assertion that must be violated, or "acceptance cycle".
check() {
  local name=$1 expect=$2
  shift 2
  [ -n "$only" ] && [ "$only" != "$name" ] && return 0
  local dir="$work/$name" liveness=0 out
  mkdir -p "$dir"
  case " $* " in *" -DLIVENESS "*) liveness=1 ;; esac
  cp "$model" "$dir/leases.pml"
  if ! (cd "$dir" && spin -a "$@" leases.pml >spin.log 2>&1); then
    echo "FAIL $name: spin could not translate the model"; cat "$dir/spin.log"; failures=$((failures + 1)); return
  fi
  local cflags="-O2 -w -DCOLLAPSE" run="-m100000 -w26"
  if [ $liveness -eq 1 ]; then cflags="$cflags -DNFAIR=3"; run="$run -a -f"; else cflags="$cflags -DSAFETY"; fi
  if ! (cd "$dir" && gcc $cflags -o pan pan.c >gcc.log 2>&1); then
    echo "FAIL $name: the verifier did not compile"; cat "$dir/gcc.log"; failures=$((failures + 1)); return
  fi
  local started=$SECONDS
  out=$(cd "$dir" && ./pan $run 2>&1)
  local took=$((SECONDS - started))
  local errors states depth
  errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' <<<"$out" | tail -n 1)
  states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' <<<"$out" | tail -n 1)
  depth=$(sed -n 's/.*depth reached \([0-9]*\).*/\1/p' <<<"$out" | tail -n 1)
  if grep -q "max search depth too small" <<<"$out"; then
    echo "FAIL $name: the search depth limit was reached"; failures=$((failures + 1)); return
  fi
  local found
  found=$(grep -m1 -E "assertion violated|acceptance cycle" <<<"$out" | sed 's/^pan:[0-9]*: *//')
  if [ "$expect" = "holds" ]; then
    if [ "${errors:-1}" = "0" ]; then
      echo "ok   $name: holds; $states states, depth $depth, ${took}s"
    else
      echo "FAIL $name: expected to hold, found: $found"
      # The counterexample, as the model's printf lines tell it.
      (cd "$dir" && spin -t "$@" leases.pml 2>&1 | grep -v "^ *$" | tail -n 80)
      failures=$((failures + 1))
    fi
  else
    if [ "${errors:-0}" != "0" ] && grep -qF -- "$expect" <<<"$found"; then
      echo "ok   $name: fails as it must ($found) after $states states, ${took}s"
    else
      echo "FAIL $name: expected a counterexample ($expect), got: ${found:-none, $states states}"
      failures=$((failures + 1))
    fi
  fi
}

# The checks run side by side, one per core: the exhaustive safety check takes most of the time,
# and the others fit beside it. Each writes its lines to a file, printed in order at the end.
parallel=$(nproc 2>/dev/null || echo 2)
launched=()
launch() { # same arguments as check
  [ -n "$only" ] && [ "$only" != "$1" ] && return 0
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n; done
  launched+=("$1")
  check "$@" >"$work/out-${1//\//-}" 2>&1 &
}

# shellcheck disable=SC2086 # bounds are several words
{
  launch safety holds -DP_ALL $bounds
  launch liveness holds -DLIVENESS $bounds
  launch no-fencing/epoch "aEpoch==x" -DNO_FENCING -DP_EPOCH $variant_bounds
  launch no-fencing/once "completions==0" -DNO_FENCING -DP_ONCE $variant_bounds
  launch no-self-fence/exclusive "lSt[(1-w)]!=" -DNO_SELF_FENCE -DP_EXCL $variant_bounds
  launch fence-once-bug/exclusive "lSt[(1-w)]!=" -DFENCE_ONCE_BUG -DP_EXCL $two_faults
  launch short-margin/exclusive "lSt[(1-w)]!=" -DSHORT_MARGIN -DP_EXCL $variant_bounds
  launch no-restart-extension/restart "resumed" -DNO_RESTART_EXTENSION -DP_RESTART $variant_bounds
  launch no-grant-resend/liveness "acceptance cycle" -DNO_GRANT_RESEND -DLIVENESS $variant_bounds
}
wait
for name in "${launched[@]}"; do
  out="$work/out-${name//\//-}"
  cat "$out"
  grep -q '^ok ' "$out" || failures=$((failures + 1))
done

if [ "$failures" -gt 0 ]; then
  echo "model: $failures check(s) failed"
  exit 1
fi
echo "model: all checks came out as expected"
