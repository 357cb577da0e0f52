#!/usr/bin/env bash
# CPU per upgrade of two wsgate binaries and HAProxy, in one run: all three behind
# the same echo server, taking turns in interleaved rounds of the load generator's
# upgrades scenario (32 at once), each one's CPU time (utime + stime) read from
# /proc around its turn. compare.sh's upgrade rows move ±5% between runs here; this
# tells a change's own effect apart from the machine's noise.
#
#   benches/ab_upgrades.sh BINARY_A BINARY_B [ROUNDS] [SECONDS]
#
# e.g. build the commit before a change and the change, copy each
# target/release/wsgate aside, then compare the copies (8 rounds of 5 s: ~4 min).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
  echo "usage: $0 BINARY_A BINARY_B [ROUNDS] [SECONDS]" >&2
  exit 2
fi
a=$(realpath "$1")
b=$(realpath "$2")
rounds=${3:-8}
secs=${4:-5}
command -v haproxy >/dev/null 2>&1 || {
  echo "ab_upgrades.sh: needs haproxy (sudo apt-get install haproxy)" >&2
  exit 1
}
ulimit -n "$(ulimit -Hn)"

loadgen=$(cargo bench --bench loadgen --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -x "$loadgen" ] || { echo "ab_upgrades.sh: no load generator built" >&2; exit 1; }

dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

# A port nothing answers on now, below the ephemeral ports that outgoing
# connections take (bounded tries).
free_port() {
  for _ in $(seq 1 100); do
    local port=$((20000 + RANDOM % 12000)) # below the ephemeral range
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  echo "ab_upgrades.sh: no free port found" >&2
  exit 1
}

# Waits (at most 10 s) until something accepts on the port; else shows the log.
wait_port() { # PORT LOG
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
    sleep 0.05
  done
  echo "ab_upgrades.sh: nothing listening on port $1:" >&2
  cat "$2" >&2
  exit 1
}

"$loadgen" echo-server 1 >"$dir/echo" </dev/null 2>/dev/null &
pids+=($!)
for _ in $(seq 1 200); do
  [ -s "$dir/echo" ] && break
  sleep 0.05
done
echo_addr=$(head -1 "$dir/echo")
[ -n "$echo_addr" ] || { echo "ab_upgrades.sh: the echo server did not start" >&2; exit 1; }

start_wsgate() { # BINARY PORT
  cat >"$dir/wsgate-$2.toml" <<EOF
[server]
listen = ["127.0.0.1:$2"]
[log]
access = "off"
[[route]]
path = "/"
pool = "echo"
[pool.echo]
backends = [{ addr = "$echo_addr" }]
EOF
  RUST_LOG=warn "$1" run --config "$dir/wsgate-$2.toml" >"$dir/wsgate-$2.log" 2>&1 </dev/null &
  pids+=($!)
  wait_port "$2" "$dir/wsgate-$2.log"
}

port_a=$(free_port)
start_wsgate "$a" "$port_a"
pid_a=${pids[-1]}
port_b=$(free_port)
start_wsgate "$b" "$port_b"
pid_b=${pids[-1]}
port_h=$(free_port)
cat >"$dir/haproxy.cfg" <<EOF
global
    maxconn 9950
defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
frontend fe
    bind 127.0.0.1:$port_h
    default_backend be
backend be
    balance leastconn
    server s0 $echo_addr
EOF
haproxy -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 </dev/null &
pids+=($!)
pid_h=$!
wait_port "$port_h" "$dir/haproxy.log"

tick=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
echo "A: $a" >&2
echo "B: $b" >&2
echo "$rounds rounds of $secs s each, echo server $echo_addr" >&2
for r in $(seq 1 "$rounds"); do
  for target in "A $port_a $pid_a" "B $port_b $pid_b" "haproxy $port_h $pid_h"; do
    set -- $target
    before=$(cpu "$3")
    rate=$("$loadgen" upgrades "127.0.0.1:$2" "$secs" | awk '{print $1}')
    after=$(cpu "$3")
    echo "$1 $rate $before $after"
  done
done | awk -v secs="$secs" -v tick="$tick" '
  {
    n = $2 * secs
    us = n > 0 ? ($4 - $3) * 1e6 / tick / n : 0
    rate[$1] += $2; cpu[$1] += us; count[$1]++
  }
  END {
    for (t in rate) mean[t] = cpu[t] / count[t]
    for (t in rate) printf "%s: %.0f upgrades/s, %.1f CPU µs per upgrade\n", t, rate[t] / count[t], mean[t]
    printf "A / haproxy: %.3f, B / haproxy: %.3f, B / A: %.3f\n", mean["A"] / mean["haproxy"], mean["B"] / mean["haproxy"], mean["B"] / mean["A"]
  }'
