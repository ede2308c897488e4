"""Outbox commit latency with WAL checkpoints on commit (sqlite's default) against in the background.

    .venv/bin/python bench/bench_outbox.py [--rate 100] [--seconds 30] [--rounds 2]

Each label's `put` is on the daemon's label path (between the decision and the publish). sqlite checkpoints
the WAL (copies it into the database file, with an fsync) on the commit that crosses 1000 pages, so every
few hundred labels one `put` takes milliseconds. The outbox leaves that to `checkpoint()`, which the
daemon's health thread calls every second on its own connection. Both are run here side by side, in
alternation, on the same disk: `--rate` puts a second from one thread, acks (deletes) from another as
PUBACKs would come, a third thread checkpointing every second in the background mode. Prints each round
and the medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taxonedge.edge.service.outbox import Outbox  # noqa: E402

PAYLOAD = b"x" * 900  # a label message is 0.8-1 KB


def run(path: Path, background: bool, rate: float, seconds: float) -> dict:
    outbox = Outbox(path)
    if not background:
        outbox._db.execute("PRAGMA wal_autocheckpoint=1000")  # sqlite's default: checkpoint on commit
    stop = threading.Event()
    stored: list[int] = []
    lock = threading.Lock()

    def acker() -> None:  # PUBACKs come back a little later, in batches
        while not stop.wait(0.01):
            with lock:
                ids, stored[:] = list(stored), []
            outbox.ack(*ids)

    def checkpointer() -> None:
        while not stop.wait(1.0):
            outbox.checkpoint()

    threads = [threading.Thread(target=acker)] + (
        [threading.Thread(target=checkpointer)] if background else []
    )
    for t in threads:
        t.start()
    times = []
    due = time.perf_counter()
    for _ in range(int(rate * seconds)):
        due += 1 / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        t0 = time.perf_counter()
        message = outbox.put("t/labels", PAYLOAD, 1, 3600)
        times.append(time.perf_counter() - t0)
        with lock:
            stored.append(message.id)
    stop.set()
    for t in threads:
        t.join()
    outbox.close()
    ms = np.array(times) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "over_1ms": int((ms > 1).sum()),
        "puts": len(ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=100.0, help="labels a second (default 100)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each run (default 30)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating pairs of runs (default 2)")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"on commit": [], "background": []}
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:  # a real disk, not a tmpfs /tmp
        for r in range(args.rounds):
            for name in ("on commit", "background"):
                res = run(
                    Path(tmp) / f"{r}-{name.replace(' ', '-')}.sqlite",
                    name == "background",
                    args.rate,
                    args.seconds,
                )
                results[name].append(res)
                print(
                    f"round {r + 1}, checkpoints {name:10s}: put p50 {res['p50']:.3f} ms  p99 "
                    f"{res['p99']:.3f} ms  "
                    f"max {res['max']:.2f} ms  puts over 1 ms: {res['over_1ms']} of {res['puts']}"
                )
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("p50", "p99", "max", "over_1ms")}
        for name, rs in results.items()
    }
    for name, m in med.items():
        print(
            f"median over rounds, {name:10s}: p50 {m['p50']:.3f} ms  p99 {m['p99']:.3f} ms  max "
            f"{m['max']:.2f} ms"
            f"  over 1 ms: {m['over_1ms']:.0f}"
        )
    print(f"max put, on commit / background: {med['on commit']['max'] / med['background']['max']:.1f}x")


if __name__ == "__main__":
    main()
