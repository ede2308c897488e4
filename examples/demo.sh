#!/usr/bin/env bash
# The taxonedge demo, in one command: a local mosquitto on loopback, the edge daemon classifying the bundled
# conveyor-belt clip with the bundled Grocery model (int8, signed), and a subscriber printing each
# hierarchical label as a logistics system receives it.
#
#   bash examples/demo.sh            # first run sets up: Debian's mosquitto, a device venv (.venv-edge)
#
# The device venv has no TensorFlow: it is what a sorting-line board installs (pip install '.[edge]').
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUNDLE=${BUNDLE:-$ROOT/examples/models/grocery/grocery.tebundle}
PUBKEY=${PUBKEY:-$ROOT/examples/models/grocery/taxonedge-demo.pub}
CLIP=${CLIP:-$ROOT/examples/demo/belt.mp4}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing Debian's mosquitto (MQTT broker)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

if [ ! -x .venv-edge/bin/taxonedge ]; then
  echo "== creating the device environment .venv-edge (no TensorFlow)"
  python3 -m venv .venv-edge
  .venv-edge/bin/python -m pip install -q --upgrade pip
fi
# Editable, so that the demo runs this checkout's code: a plain install keeps running the code of the day
# the environment was made, whatever was pulled since.
# (Checked from / so that the checkout's own taxonedge/ folder does not answer for the installed one.)
if ! (cd / && "$ROOT/.venv-edge/bin/python" -c "import sys, taxonedge.edge as e; sys.exit(not e.__file__.startswith('$ROOT/edge/'))") 2>/dev/null; then
  echo "== installing this checkout into .venv-edge (editable, no TensorFlow)"
  .venv-edge/bin/python -m pip install -q -e ".[edge]"
fi
TE=.venv-edge/bin/taxonedge

WORK=$(mktemp -d)
chmod 755 "$WORK"
PORT=$(.venv-edge/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
  [ -n "${LISTEN_PID:-}" ] && kill "$LISTEN_PID" 2>/dev/null || true
  [ -n "${BROKER_PID:-}" ] && kill "$BROKER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$PORT" > "$WORK/mosquitto.conf"
chmod 644 "$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" > "$WORK/mosquitto.log" 2>&1 &
BROKER_PID=$!

cat > "$WORK/device.toml" <<TOML
# A demo device: the bundled clip stands in for the belt camera, paced in real time.
[device]
id = "demo-cam"
site = "demo-dc"
line = "belt-1"
state_dir = "$WORK/state"

[model]
bundle = "$BUNDLE"
public_key = "$PUBKEY"     # the bundle must carry a valid signature from this key

[source]
type = "video"
path = "$CLIP"
pacing = "realtime"

[trigger]
mode = "continuous"
max_rate_hz = 2              # two labels a second are easy to read; a real line runs at camera rate

[inference]
backend = "auto"             # Edge TPU when present, else the CPU (status: degraded)

[mqtt]
host = "127.0.0.1"
port = $PORT
TOML

echo "== broker on 127.0.0.1:$PORT; labels of demo-dc/belt-1/demo-cam (Ctrl-C stops):"
"$TE" listen --broker "127.0.0.1:$PORT" --site demo-dc --line belt-1 --device demo-cam &
LISTEN_PID=$!
sleep 0.5
"$TE" run --config "$WORK/device.toml"
sleep 1
echo "== the clip has ended; the daemon published 'offline' and exited cleanly"
