"""The wire contract of a device: its topics and the messages it publishes, as typed dictionaries.

The daemon builds its messages as these TypedDicts (static types, no cost per frame); the JSON Schemas in
edge/kernel/schemas/ are generated from them (`python -m taxonedge.edge.kernel.protocol` rewrites them, and
tests/test_protocol.py keeps the committed copies equal to the generated ones). To add a field to a
message: add it here, regenerate, document it in docs/mqtt.md.

Inputs are parsed here too (`parse_json_object`, `check_text`): every topic the device reads goes through
them, so that no payload (bad UTF-8, lone surrogates, deep nesting, huge numbers) can raise past them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import NotRequired, TypedDict

LABEL_SCHEMA = "taxonedge.label/1"
MAX_ID_CHARS = 128  # item ids and command ids
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

Score = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
UtcMs = Annotated[
    str, Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$", description="UTC, milliseconds")
]
Backend = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9_-]{1,32}$",
        description=(
            "the inference backend that produced it: cpu, edgetpu or another plug-in's name "
            "(edge/kernel/backends/); "
            "unknown when none was told"
        ),
    ),
]
UnknownReason = Literal[
    "low_confidence",
    "unfamiliar",
    "no_item",
    "no_frames",
    "timed_out",
    "overflow",
    "shutdown",
    "source_ended",
]
_STRICT = ConfigDict(extra="forbid")


# ---- topics ---------------------------------------------------------------------------------------
def device_base(prefix: str, site: str, line: str, device: str) -> str:
    """`<prefix>/<site>/<line>/<device>`: every topic of one device lives under it."""
    return f"{prefix}/{site}/{line}/{device}"


@dataclass(frozen=True)
class DeviceTopics:
    """Every topic of one device, by name: the one place their strings are spelled (docs/mqtt.md)."""

    base: str

    @property
    def labels(self) -> str:
        return f"{self.base}/labels"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    @property
    def trigger(self) -> str:
        return f"{self.base}/trigger"

    @property
    def commands(self) -> str:
        """The filter for every command; a command's name is the last level."""
        return f"{self.base}/cmd/+"

    def command(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def command_name(self, topic: str) -> str | None:
        prefix = f"{self.base}/cmd/"
        return topic[len(prefix) :] if topic.startswith(prefix) else None

    def response(self, name: str) -> str:
        """Where a command is answered when its request named no (allowed) response topic."""
        return f"{self.base}/cmd/{name}/response"

    @property
    def deploy(self) -> str:
        return f"{self.base}/model/deploy"

    def deploy_progress(self, deployment_id: str) -> str:
        """A deployment's progress; `deploy_progress(DEPLOY_REJECTED)` answers unreadable requests."""
        return f"{self.base}/model/deploy/{deployment_id}"


DEPLOY_REJECTED = "rejected"  # the progress topic's last level for requests that could not be read


def group_deploy(prefix: str, group: str) -> str:
    """A fleet group's deployment topic (devices listing the group in mqtt.groups subscribe to it)."""
    return f"{prefix}/groups/{group}/deploy"


def deploy_chunk(deploy_topic: str, deployment_id: str, index: int) -> str:
    return f"{deploy_topic}/{deployment_id}/chunk/{index}"


def deploy_chunks(deploy_topic: str) -> str:
    """The filter for every chunk of every deployment on `deploy_topic`."""
    return f"{deploy_topic}/+/chunk/+"


def replies_prefix(prefix: str) -> str:
    """Where command and deployment answers go when a requester names a response topic of its own."""
    return f"{prefix}/replies/"


def response_topic_problem(topic: str, base: str, prefix: str) -> str | None:
    """Why a requester's response topic is refused, or None. Answers never go to the device's own tree (its
    labels, status, commands: a reply there would be a forged label or a command to itself), to a fleet
    group's deployment topics, to `$` system topics, or to a filter."""
    if not topic:
        return "it is empty"
    if any(c in topic for c in "+#\0") or topic.startswith("$"):
        return "a response topic cannot hold +, #, NUL or start with $"
    if topic == base or topic.startswith(f"{base}/"):
        return "it is one of the device's own topics"
    if topic.startswith(f"{prefix}/groups/"):
        return "it is a fleet group's deployment topic"
    return None


# ---- labels ---------------------------------------------------------------------------------------
class LevelEntry(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    depth: Annotated[int, Field(ge=1)]
    id: str
    name: str
    score: Score
    passed: bool


class TopKEntry(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    label: str
    score: Score


class VoteEntry(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    frames: Count
    agreeing: Count
    agreement: Score


class ModelRef(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    name: str
    version: str
    sha256: Sha256


class Label(TypedDict):
    """A label: one per classified frame (continuous) or per item (item mode), on `<base>/labels`, QoS 1,
    MQTT v5 message expiry. Delivery is at least once: de-duplicate by msg_id; boot_id + seq orders the
    labels of one daemon run and shows gaps."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    schema: Literal["taxonedge.label/1"]
    msg_id: Annotated[
        str, Field(pattern=r"^[0-9a-f]{32}$", description="unique per label, stable across re-sends")
    ]
    boot_id: Annotated[str, Field(min_length=1, description="changes on every daemon start")]
    seq: Annotated[int, Field(ge=1, description="1, 2, 3, ... within one boot_id")]
    device: str
    site: str
    line: str
    timestamp: Annotated[
        str,
        Field(
            pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$",
            description="UTC capture time of the (last) frame, milliseconds",
        ),
    ]
    item_id: Annotated[str | None, Field(description="the trigger's item id in item mode, else null")]
    label: Annotated[str | None, Field(description="the decided label path joined by '/', null when unknown")]
    path: list[str]
    levels: Annotated[
        list[LevelEntry],
        Field(
            description="the most probable node at each depth down the chosen path, including the first that "
            "failed its threshold"
        ),
    ]
    decision: Literal["accepted", "backed-off", "unknown"]
    reason: NotRequired[
        Annotated[
            UnknownReason,
            Field(
                description="only when decision is unknown: low_confidence (not even the top level passed), "
                "unfamiliar (the open-set check: the model's largest leaf logit is below the bundle's "
                "open_set threshold, as for a product it was not trained on), "
                "no_item (no product in view: the frame looks like the empty belt learned with learn_empty, "
                "or the model said the [no_item] background_label; for an item, most of its frames did), "
                "no_frames (an item got no frame: its inference failed), timed_out (item_timeout_s "
                "passed before any frame was classified), overflow (more than trigger.max_waiting items "
                "waited: the oldest gets this label at once), shutdown (the daemon stopped before the "
                "item's turn), source_ended (the video file or folder ended before the item's turn)"
            ),
        ]
    ]
    open_set_score: NotRequired[
        Annotated[
            float,
            Field(
                description="the largest leaf logit (format v3 bundles): how familiar the input looks to "
                "the model; below the bundle's open_set threshold the label is unknown (unfamiliar)"
            ),
        ]
    ]
    source: NotRequired[
        Annotated[
            Literal["enrolled"],
            Field(
                description="present when a product enrolled on the device (taxonedge enroll) decided the "
                "label instead of the model's trained classes"
            ),
        ]
    ]
    similarity: NotRequired[
        Annotated[
            float, Field(description="with source enrolled: cosine similarity to the product's prototype")
        ]
    ]
    top_k: list[TopKEntry]
    vote: VoteEntry | None
    model: ModelRef
    backend: Backend
    latency_ms: Annotated[
        float, Field(ge=0, description="capture of the frame to the label entering the outbox")
    ]
    inference_ms: Annotated[
        float, Field(ge=0, description="the interpreter's invoke time (0 for an item vote)")
    ]


# ---- status, model, stats -------------------------------------------------------------------------
class Status(TypedDict):
    """Retained on `<base>/status`: online / degraded while running; offline from the last will
    (reason "connection lost") or a clean stop (reason "stopped")."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    state: Literal["online", "degraded", "offline"]
    boot_id: str
    device: str
    reasons: NotRequired[list[str]]
    reason: NotRequired[Literal["connection lost", "stopped", "failed"]]
    backend: NotRequired[Backend | None]
    runtime: NotRequired[str | None]
    version: NotRequired[str]
    since: NotRequired[UtcMs]


class ModelDescription(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    name: str
    version: str
    sha256: Sha256
    taxonomy_hash: str


class ModelStatus(ModelDescription):
    """Retained on `<base>/model`: the model serving now."""

    signature: Literal["valid", "unsigned", "not checked"]
    backend: Backend | None
    since: UtcMs


class SourceStatus(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    state: str
    source: str
    frames: Count
    dropped: Count
    reconnects: Count
    stalls: Count
    corrupt: Count
    last_error: str | None


DriftFigure = Annotated[
    str,
    Field(
        pattern=r"^(depth_[1-9][0-9]*|accepted|backed_off|unknown)$",
        description="depth_N: the share of labels whose path reaches depth N (the calibration's coverage); "
        "accepted, backed_off, unknown: the share of each decision",
    ),
]

# Only those keys: patternProperties alone would let any other key through.
DriftFigures = Annotated[dict[DriftFigure, Score], Field(json_schema_extra={"additionalProperties": False})]


class Drift(TypedDict):
    """The labels of the last `window` decisions against the bundle's calibration figures
    (edge/service/drift.py). Shares are of labels, 0..1."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    enabled: bool
    window: Annotated[int, Field(ge=1, description="[drift] window: how many labels the figures cover")]
    count: Annotated[
        int,
        Field(
            ge=0,
            description="labels in the window now (since the start, the model switch or the "
            "threshold change that began it)",
        ),
    ]
    min_samples: Count
    tolerance: Score
    observed: Annotated[
        DriftFigures, Field(description="the figures over the window; empty while it is empty")
    ]
    expected: Annotated[
        DriftFigures | None,
        Field(
            description="the serving bundle's calibration figures (manifest metrics.backoff_deployed); "
            "null when the bundle has none"
        ),
    ]
    out_of_tolerance: Annotated[
        list[DriftFigure],
        Field(
            description="the figures more than `tolerance` from the expected ones (a figure stays listed "
            "until it is back within 80 % of the tolerance); empty while not checked"
        ),
    ]
    not_checked: Annotated[
        str | None,
        Field(
            description="why the figures are not compared now (checking off, no calibration figures, "
            "thresholds other than the calibrated ones, fewer than min_samples labels); null when they are"
        ),
    ]


Similarity = Annotated[float, Field(ge=-1, le=1, description="cosine similarity of embeddings")]


class NoItemReference(TypedDict):
    """The empty belt as learned by `learn_empty` (edge/service/noitem.py), for the model it was made with."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    frames: Annotated[int, Field(ge=1, description="embeddings of empty-belt frames in the reference")]
    thumbnails: Annotated[
        int, Field(ge=0, description="frames kept as JPEG to re-embed after a model switch")
    ]
    threshold: Annotated[
        Similarity,
        Field(description="a frame at least this similar to the empty belt is no item (from the captures)"),
    ]
    similarity_min: Similarity
    similarity_median: Similarity
    bundle_sha256: Annotated[Sha256, Field(description="the model whose embeddings these are")]
    learned_at: UtcMs


class NoItemLearning(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    frames: Annotated[int, Field(ge=0, description="empty-belt frames captured so far")]
    seconds_left: Annotated[float, Field(ge=0)]


class NoItemState(TypedDict):
    """No-item detection: its state, the reference in use and a learning in progress."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    enabled: bool
    active: Annotated[bool, Field(description="frames are compared with the empty belt now")]
    not_active: Annotated[
        str | None, Field(description="why frames are not compared with the empty belt; null when active")
    ]
    publish: Literal["none", "event"]
    background_label: str | None
    learning: Annotated[
        NoItemLearning | None, Field(description="while learn_empty runs: its progress; else null")
    ]
    reference: NoItemReference | None


class DeviceState(TypedDict):
    """The `state` command's result; `stats` adds fps, final and time."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    state: Literal["online", "degraded"]
    reasons: list[str]
    boot_id: str
    paused: bool
    backend: Backend | None
    runtime: str | None
    model: ModelDescription
    thresholds: dict[str, Score]
    source: SourceStatus
    frames_captured: Count
    frames_dropped: Annotated[
        int,
        Field(
            ge=0,
            description=(
                "frames replaced in the capture slot by a newer one while inference was busy with another "
                "frame"
            ),
        ),
    ]
    frames_idle: Annotated[
        int,
        Field(
            ge=0, description=("frames captured while nothing wanted one: item mode between items, or paused")
        ),
    ]
    frames_classified: Count
    labels: Count
    latency_ms_p50: Annotated[float, Field(ge=0)]
    latency_ms_p99: Annotated[float, Field(ge=0)]
    publish_latency_ms_p50: Annotated[float, Field(ge=0)]
    publish_latency_ms_p99: Annotated[float, Field(ge=0)]
    invoke_ms_p50: Annotated[float, Field(ge=0)]
    inference_errors: Count
    preprocess_errors: Count
    worker_restarts: Count
    edgetpu_reprobes: Count
    outbox_depth: Count
    outbox_evicted: Count
    outbox_expired: Count
    mqtt_connected: bool
    mqtt_error: str | None
    commands: Count
    control_dropped: Count
    triggers: Annotated[int, Field(ge=0, description="trigger messages accepted (each ends in one label)")]
    triggers_refused: Annotated[int, Field(ge=0, description="trigger messages refused (bad id): no label")]
    items_waiting: Count
    items_timed_out: Count
    items_overflowed: Count
    last_frame_time: UtcMs | None
    last_inference_time: UtcMs | None
    drift: Annotated[Drift, Field(description="label rates against the bundle's calibration figures")]
    no_item_frames: Annotated[
        int, Field(ge=0, description="classified frames judged to show no item (empty belt or background)")
    ]
    no_item_withheld: Annotated[
        int,
        Field(
            ge=0,
            description="of them, frames not published (continuous mode with publish none; item mode "
            "between items while learn_empty runs)",
        ),
    ]
    no_item: NoItemState
    enrolled: Annotated[
        EnrolledState, Field(description="products enrolled on the device (taxonedge enroll)")
    ]


class EnrolledCapture(TypedDict):
    """An `enroll` with `from_belt` in progress: the next triggered items are the product."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    label: str
    items: Annotated[int, Field(ge=0, description="items captured so far")]
    of: Annotated[int, Field(ge=1, description="items asked for (from_belt)")]
    seconds_left: Annotated[float, Field(ge=0, description="until the capture gives up (timeout_s)")]


class EnrolledState(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    products: Count
    decided: Annotated[int, Field(ge=0, description="frames an enrolled product decided")]
    problems: Annotated[
        list[str], Field(description="enrolled products the serving model no longer tells apart")
    ]
    capture: Annotated[
        EnrolledCapture | None,
        Field(description="a product being enrolled from the belt (enroll from_belt); null when none"),
    ]


class Stats(DeviceState):
    """On `<base>/stats` every stats_interval_s (QoS 0) and once at a clean stop (final, QoS 1)."""

    fps: Annotated[float, Field(ge=0)]
    final: bool
    time: UtcMs


# ---- commands -------------------------------------------------------------------------------------
class CommandAnswer(TypedDict):
    """The answer to `<base>/cmd/<name>`, on the request's response topic (or
    `<base>/cmd/<name>/response`)."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    ok: bool
    command: str
    result: NotRequired[dict[str, Any]]
    error: NotRequired[str]
    id: NotRequired[str | int]


# ---- deployments ----------------------------------------------------------------------------------
DeployState = Literal[
    "receiving",
    "received",
    "verifying",
    "staged",
    "warming",
    "self_test",
    "switched",
    "committed",
    "rejected",
    "rolled_back",
]
FINAL_STATES = ("committed", "rejected", "rolled_back")  # a deployment's outcome: retained, nothing follows


class DeployProgress(TypedDict):
    """A deployment's progress, retained on `<base>/model/deploy/<id>` when final, and sent to the
    request's response topic; also an unreadable request's rejection on `<base>/model/deploy/rejected`
    (`id` null when the request had none that could be read)."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: str | None
    device: str
    state: DeployState
    time: NotRequired[str]
    nonce: NotRequired[
        Annotated[
            str,
            Field(
                pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                description="the request's nonce (one per `taxonedge deploy` run): which request this "
                "answers",
            ),
        ]
    ]
    reason: NotRequired[str | None]
    repeat: NotRequired[bool]
    size: NotRequired[Count]
    slot: NotRequired[Literal["a", "b"]]
    model: NotRequired[ModelDescription]
    detail: NotRequired[str]
    count: NotRequired[Count]
    received: NotRequired[Count]
    chunks: NotRequired[Count]
    missing: NotRequired[list[Count]]


MESSAGES: dict[str, Any] = {
    "label": Label,
    "status": Status,
    "model": ModelStatus,
    "stats": Stats,
    "command-answer": CommandAnswer,
    "deploy-progress": DeployProgress,
}


def json_schema(name: str) -> dict:
    """The JSON Schema (2020-12) of one message, generated from its TypedDict."""
    schema = TypeAdapter(MESSAGES[name]).json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://taxonedge.example/schemas/{name}.schema.json",
        **schema,
    }


def write_schemas(folder: Path = SCHEMA_DIR) -> list[Path]:
    paths = []
    for name in MESSAGES:
        path = folder / f"{name}.schema.json"
        path.write_text(json.dumps(json_schema(name), indent=2) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def message_kind(topic: str, base: str) -> str | None:
    """Which message a topic under `base` carries (None: not one the device publishes)."""
    topics = DeviceTopics(base)
    kinds = {topics.labels: "label", topics.status: "status", topics.stats: "stats", topics.model: "model"}
    if topic in kinds:
        return kinds[topic]
    rest = topic[len(topics.deploy) + 1 :] if topic.startswith(f"{topics.deploy}/") else None
    if rest is not None and "/" not in rest:
        return "deploy-progress"
    name = topics.command_name(topic)
    if name is not None and name.endswith("/response") and topics.response(name[:-9]) == topic:
        return "command-answer"
    return None


# ---- inputs ---------------------------------------------------------------------------------------
class PayloadError(ValueError):
    """A payload the device refuses; the text says why in one line."""


def parse_json_object(payload: bytes, max_bytes: int, empty_ok: bool = True) -> dict:
    """A JSON object from an MQTT payload, or PayloadError. Never raises anything else: bad UTF-8, deep
    nesting (RecursionError inside json), huge integers and lone surrogates all become one line."""
    if len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes is over the {max_bytes}-byte limit")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload is not UTF-8 (byte {exc.start})") from None
    if not text:
        if empty_ok:
            return {}
        raise PayloadError("payload is empty")
    try:
        value = json.loads(text)
    except RecursionError:
        raise PayloadError("payload is nested too deeply") from None
    except ValueError as exc:
        raise PayloadError(f"payload is not JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise PayloadError("payload must be a JSON object")
    problem = _bad_text(value)
    if problem:
        raise PayloadError(problem)
    return value


def _bad_text(value: Any, depth: int = 0) -> str | None:
    """Lone surrogates (`"\\ud800"` in JSON) are not text: nothing could serialise them back as UTF-8."""
    if depth > 64:
        return "payload is nested too deeply"
    if isinstance(value, str):
        return None if _is_unicode(value) else "payload holds an invalid \\u escape (a lone surrogate)"
    items: list[Any] = []
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    for item in items:
        problem = _bad_text(item, depth + 1)
        if problem:
            return problem
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, what: str, max_chars: int = MAX_ID_CHARS) -> str:
    """An id sent by a client: a string of 1..max_chars printable characters, or an integer (its decimal
    text). Booleans, floats, null, lists and objects are refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise PayloadError(f"{what} must be a string or an integer, not {type(value).__name__}")
    if not 1 <= len(value) <= max_chars:
        raise PayloadError(f"{what} must have 1 to {max_chars} characters, not {len(value)}")
    if not _is_unicode(value) or not value.isprintable():
        raise PayloadError(f"{what} must be printable text (no control characters or lone surrogates)")
    return value


def json_bytes(payload: Any) -> bytes:
    """A message as compact UTF-8 JSON. Never raises on text: a string that is not valid Unicode (it
    cannot happen for inputs that went through this module, but a bug must not stop a daemon) is sent
    with ASCII escapes instead."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8", "backslashreplace")
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")


if __name__ == "__main__":
    for written in write_schemas(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR):
        print(written)
