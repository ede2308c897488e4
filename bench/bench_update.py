"""What a live model update costs the line, measured against the copy-and-restart way (Frigate's), one run.

    .venv/bin/python bench/bench_update.py [--rounds 5] [--fps 25]

The real daemon (`python -m taxonedge run`) classifies a looping JPEG folder at --fps frames/s and
publishes labels to a real mosquitto; a subscriber timestamps each label.
1. baseline: the median interval between labels while nothing happens (1/fps when the daemon keeps up).
2. live update: --rounds signed deployments over MQTT (alternating two tiny models), each through verify,
   self-test, switch, health window and commit; per round the longest gap between labels from the request to
   the commit, and the time of each phase (from the device's progress messages).
3. restart: the same daemon stopped (SIGTERM) and started again on the other bundle, --rounds times; the
   gap between the last label before and the first label after.
Prints medians and the ratio restart gap / live-update gap.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from taxonedge.edge.kernel.bundle import read_bundle  # noqa: E402

from tests.conftest import Broker, free_port, write_frames_folder  # noqa: E402
from tests.daemonkit import DaemonProcess  # noqa: E402
from tests.update_host import Observer, signed_bundles, write_config  # noqa: E402

PHASES = ["received", "verifying", "staged", "warming", "self_test", "switched", "committed"]


def frames_folder(root: Path) -> Path:
    return write_frames_folder(root, per_class=3, seed=5)


def wait_labels(observer: Observer, n: int) -> None:
    count = len(observer.labels)
    observer.wait_for(lambda: len(observer.labels) >= count + n, 60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fps", type=float, default=25.0)
    args = parser.parse_args()
    made = signed_bundles()
    shas = [read_bundle(made[k]).sha256 for k in ("old", "new")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        broker = Broker(port=free_port(), workdir=root / "broker")
        broker.workdir.mkdir()
        broker.start()
        paths = []
        for name in ("old", "new"):
            paths.append(root / f"{name}.tebundle")
            paths[-1].write_bytes(made[name])
        frames = frames_folder(root)
        config = write_config(root, broker.port, made["public_key"], paths[0], frames=frames)
        config.write_text(config.read_text().replace("fps = 25", f"fps = {args.fps}"))
        observer = Observer(broker.port)
        daemon = DaemonProcess(config)
        try:
            observer.wait_for(lambda: observer.model is not None, 60)
            wait_labels(observer, int(args.fps * 2))
            start = time.monotonic()
            wait_labels(observer, int(args.fps * 4))
            times = [t for t, _ in observer.labels if t >= start]
            baseline = statistics.median(b - a for a, b in zip(times[:-1], times[1:], strict=True))

            live_gaps, phases = [], {p: [] for p in PHASES}
            for r in range(args.rounds):
                target = (r + 1) % 2
                dep = f"bench-{r}"
                t0 = time.monotonic()
                observer.send(made["old" if target == 0 else "new"], dep, chunk_size=64 * 1024)
                result = observer.outcome(dep, 120)
                if result["state"] != "committed":
                    raise SystemExit(f"round {r}: {result['state']}: {result.get('reason')}")
                t1 = result["_at"]
                observer.wait_for(lambda t=target: observer.labels[-1][1]["model"]["sha256"] == shas[t], 30)
                live_gaps.append(observer.longest_label_gap(t0, t1 + 0.2))
                last = t0
                for p in observer.progress[dep]:
                    if p["state"] in phases and not p.get("repeat"):
                        phases[p["state"]].append(p["_at"] - last)
                        last = p["_at"]
                wait_labels(observer, 5)
        finally:
            daemon.terminate()

        # Frigate's way: copy the new file in place and restart the process.
        serving = root / "serving.tebundle"
        shutil.copy(paths[0], serving)
        config.write_text(config.read_text().replace(str(paths[0]), str(serving)))
        shutil.rmtree(root / "state" / "models", ignore_errors=True)  # no slots: run exactly that file
        restart_gaps = []
        daemon = DaemonProcess(config)
        try:
            wait_labels(observer, 10)
            for r in range(args.rounds):
                shutil.copy(paths[(r + 1) % 2], serving)
                boot = observer.labels[-1][1]["boot_id"]
                daemon.terminate()
                mark = len(observer.labels)
                daemon = DaemonProcess(config)
                first = observer.wait_for(
                    lambda b=boot, m=mark: next(
                        (t for t, lb in observer.labels[m:] if lb["boot_id"] != b), None
                    ),
                    60,
                )
                # from the old process's last label (its outbox is flushed on SIGTERM) to the new one's first
                t_stop = max(t for t, lb in observer.labels if lb["boot_id"] == boot)
                restart_gaps.append(first - t_stop)
                wait_labels(observer, 5)
        finally:
            daemon.terminate()
        observer.close()
        broker.stop()

    live = statistics.median(live_gaps)
    restart = statistics.median(restart_gaps)
    print(f"label interval at {args.fps:g} frames/s, nothing happening (median): {baseline * 1000:.1f} ms")
    print(
        f"live update ({args.rounds} rounds): longest label gap median {live * 1000:.1f} ms, "
        f"max {max(live_gaps) * 1000:.1f} ms"
    )
    print(
        "  time from the previous state to each state (median ms): "
        + ", ".join(f"{p} {statistics.median(v) * 1000:.0f}" for p, v in phases.items() if v)
    )
    print(
        f"copy + restart ({args.rounds} rounds): label gap median {restart * 1000:.0f} ms, "
        f"max {max(restart_gaps) * 1000:.0f} ms"
    )
    print(f"ratio restart gap / live-update gap: {restart / live:.1f}x")


if __name__ == "__main__":
    main()
