"""No item on the demo belt clip: how many frames between products are still published as a product, and how
many product frames lose their label, with the daemon's own code on a real broker.

    .venv/bin/python bench/bench_no_item.py --bundle BUNDLE.tebundle [--clip examples/demo/belt.mp4]

The clip's ground truth (`belt.json` beside it, from examples/demo/make_clip.py) gives each frame the share
of the frame the product covers. Categories, after the lead-in (the empty belt the reference is learned
from, left out of every figure): between products (coverage 0), product frames (coverage >= 0.5), partly
visible products (0 < coverage < 0.5; reported on their own: either answer is fair for them).

1. learn: a daemon (in this process, `Daemon` as `taxonedge run` builds it, its inference worker, a real
   mosquitto) on the lead-in frames looped as a 10 fps camera gets `learn_empty` for --learn-seconds; its
   answer: frames, threshold, spread.
2. score: the daemon restarted on the whole clip (pacing "fast": every frame classified, in order;
   `publish = "event"`: one label per frame, so label i is frame i). A frame is "published as a product"
   when its label names a product (accepted or backed-off); a product frame is "still labelled" when it got
   the model's own decision, not `no_item`.
3. after a model switch: the same, with the stored reference marked as another model's, so that the
   daemon re-embeds its thumbnails at start (what it does after a deployment) and compares with those.
4. without no-item detection (`[no_item] enabled = false`): what the line published before.
5. cost: `NoItem.judge` on the clip's embeddings (one normalisation and one dot product per frame) against
   the daemon's invoke median from the score run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from taxonedge.edge.kernel.bundle import read_bundle  # noqa: E402
from taxonedge.edge.kernel.decode import Decision  # noqa: E402
from taxonedge.edge.kernel.preprocess import preprocess  # noqa: E402
from taxonedge.edge.kernel.runtime import Classifier  # noqa: E402
from taxonedge.edge.service.config import NoItemConfig, load_config  # noqa: E402
from taxonedge.edge.service.daemon import Daemon  # noqa: E402
from taxonedge.edge.service.noitem import (  # noqa: E402
    REFERENCE_FILE,
    NoItem,
    decode_reference,
    encode_reference,
    unit,
)
from taxonedge.edge.service.source import Frame  # noqa: E402
from taxonedge.train.belt import read_frames  # noqa: E402

from tests.conftest import Broker, free_port  # noqa: E402
from tests.daemonkit import REPLIES, Recorder, labels_of, write_config  # noqa: E402

PRODUCT_COVERAGE = 0.5


def read_clip(clip: Path) -> tuple[list[np.ndarray], dict]:
    """The clip's frames (as the device reads them) and its ground truth (the JSON beside it)."""
    frames = list(read_frames(clip))
    truth = json.loads(clip.with_suffix(".json").read_text())
    if len(frames) != len(truth["coverage"]):
        raise SystemExit(f"{clip}: {len(frames)} frames, its ground truth {len(truth['coverage'])}")
    return frames, truth


def categories(truth: dict) -> dict[str, list[int]]:
    """Frame indices per category, the lead-in left out."""
    cov, lead = truth["coverage"], truth["lead_in"]
    rest = range(lead, len(cov))
    return {
        "between products": [i for i in rest if cov[i] == 0],
        "product": [i for i in rest if cov[i] >= PRODUCT_COVERAGE],
        "partly visible": [i for i in rest if 0 < cov[i] < PRODUCT_COVERAGE],
    }


def start(work: Path, broker: Broker, bundle: Path, source: str, no_item: str) -> Daemon:
    config = write_config(
        work / f"c{time.monotonic_ns()}.toml",
        broker,
        bundle,
        source,
        work / "state",
        f"\n[no_item]\n{no_item}\n",
    )
    daemon = Daemon(load_config(config))
    daemon.start()
    if not daemon.link.connected.wait(10):
        raise SystemExit("the daemon did not connect to the broker")
    return daemon


def learn(
    work: Path, broker: Broker, bundle: Path, frames: list[np.ndarray], truth: dict, seconds: float
) -> dict:
    """learn_empty on the lead-in frames looped as a camera: the device's answer."""
    folder = work / "lead-in"
    folder.mkdir()
    for i in range(truth["lead_in"]):
        cv2.imwrite(str(folder / f"{i:04d}.png"), frames[i])  # lossless: the pixels the video source gives
    source = f'type = "folder"\npath = "{folder}"\nloop = true\npacing = "realtime"\nfps = {truth["fps"]}'
    rec = Recorder(broker.port)
    daemon = start(work, broker, bundle, source, "")
    try:
        rec.wait(lambda r: len(labels_of(r)) >= 3)
        rec.request("learn_empty", json.dumps({"seconds": seconds}).encode(), b"learn")
        if not rec.wait(lambda r: any(t == REPLIES for t, _, _ in r.messages), seconds + 30):
            raise SystemExit("no answer to learn_empty")
        answer = next(m for t, m, _ in rec.messages if t == REPLIES)
    finally:
        rec.close()
        daemon.shutdown()
    if not answer.get("ok"):
        raise SystemExit(f"learn_empty failed: {answer}")
    return answer["result"]


def score(work: Path, broker: Broker, bundle: Path, clip: Path, no_item: str) -> tuple[list[dict], dict]:
    """The daemon on the whole clip, every frame classified: its labels (one per frame) and final state."""
    rec = Recorder(broker.port)
    daemon = start(work, broker, bundle, f'type = "video"\npath = "{clip}"\npacing = "fast"', no_item)
    try:
        daemon.threads[0].join(600)  # the inference thread ends with the clip
        state = daemon.health.state()
        rec.wait(lambda r: len(labels_of(r)) >= state["labels"], 30)
        labels = labels_of(rec)
    finally:
        rec.close()
        daemon.shutdown()
    return labels, state


def figures(labels: list[dict], cats: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per category: the share published as a product, and the share taken for no item."""
    out = {}
    for name, frames in cats.items():
        product = sum(labels[i]["label"] is not None for i in frames)
        no_item = sum(labels[i].get("reason") == "no_item" for i in frames)
        out[name] = {
            "frames": len(frames),
            "as_product": product / len(frames),
            "no_item": no_item / len(frames),
        }
    return out


def mark_as_other_model(state_dir: Path) -> None:
    """The stored reference, said to be another model's: the next start re-embeds its thumbnails."""
    path = state_dir / REFERENCE_FILE
    ref = decode_reference(path.read_bytes())
    other = type(ref)(ref.embeddings, ref.thumbnails, "0" * 64, ref.learned_at)
    path.write_bytes(encode_reference(other))


def offline(bundle_path: Path, frames: list[np.ndarray], truth: dict, reps: int = 20) -> tuple[float, dict]:
    """NoItem learned on the lead-in's embeddings, in this process: median seconds of `judge` per frame,
    and per category the similarities nearest the threshold (the headroom on either side)."""
    bundle = read_bundle(bundle_path.read_bytes())
    classifier = Classifier(bundle, num_threads=1)
    embeddings = [classifier.outputs(preprocess(f, bundle.manifest.input))[1] for f in frames]
    with tempfile.TemporaryDirectory() as tmp:
        detector = NoItem(NoItemConfig(), Path(tmp))
        detector.serve(bundle)
        future = detector.learn(1e6)
        decision = Decision("accepted", "x", ("x",), (), ())
        now = time.monotonic()
        for e in embeddings[: truth["lead_in"]]:
            detector.judge(decision, e, Frame(frames[0], 0, now, 0.0, "lead-in"), bundle.sha256)
        detector._learning.until = now  # noqa: SLF001 - end it: the next frame is past its end
        detector.judge(decision, embeddings[0], Frame(frames[0], 0, now + 1, 0.0, "end"), bundle.sha256)
        threshold = future.result(0)["threshold"]
        frame = Frame(frames[0], 0, now + 2, 0.0, "timed")
        times = []
        for _ in range(reps):
            for e in embeddings:
                t0 = time.perf_counter()
                detector.judge(decision, e, frame, bundle.sha256)
                times.append(time.perf_counter() - t0)
        centroid = detector._matcher.centroid  # noqa: SLF001
    sims = np.array([float(unit(e) @ centroid) for e in embeddings])
    cats = categories(truth)
    headroom = {
        "threshold": threshold,
        "between products, lowest": float(sims[cats["between products"]].min()),
        "product, highest": float(sims[cats["product"]].max()),
        "partly visible, highest": float(sims[cats["partly visible"]].max()),
    }
    return statistics.median(times), headroom


def report(
    runs: dict[str, dict], learned: dict, rebuilt: dict, cost_s: float, invoke_ms: float, headroom: dict
) -> None:
    sims = learned["similarity"]
    print(
        f"\nlearned from {learned['frames']} lead-in frames: threshold {learned['threshold']} (similarity "
        f"min {sims['min']}, median {sims['median']}, max {sims['max']}); after re-embedding its "
        f"{learned['thumbnails']} thumbnails: threshold {rebuilt['threshold']} "
        f"(min {rebuilt['similarity_min']}, median {rebuilt['similarity_median']})\n"
    )
    first = next(iter(runs.values()))
    frames = {name: fig["frames"] for name, fig in first.items()}
    print(
        f"| run | between products ({frames['between products']}): published as a product | "
        f"product frames ({frames['product']}): still labelled | with a product label | "
        f"partly visible ({frames['partly visible']}): as product / no item |"
    )
    print("|---|---|---|---|---|")
    for name, fig in runs.items():
        b, p, part = fig["between products"], fig["product"], fig["partly visible"]
        print(
            f"| {name} | {b['as_product']:.1%} | {1 - p['no_item']:.1%} | {p['as_product']:.1%} | "
            f"{part['as_product']:.1%} / {part['no_item']:.1%} |"
        )
    print(
        "\nsimilarity to the learned empty belt: "
        + ", ".join(f"{k} {v:.4f}" for k, v in headroom.items())
        + " (every figure above the threshold is no item)"
    )
    print(
        f"cost: {cost_s * 1e6:.1f} µs per frame for the detector against an invoke median of "
        f"{invoke_ms:.2f} ms ({cost_s * 1000 / invoke_ms:.2%} of it)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True, help="a v3 bundle (with an embedding output)")
    parser.add_argument("--clip", type=Path, default=REPO / "examples" / "demo" / "belt.mp4")
    parser.add_argument("--learn-seconds", type=float, default=3.0, help="learn_empty's capture (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    frames, truth = read_clip(args.clip)
    cats = categories(truth)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Broker(port=free_port(), workdir=work)
        broker.start()
        try:
            learned = learn(work, broker, args.bundle, frames, truth, args.learn_seconds)
            runs, states = {}, {}
            for name, setting, switch in (
                ("learned on the line", 'publish = "event"', False),
                ("after a model switch (re-embedded thumbnails)", 'publish = "event"', True),
                ("no-item detection off", "enabled = false", False),
            ):
                if switch:
                    mark_as_other_model(work / "state")
                labels, states[name] = score(work, broker, args.bundle, args.clip, setting)
                if len(labels) != len(frames):
                    raise SystemExit(f"{name}: {len(labels)} labels for {len(frames)} frames")
                runs[name] = figures(labels, cats)
        finally:
            broker.stop()
    rebuilt = states["after a model switch (re-embedded thumbnails)"]["no_item"]["reference"]
    invoke_ms = states["learned on the line"]["invoke_ms_p50"]
    cost, headroom = offline(args.bundle, frames, truth)
    report(runs, learned, rebuilt, cost, invoke_ms, headroom)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "learned": learned,
                    "rebuilt": rebuilt,
                    "runs": runs,
                    "cost_s": cost,
                    "invoke_ms": invoke_ms,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
