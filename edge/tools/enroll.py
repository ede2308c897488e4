"""`taxonedge enroll` and `taxonedge enrolled`: add a product to a running line from a few photos (or from
the next N items on the belt, `--from-belt N`), and list, rename, remove or export what a device has
enrolled (edge/service/enrollment.py, docs/mqtt.md "Enrolled products").

Photos are read and checked here first (an unreadable one stops the command before anything is sent),
scaled to at most 512 px on the short side and sent as JPEG in the device's `enroll` command. `export`
writes the enrolled photos in the training data layout (OUT/<label path>/<n>.jpg), so the next
`taxonedge train` includes them: the loop that turns enrollments into a retrained model.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

from taxonedge.cli import CliError

from .deploy import EXIT_FAILED, EXIT_TIMEOUT
from .request import device_target, send_command

SHORT_SIDE = 512


def photo_payload(path: Path) -> str:
    """A photo as the device wants it: base64 JPEG, short side at most SHORT_SIDE; CliError if unreadable."""
    import cv2

    from ..kernel.preprocess import ImageError, read_image, shrink

    try:
        image = read_image(path)
    except ImageError as exc:
        raise CliError(f"{exc}; nothing was sent") from None
    ok, data = cv2.imencode(".jpg", shrink(image, SHORT_SIDE), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise CliError(f"{path}: could not be encoded as JPEG; nothing was sent")
    return base64.b64encode(data.tobytes()).decode("ascii")


def enroll_command(args: Any) -> int:
    """Exit 0 when the product is enrolled (in force on the device), 1 refused, 3 no answer, 2 bad input."""
    target = device_target(args.target)
    payload, wait = _enroll_request(args)
    answer = send_command(args, target, "enroll", payload, wait)
    return _report(target, "enroll", answer, args, _enrolled_line)


def _enroll_request(args: Any) -> tuple[dict, float]:
    """The `enroll` payload for photos, --from-belt or --cancel, and how long to wait for its answer."""
    if args.cancel:
        if args.photos or args.from_belt is not None:
            raise CliError("--cancel takes no photos and no --from-belt")
        return {"cancel": True}, args.timeout
    if not args.label:
        raise CliError("give the product's --label A/B/C")
    if args.from_belt is not None:
        if args.photos:
            raise CliError("give photos or --from-belt N, not both")
        payload = {"label": args.label, "from_belt": args.from_belt, "timeout_s": args.belt_timeout}
        return payload, args.belt_timeout + args.timeout  # the items come first, then the answer
    if not args.photos:
        raise CliError("give the product's photos (JPEG or PNG files), or --from-belt N")
    return {"label": args.label, "photos": [photo_payload(Path(p)) for p in args.photos]}, args.timeout


def enrolled_command(args: Any) -> int:
    target = device_target(args.target)
    payload: dict = {"action": args.action}
    if args.action in ("remove", "rename") or (args.action == "export" and args.label):
        if not args.label:
            raise CliError(f"enrolled {args.action} needs --label")
        payload["label"] = args.label
    if args.action == "rename":
        if not args.to:
            raise CliError("enrolled rename needs --to NEW/LABEL")
        payload["to"] = args.to
    if args.action == "export" and not args.out:
        raise CliError("enrolled export needs --out DIR (photos are written in the training data layout)")
    answer = send_command(args, target, "enrolled", payload, args.timeout)
    if args.action == "export" and answer is not None and answer.get("ok"):
        written = export_photos(answer.get("result") or {}, Path(args.out))
        print(f"{target}: wrote {written} photos to {args.out} (train with --data {args.out})")
        return 0
    return _report(target, "enrolled", answer, args, _list_lines)


def export_photos(result: dict, out: Path) -> int:
    """The exported products as OUT/<label path>/<n>.jpg; returns how many photos were written."""
    written = 0
    for product in result.get("products", []):
        folder = out.joinpath(*str(product["label"]).split("/"))
        folder.mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(product.get("photos", [])):
            (folder / f"enrolled-{i:03d}.jpg").write_bytes(base64.b64decode(photo))
            written += 1
    return written


def _report(target: str, name: str, answer: dict | None, args: Any, lines: Any) -> int:
    if answer is None:
        print(
            f"{target}: no answer to {name} within {args.timeout:g} s: is the device running and connected "
            "to this broker?",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    if args.json:
        print(json.dumps(answer))
    elif answer.get("ok"):
        print(lines(target, answer.get("result") or {}))
    if not answer.get("ok"):
        print(f"{target}: {name} refused: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _enrolled_line(target: str, result: dict) -> str:
    if "cancelled" in result:
        c = result["cancelled"]
        return f"{target}: belt enrollment of {c['label']} cancelled after {c['items']} of {c['of']} items"
    items = result.get("items")
    source = f"{len(items)} items on the belt in {result.get('seconds')} s" if items else "photos"
    count = "" if items else f"{result.get('photos')} "
    line = (
        f"{target}: enrolled {result.get('label')} from {count}{source}; in force now "
        f"({result.get('products')} enrolled products)"
    )
    # what the line labelled the captured items: the operator sees at once if a wrong one was among them
    rows = [f"  item {i['item_id']}: {i['label'] or 'unknown'} ({i['decision']})" for i in items or []]
    return "\n".join([line, *rows])


def _list_lines(target: str, result: dict) -> str:
    products = result.get("products", [])
    if not products:
        return f"{target}: no enrolled products"
    rows = [f"{target}: {len(products)} enrolled products"]
    rows += [f"  {p['label']}  ({p['photos']} photos, {p['source']}, {p['enrolled_at']})" for p in products]
    return "\n".join(rows)
