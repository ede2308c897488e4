#!/usr/bin/env bash
# The taxonedge demo, in one command: a local mosquitto on loopback, the edge daemon classifying the bundled
# conveyor-belt clip with the bundled Grocery model (int8, signed), and a subscriber printing each
# hierarchical label as a logistics system receives it.
#
#   bash examples/demo.sh            # first run sets up: Debian's mosquitto, a device venv (.venv-edge)
#   bash examples/demo.sh deploy     # a model deployment end to end, with a key of your own (docs/deploy.md)
#   bash examples/demo.sh enroll [PHOTO_DIR]   # a product the model does not know, enrolled from photos
#
# enroll: examples/demo/enroll_clip.py draws a product (a paint can) or takes PHOTO_DIR (your photos of one
# product: all but the last are enrolled, the last passes on the belt), and makes a short clip: Grocery
# products from belt.mp4, then the new one passing three times. The device runs on it in a loop; the
# product is enrolled with `taxonedge enroll` while it runs, and `taxonedge listen` shows its label
# (NEW_LABEL, default Hardware/Paint/Blue-Can) from then on. Photos, not the belt: the demo runs in
# continuous mode, and `--from-belt` needs item triggers (docs/mqtt.md, "Enrolled products").
#
# The device venv has no TensorFlow: it is what a sorting-line board installs (pip install '.[edge]').
# VENV=path uses another environment that has this checkout installed (editable), e.g. the tests' .venv.
set -euo pipefail
MODE=${1:-labels}
case "$MODE" in
  labels|deploy|enroll) ;;
  *) echo "usage: bash examples/demo.sh [deploy | enroll [PHOTO_DIR]]" >&2; exit 2 ;;
esac
PHOTO_DIR=${2:-}
[ -z "$PHOTO_DIR" ] || PHOTO_DIR=$(cd "$PHOTO_DIR" && pwd)
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

VENV=${VENV:-.venv-edge}
if [ ! -x "$VENV/bin/taxonedge" ]; then
  echo "== creating the device environment $VENV (no TensorFlow)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# Editable, so that the demo runs this checkout's code: a plain install keeps running the code of the day
# the environment was made, whatever was pulled since.
# (Checked from / so that the checkout's own taxonedge/ folder does not answer for the installed one.)
VENV=$(cd "$VENV" && pwd)
if ! (cd / && "$VENV/bin/python" -c "import sys, taxonedge.edge as e; sys.exit(not e.__file__.startswith('$ROOT/edge/'))") 2>/dev/null; then
  echo "== installing this checkout into $VENV (editable, no TensorFlow)"
  "$VENV/bin/python" -m pip install -q -e ".[edge]"
fi
TE=$VENV/bin/taxonedge

WORK=$(mktemp -d)
chmod 755 "$WORK"
PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
  [ -n "${DAEMON_PID:-}" ] && kill "$DAEMON_PID" 2>/dev/null || true
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

LOOP=false
if [ "$MODE" = enroll ]; then
  echo "== a product the demo model was not trained on: its photos and a belt clip"
  "$VENV/bin/python" examples/demo/enroll_clip.py "$WORK" ${PHOTO_DIR:+"$PHOTO_DIR"}
  CLIP=$WORK/belt-new.mp4
  LOOP=true
fi
if [ "$MODE" = deploy ]; then
  # The bundled Grocery bundle is signed with the project's demo key, whose private half is not shipped.
  # An operator signs with a key of their own: make one, re-sign the bundle the device starts with (after
  # checking the demo signature), and sign the same model as release "op-1" (a version of your own) to deploy.
  echo "== your key pair, the demo bundle re-signed with it, and release op-1 of the same model"
  "$TE" keygen --out "$WORK/keys/demo-op"
  "$TE" sign "$BUNDLE" --pubkey "$PUBKEY" --key "$WORK/keys/demo-op.key" --out "$WORK/grocery-mine.tebundle"
  "$TE" sign "$WORK/grocery-mine.tebundle" --key "$WORK/keys/demo-op.key" --version op-1 \
      --out "$WORK/grocery-op-1.tebundle"
  BUNDLE=$WORK/grocery-mine.tebundle
  PUBKEY=$WORK/keys/demo-op.pub
  LOOP=true   # the line keeps running through the deployment (the health window needs inferences)
fi

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
loop = $LOOP

[trigger]
mode = "continuous"
max_rate_hz = 2              # two labels a second are easy to read; a real line runs at camera rate

[inference]
backend = "auto"             # an accelerator when present and the bundle has its model, else the CPU

[mqtt]
host = "127.0.0.1"
port = $PORT
TOML

LISTEN=("$TE" listen --broker "127.0.0.1:$PORT" --site demo-dc --line belt-1 --device demo-cam)
if [ "$MODE" = enroll ]; then
  NEW_LABEL=${NEW_LABEL:-Hardware/Paint/Blue-Can}
  "$TE" run --config "$WORK/device.toml" > "$WORK/daemon.log" 2>&1 &
  DAEMON_PID=$!
  echo "== broker on 127.0.0.1:$PORT; the device labels the clip (the new product is not enrolled yet):"
  STATUS=0
  "${LISTEN[@]}" --count 4 --timeout 120 || STATUS=$?
  if [ "$STATUS" -eq 0 ]; then
    echo "== taxonedge enroll --label $NEW_LABEL $(ls "$WORK"/photos | wc -l) photos"
    "$TE" enroll --broker "127.0.0.1:$PORT" --target demo-dc/belt-1/demo-cam --label "$NEW_LABEL" \
        "$WORK"/photos/*.jpg || STATUS=$?
  fi
  if [ "$STATUS" -eq 0 ]; then
    echo "== the labels from now on ($NEW_LABEL: the enrolled product; the clip loops every 20 s):"
    "${LISTEN[@]}" --count "${COUNT:-40}" --timeout 180 || STATUS=$?
  fi
  kill -TERM "$DAEMON_PID"
  wait "$DAEMON_PID" || true
  DAEMON_PID=
  [ "$STATUS" -eq 0 ] || { echo "== the daemon's log:"; tail -n 30 "$WORK/daemon.log"; }
  exit "$STATUS"
fi

if [ "$MODE" = deploy ]; then
  echo "== broker on 127.0.0.1:$PORT; the device starts on grocery-mine.tebundle (the shipped release, your key)"
  "$TE" run --config "$WORK/device.toml" > "$WORK/daemon.log" 2>&1 &
  DAEMON_PID=$!
  "$TE" listen --broker "127.0.0.1:$PORT" --site demo-dc --line belt-1 --device demo-cam --count 3 --timeout 120
  echo "== deploying release op-1 (taxonedge deploy, exit status 0 = committed and serving)"
  STATUS=0
  "$TE" deploy "$WORK/grocery-op-1.tebundle" --broker "127.0.0.1:$PORT" --target demo-dc/belt-1/demo-cam \
      --pubkey "$PUBKEY" --timeout 180 || STATUS=$?
  echo "== the model in the device's next labels:"
  "$TE" listen --broker "127.0.0.1:$PORT" --site demo-dc --line belt-1 --device demo-cam --count 2 --timeout 60 \
      --json | "$VENV/bin/python" -c '
import json, sys
for line in sys.stdin:
    model = json.loads(line)["payload"].get("model")
    if isinstance(model, dict):
        print(model.get("name"), model.get("version"), model.get("sha256", "")[:12])' || true
  kill -TERM "$DAEMON_PID"
  wait "$DAEMON_PID" || true
  DAEMON_PID=
  [ "$STATUS" -eq 0 ] || { echo "== the daemon's log:"; tail -n 30 "$WORK/daemon.log"; }
  echo "== deploy exit status: $STATUS"
  exit "$STATUS"
fi

echo "== broker on 127.0.0.1:$PORT; labels of demo-dc/belt-1/demo-cam (Ctrl-C stops):"
"$TE" listen --broker "127.0.0.1:$PORT" --site demo-dc --line belt-1 --device demo-cam &
LISTEN_PID=$!
sleep 0.5
"$TE" run --config "$WORK/device.toml"
sleep 1
echo "== the clip has ended; the daemon published 'offline' and exited cleanly"
