"""The control plane beside the frame flow: incoming MQTT messages (commands, item triggers, our own retained
status, plugin topics) go through one bounded queue to one control thread, so a slow handler never holds
up the MQTT network thread and no handler runs twice at once.

Every command gets exactly one answer (protocol.CommandAnswer); every accepted trigger ends in exactly one
label (the pipeline's vote, or `overflow` here); a bad payload is refused with one line, never raised.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..kernel.files import atomic_write
from ..kernel.protocol import (
    CommandAnswer,
    DeviceTopics,
    PayloadError,
    check_text,
    parse_json_object,
    replies_prefix,
    response_topic_problem,
)
from .config import Config
from .enrolled import EnrollError, Product, check_label
from .enrollment import DEFAULT_BELT_TIMEOUT_S, MAX_BELT_TIMEOUT_S, MAX_PHOTOS, need_embedding
from .noitem import MAX_SECONDS as MAX_LEARN_SECONDS
from .pipeline import Pipeline
from .publish import utc_ms
from .serving import Serving

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 16 * 1024
# `enroll` carries its photos: `taxonedge enroll` sends them at most 512 px on the short side (about 50 kB)
MAX_ENROLL_BYTES = 4 * 1024 * 1024
MAX_SNAPSHOTS = 20
Handler = Callable[[str, bytes, Any], None]  # (topic, payload, MQTT v5 properties or None)


class CommandError(PayloadError):
    """A command that cannot be carried out; the text goes back in the answer."""


class Control:
    def __init__(
        self,
        config: Config,
        boot_id: str,
        serving: Serving,
        pipeline: Pipeline,
        publish: Callable[..., None],
        state: Callable[[], dict],
        status_changed: Callable[[bool], None],
    ):
        self.config = config
        self.base = config.topic_base
        self.topics = DeviceTopics(self.base)
        self.boot_id = boot_id
        self.serving = serving
        self.pipeline = pipeline
        self.publish = publish  # (topic, payload, qos=, retain=, properties=)
        self.state = state  # the `state` command's answer
        self.status_changed = status_changed  # publish status again (force=True: whatever it was)
        self.subscriptions: list[tuple[str, Handler]] = []  # plugin topics (edge/service/update.py)
        self._queue: queue.Queue[tuple[str, bytes, Any]] = queue.Queue(maxsize=1000)
        self.done = threading.Event()
        self.commands = 0
        self.control_dropped = 0
        self.triggers = 0
        self.triggers_refused = 0

    def topic_filters(self) -> list[str]:
        """What the device subscribes to after every (re)connect."""
        return [
            self.topics.commands,
            self.topics.trigger,
            self.topics.status,
            *(f for f, _ in self.subscriptions),
        ]

    def enqueue(self, topic: str, payload: bytes, properties: Any) -> None:
        """From the MQTT network thread: never blocks; a full queue drops and counts."""
        try:
            self._queue.put_nowait((topic, payload, properties))
        except queue.Full:
            self.control_dropped += 1

    def run(self) -> None:
        """The control thread, until `done`."""
        import paho.mqtt.client as paho

        while not self.done.is_set():
            try:
                topic, payload, props = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            plugin = [h for f, h in self.subscriptions if paho.topic_matches_sub(f, topic)]
            try:
                name = self.topics.command_name(topic)
                if topic == self.topics.trigger:
                    self.on_trigger(payload)
                elif topic == self.topics.status:
                    self.on_status(payload)
                elif name is not None and not plugin:
                    self.on_command(name, payload, props)
            except Exception:  # noqa: BLE001 - a bad message never kills the daemon
                log.exception("handling a message on %s failed", topic)
            for handler in plugin:
                try:
                    handler(topic, payload, props)
                except Exception:  # noqa: BLE001
                    log.exception("subscription handler for %s failed", topic)

    # ---- own status --------------------------------------------------------------------------------
    def on_status(self, payload: bytes) -> None:
        """Our own retained status as the broker has it: another boot's `offline` (its last will, delayed)
        must not stay there while this process runs."""
        try:
            status = parse_json_object(payload, MAX_COMMAND_BYTES)
        except PayloadError:
            status = {}
        if status.get("boot_id") != self.boot_id and not self.pipeline.stopping.is_set():
            log.info(
                "the broker holds a status of another boot (%r, %r): publishing ours again",
                status.get("boot_id"),
                status.get("state"),
            )
            self.status_changed(True)

    # ---- triggers ----------------------------------------------------------------------------------
    def on_trigger(self, payload: bytes) -> None:
        """An item id, as `{"item_id": "A-1234"}` or the plain id; an id is a string of printable text
        (1-128 characters) or an integer. Refused ones are counted and logged: they get no label."""
        trigger = self.pipeline.trigger
        if trigger is None:
            self._refuse_trigger(f"trigger.mode is {self.config.trigger.mode}, not item")
            return
        try:
            item_id = self._item_id(payload)
        except PayloadError as exc:
            self._refuse_trigger(f'{exc}: send {{"item_id": "..."}} or the plain id')
            return
        self.triggers += 1
        overflow = trigger.trigger(item_id)
        if overflow is not None:
            log.warning(
                "item %r: more than trigger.max_waiting = %d items waiting: labelled unknown (%s)",
                overflow.item_id,
                self.config.trigger.max_waiting,
                overflow.reason,
            )
            self.pipeline.publisher.publish_item(overflow, None, self.serving.bundle, self.serving.backend)
        self.pipeline.item_event.set()

    @staticmethod
    def _item_id(payload: bytes) -> str:
        if len(payload) > MAX_COMMAND_BYTES:
            raise PayloadError(f"payload of {len(payload)} bytes is over the {MAX_COMMAND_BYTES}-byte limit")
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise PayloadError(f"payload is not UTF-8 (byte {exc.start})") from None
        if not text.startswith("{"):
            return check_text(text, "item_id")
        data = parse_json_object(payload, MAX_COMMAND_BYTES)
        if "item_id" not in data:
            raise PayloadError('no "item_id" key')
        if set(data) - {"item_id"}:
            raise PayloadError(f"unknown keys {sorted(data.keys() - {'item_id'})}")
        return check_text(data["item_id"], "item_id")

    def _refuse_trigger(self, why: str) -> None:
        self.triggers_refused += 1
        level = (
            logging.WARNING
            if self.triggers_refused <= 10 or self.triggers_refused % 1000 == 0
            else logging.DEBUG
        )
        log.log(level, "trigger message refused (%s); %d refused so far", why, self.triggers_refused)

    # ---- commands ----------------------------------------------------------------------------------
    def on_command(self, name: str, payload: bytes, props: Any) -> None:
        """Answered on the request's response topic when that is allowed (protocol.response_topic_problem),
        else on `<base>/cmd/<name>/response`."""
        self.commands += 1
        response_topic, problem = self.topics.response(name), None
        candidate = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if isinstance(candidate, str) and candidate:
            refused = response_topic_problem(candidate, self.base, self.config.mqtt.prefix)
            if refused is None:
                response_topic = candidate
            else:
                problem = (
                    f"response topic {candidate!r} refused: {refused}; use one under "
                    f"{replies_prefix(self.config.mqtt.prefix)}"
                )
        properties = None
        if correlation is not None and self.config.mqtt.protocol == "v5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation

        def send(answer: CommandAnswer) -> None:
            self.publish(response_topic, answer, qos=1, properties=properties)

        self._answer(name, payload, problem, send)

    def _answer(
        self, name: str, payload: bytes, problem: str | None, send: Callable[[CommandAnswer], None]
    ) -> None:
        """Exactly one `send`: now, or, for a command that takes time (learn_empty), when it is done."""
        request_id = None
        try:
            args = parse_json_object(payload, MAX_ENROLL_BYTES if name == "enroll" else MAX_COMMAND_BYTES)
            if "id" in args:
                request_id = check_text(args.pop("id"), "id")
            handler = self.commands_by_name().get(name)
            if handler is None:
                known = ", ".join(sorted(self.commands_by_name()))
                raise CommandError(f"unknown command {name!r}; known: {known}")
            if problem:
                raise CommandError(problem)
            result = handler(args)
        except PayloadError as exc:
            send(_with_id({"ok": False, "command": name, "error": str(exc)}, request_id))
            return
        if isinstance(result, Future):  # answered from the thread that completes it, not this one
            result.add_done_callback(lambda done: send(_with_id(_outcome(name, done), request_id)))
            return
        send(_with_id({"ok": True, "command": name, "result": result}, request_id))

    def commands_by_name(self) -> dict[str, Callable[[dict], dict | Future]]:
        return {
            "pause": self._cmd_pause,
            "resume": self._cmd_resume,
            "set_thresholds": self._cmd_thresholds,
            "snapshot": self._cmd_snapshot,
            "state": self._cmd_state,
            "learn_empty": self._cmd_learn_empty,
            "forget_empty": self._cmd_forget_empty,
            "enroll": self._cmd_enroll,
            "enrolled": self._cmd_enrolled,
        }

    @staticmethod
    def _no_args(args: dict, allowed: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            what = f"it takes {', '.join(allowed)}" if allowed else "it takes no arguments"
            raise CommandError(f"unknown keys {unknown}: {what} (besides id)")

    def _cmd_state(self, args: dict) -> dict:
        self._no_args(args)
        return self.state()

    def _cmd_pause(self, args: dict) -> dict:
        self._no_args(args)
        self.pipeline.paused.set()
        self.status_changed(False)
        return {"paused": True}

    def _cmd_resume(self, args: dict) -> dict:
        self._no_args(args)
        self.pipeline.paused.clear()
        self.status_changed(False)
        return {"paused": False}

    def _cmd_thresholds(self, args: dict) -> dict:
        """{"depth_1": 0.8, ...}: override per-depth thresholds until restart (null resets one)."""
        values = args["thresholds"] if set(args) == {"thresholds"} else args
        depth = self.serving.bundle.taxonomy.depth
        usage = (
            f'send {{"depth_1": 0.8, ...}}: keys depth_1..depth_{depth}, values between 0 and 1, '
            "null resets one"
        )
        if not isinstance(values, dict) or not values:
            raise CommandError(usage)
        keys = {f"depth_{d}" for d in range(1, depth + 1)}
        for key, value in values.items():
            ok_value = value is None or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
            )
            if key not in keys or not ok_value:
                raise CommandError(f"{key} = {value!r}: {usage}")
        return {"thresholds": self.serving.set_thresholds(values)}

    def _cmd_learn_empty(self, args: dict) -> Future:
        """{"seconds": 30}: learn the empty belt from the frames of the next `seconds` (the operator keeps
        the belt empty); answered when done, with the frames captured, the threshold and the spread."""
        self._no_args(args, ("seconds",))
        seconds = args.get("seconds")
        usage = f'send {{"seconds": S}} with S from 1 to {MAX_LEARN_SECONDS:g}: how long the belt stays empty'
        if (
            not isinstance(seconds, int | float)
            or isinstance(seconds, bool)
            or not 1 <= seconds <= MAX_LEARN_SECONDS
        ):
            raise CommandError(f"seconds = {seconds!r}: {usage}")
        return self.pipeline.noitem.learn(float(seconds))

    def _cmd_enroll(self, args: dict) -> Future | dict:
        """{"label": "Packages/Milk/New-Brand", "photos": [base64 JPEG, ...]}: a new product, from its
        photos; {"label": ..., "from_belt": N, "timeout_s": S}: from the next N triggered items;
        {"cancel": true}: end a belt enrollment. Answered once the product is in force (the pipeline
        embeds its exemplars between frames)."""
        self._no_args(args, ("label", "photos", "from_belt", "timeout_s", "cancel"))
        if "cancel" in args:
            return self._cancel_enroll(args)
        if not self.config.enroll.enabled:
            raise CommandError("enrollment is off (enroll.enabled = false in the config)")
        if "from_belt" in args:
            return self._enroll_from_belt(args)
        if "timeout_s" in args:
            raise CommandError("timeout_s goes with from_belt (photos are answered at once)")
        photos = args.get("photos")
        if not isinstance(photos, list) or not all(isinstance(p, str) for p in photos):
            raise CommandError(
                'send {"label": "A/B/C", "photos": ["<base64 JPEG>", ...]} or {"label": "A/B/C", '
                '"from_belt": N}'
            )
        try:
            data = [base64.b64decode(p, validate=True) for p in photos]
        except ValueError:
            raise CommandError("photos: each must be a base64 string of a JPEG or PNG file") from None
        try:
            check_label(args.get("label"), self.serving.bundle.taxonomy)
            return self.pipeline.enrollment.submit(str(args["label"]), data)
        except EnrollError as exc:
            raise CommandError(str(exc)) from None

    def _enroll_from_belt(self, args: dict) -> Future:
        """The next `from_belt` triggered items are the product. Item mode only: in continuous mode a frame
        is not an item (N frames would be a fraction of a second of one product, N near-copies), and no
        trigger says where one item ends; photos (cmd/snapshot) serve there."""
        if "photos" in args:
            raise CommandError("send photos or from_belt, not both")
        count, timeout = args["from_belt"], args.get("timeout_s", DEFAULT_BELT_TIMEOUT_S)
        if not _is_int(count) or not 1 <= count <= MAX_PHOTOS:
            raise CommandError(f"from_belt = {count!r}: the number of items to capture, 1 to {MAX_PHOTOS}")
        if not _is_number(timeout) or not 1 <= timeout <= MAX_BELT_TIMEOUT_S:
            raise CommandError(
                f"timeout_s = {timeout!r}: seconds to wait for the items, 1 to {MAX_BELT_TIMEOUT_S:g}"
            )
        if self.pipeline.trigger is None:
            raise CommandError(
                f"from_belt needs trigger.mode = item (it is {self.config.trigger.mode}): a triggered item "
                "is what is captured; enroll from photos instead (cmd/snapshot takes them)"
            )
        bundle = self.serving.bundle
        try:
            need_embedding(bundle)  # refused now, not after N items
            label = check_label(args.get("label"), bundle.taxonomy)
            return self.pipeline.enrollment.capture(label, count, float(timeout))
        except EnrollError as exc:
            raise CommandError(str(exc)) from None

    def _cancel_enroll(self, args: dict) -> dict:
        if set(args) != {"cancel"} or args["cancel"] is not True:  # 1 == True in Python: not a cancel here
            raise CommandError('send {"cancel": true} alone to end a belt enrollment')
        cancelled = self.pipeline.enrollment.cancel_capture("cancelled by command")
        if cancelled is None:
            raise CommandError("no belt enrollment is under way")
        return {"cancelled": cancelled}

    def _cmd_enrolled(self, args: dict) -> dict:
        """{"action": "list" | "export" | "remove" | "rename", "label": ..., "to": ...}: the enrolled
        products, their photos (export: the training data of the next model), or one of them changed."""
        action = args.get("action", "list")
        store = self.pipeline.enrollment.store
        try:
            if action == "list":
                self._no_args(args, ("action",))
                return {"products": [_product(p) for p in store.products()]}
            if action == "export":
                self._no_args(args, ("action", "label"))
                photos: dict[str, list[str]] = {}
                for _, label, jpeg in store.thumbnails(args.get("label")):
                    photos.setdefault(label, []).append(base64.b64encode(jpeg).decode("ascii"))
                return {"products": [{"label": k, "photos": v} for k, v in sorted(photos.items())]}
            if action == "remove":
                self._no_args(args, ("action", "label"))
                store.remove(str(args.get("label")))
            elif action == "rename":
                self._no_args(args, ("action", "label", "to"))
                store.rename(
                    str(args.get("label")), check_label(args.get("to"), self.serving.bundle.taxonomy)
                )
            else:
                raise CommandError(f"action {action!r}: one of list, export, remove, rename")
        except EnrollError as exc:
            raise CommandError(str(exc)) from None
        self.pipeline.enrollment.changed()
        return {"products": [_product(p) for p in store.products()]}

    def _cmd_forget_empty(self, args: dict) -> dict:
        self._no_args(args)
        return self.pipeline.noitem.forget()

    def _cmd_snapshot(self, args: dict) -> dict:
        import cv2

        self._no_args(args, ("inline",))
        frame = self.pipeline.last_frame
        if frame is None:
            raise CommandError("no frame captured yet")
        ok, jpeg = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise CommandError("the frame could not be encoded")
        data = jpeg.tobytes()
        folder = Path(self.config.device.state_dir) / "snapshots"
        path = folder / f"snapshot-{utc_ms(frame.wall).replace(':', '')}.jpg"
        atomic_write(path, data)
        for old in sorted(folder.glob("snapshot-*.jpg"))[:-MAX_SNAPSHOTS]:  # bounded, oldest go first
            old.unlink(missing_ok=True)
        result = {
            "path": str(path),
            "bytes": len(data),
            "frame": frame.origin,
            "captured_at": utc_ms(frame.wall),
        }
        if args.get("inline") is True:
            result["jpeg_base64"] = base64.b64encode(data).decode("ascii")
        return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _with_id(answer: CommandAnswer, request_id: str | None) -> CommandAnswer:
    if request_id is not None:
        answer["id"] = request_id
    return answer


def _product(product: Product) -> dict:
    return {
        "label": product.label,
        "photos": product.exemplars,
        "source": product.source,
        "enrolled_at": utc_ms(product.created),
    }


def _outcome(name: str, done: Future) -> CommandAnswer:
    """The answer of a command that finished later: its result, or the error it ended with."""
    error = done.exception()
    if error is None:
        return {"ok": True, "command": name, "result": done.result()}
    return {"ok": False, "command": name, "error": str(error)}
