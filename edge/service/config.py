"""The device configuration: one TOML file, validated by pydantic, unknown keys rejected.

Errors name the key and the line of the file (`config.toml:12: source.loop: ...`). Secrets never live in
the file: the broker password comes from `password_file` (a systemd credential works: LoadCredential=
puts it in $CREDENTIALS_DIRECTORY) or from an environment variable named by `password_env`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..kernel import emptybelt, prototypes
from ..kernel.thresholds import check_thresholds


class ConfigError(ValueError):
    """A configuration that cannot be used. The message names the key and the line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9_.-]+$")
AUTO_IN_FLIGHT_INVOKE_S = 0.010  # max_in_flight = "auto": 2 below this invoke time, 1 above


def _topic_level(value: str) -> str:
    if not _TOPIC_LEVEL.match(value):
        raise ValueError("must be a single MQTT topic level of letters, digits, '_', '.', '-'")
    return value


def _host(value: str) -> str:
    # A host name or address never holds spaces or control characters; one that does would only fail at
    # connect time, after `--validate-config` said valid.
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must be a host name or IP address (no spaces or control characters)")
    return value


class DeviceConfig(_Strict):
    id: str = Field(default_factory=lambda: os.uname().nodename.split(".")[0] or "device")
    site: str = "site"
    line: str = "line"
    # Model slots, outbox and snapshots live here (systemd: StateDirectory=taxonedge).
    state_dir: Path = Path("/var/lib/taxonedge")

    _check_levels = field_validator("id", "site", "line")(_topic_level)


class UpdateConfig(_Strict):
    """Model deployments (`[model.update]`): transport limits, self-test and the post-switch health window."""

    # A chunked transfer with no new chunk for this long asks the operator for the missing chunks, at most
    # `chunk_retries` times, then is rejected as truncated.
    chunk_timeout_s: float = Field(30.0, gt=0)
    chunk_retries: int = Field(3, ge=0)
    # file:// and https:// bundles: whole-download timeout and an extra CA file for private servers.
    fetch_timeout_s: float = Field(120.0, gt=0)
    fetch_ca_file: Path | None = None
    # Every bundle must carry a golden self-test set (outputs recorded on the host).
    require_golden: bool = True
    # Allowed difference in quantized output steps on the Edge TPU (the CPU must match exactly).
    edgetpu_tolerance: int = Field(2, ge=0)
    # How long loading a new model into the inference worker may take.
    switch_timeout_s: float = Field(60.0, gt=0)
    # After the switch: this many inferences on the new model must be healthy, within health_timeout_s;
    # 0 commits right after the switch.
    health_window: int = Field(20, ge=0)
    health_timeout_s: float = Field(120.0, gt=0)
    # Median latency budget in seconds; None: at most latency_factor x the old model's median plus
    # latency_slack_s (sub-millisecond medians jitter by milliseconds on a busy board).
    latency_budget_s: float | None = Field(None, gt=0)
    latency_factor: float = Field(3.0, ge=1.0)
    latency_slack_s: float = Field(0.05, ge=0.0)
    # The share of "unknown" decisions may rise at most this much over the old model's.
    max_unknown_rate_increase: float = Field(0.25, ge=0.0, le=1.0)
    # How often model.watch_dir is scanned for dropped bundles.
    watch_interval_s: float = Field(2.0, gt=0)


class ModelConfig(_Strict):
    # The bundle to start with when the state directory holds no installed model yet.
    bundle: Path | None = None
    public_key: Path | None = None
    # Bundles must carry a valid signature from `public_key`; turning this off must be explicit.
    require_signature: bool = True
    # Override the bundle's per-depth thresholds: {depth_1 = 0.9, depth_2 = 0.8}.
    thresholds: dict[str, float] = {}
    top_k: int = Field(3, ge=1, le=20)
    # Bundles dropped here are verified and installed like an MQTT deployment.
    watch_dir: Path | None = None
    # Taxonomy changes a deployment may bring: "same" (identical hash) or "any".
    taxonomy_policy: Literal["same", "any"] = "same"
    compatible: str = "taxonedge-classifier-v1"
    max_bundle_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    update: UpdateConfig = UpdateConfig()

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        return check_thresholds(v)

    @model_validator(mode="after")
    def _key_when_required(self) -> ModelConfig:
        if self.require_signature and self.public_key is None:
            raise ValueError(
                "require_signature is true but no public_key is set: set model.public_key to the "
                "operator's signing key, or set model.require_signature = false explicitly"
            )
        return self


class CameraSource(_Strict):
    type: Literal["camera"]
    device: int | str = 0  # V4L2 index or /dev/videoN
    width: int | None = None
    height: int | None = None
    fps: float | None = None


class StreamSource(_Strict):
    type: Literal["stream"]
    url: str  # rtsp://, http://

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not re.match(r"^(rtsp|rtsps|http|https)://", v):
            raise ValueError("must start with rtsp://, rtsps://, http:// or https://")
        return v


class VideoSource(_Strict):
    type: Literal["video"]
    path: Path
    loop: bool = False
    # "realtime": paced at the file's frame rate like a camera; "fast": as fast as inference takes frames.
    pacing: Literal["realtime", "fast"] = "realtime"


class FolderSource(_Strict):
    type: Literal["folder"]
    path: Path
    loop: bool = False
    pacing: Literal["realtime", "fast"] = "fast"
    fps: float = Field(10.0, gt=0)


SourceType = Annotated[CameraSource | StreamSource | VideoSource | FolderSource, Field(discriminator="type")]


class SourceConfig(_Strict):
    """The capture settings around the source itself."""

    # Region of interest [x, y, width, height] in pixels, cropped before preprocessing.
    roi: tuple[int, int, int, int] | None = None
    # No frame for this long counts as a stall: the source is reopened.
    stall_timeout_s: float = Field(10.0, gt=0)
    reconnect_initial_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)

    @field_validator("roi", mode="before")
    @classmethod
    def _roi(cls, value: object) -> object:
        # Checked here so that a wrong roi gets one line saying what a roi is, not pydantic's
        # "capture.roi.3: Field required"; and a crop that can never fit fails now, not on every frame.
        if value is None:
            return value
        if (
            not isinstance(value, list | tuple)
            or len(value) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(f"expected 4 whole numbers [x, y, width, height] in pixels, got {value!r}")
        x, y, width, height = value
        if x < 0 or y < 0 or width <= 0 or height <= 0:
            raise ValueError(f"x and y must be >= 0, width and height > 0; got {list(value)}")
        return value


class TriggerConfig(_Strict):
    mode: Literal["continuous", "item"] = "continuous"
    max_rate_hz: float = Field(30.0, gt=0)
    frames_per_item: int = Field(5, ge=1, le=100)
    vote_agreement: float = Field(0.6, gt=0, le=1)
    item_timeout_s: float = Field(5.0, gt=0)
    # Items triggered while one is voted on wait here; past this many the oldest is labelled at once as
    # `unknown` with reason `overflow` (it has long left the camera's view), so every trigger gets a label.
    max_waiting: int = Field(100, ge=1, le=100_000)


class InferenceConfig(_Strict):
    # "auto" (the accelerators edge/kernel/backends/ knows, then the CPU) or one backend's name (a plug-in's
    # too)
    backend: str = "auto"
    edgetpu_device: str | None = None  # "usb", "usb:0", "pci:0"
    num_threads: int | None = Field(None, ge=1, le=64)
    reprobe_interval_s: float = Field(60.0, gt=0)
    invoke_timeout_s: float = Field(5.0, gt=0)
    warmup_runs: int = Field(3, ge=0)
    # Frames at the worker at once in continuous mode. 1: the next frame is decoded and preprocessed while
    # one is inferred and handed over as soon as the answer is back (the worker idles for the pipe, 0.3-0.5
    # ms a frame). 2: it waits at the worker instead, so the worker never idles, at up to one more invoke
    # of latency when inference cannot keep up with the camera (none when it can). "auto": 2 while the
    # invoke is short (under AUTO_IN_FLIGHT_INVOKE_S: an Edge TPU, a fast CPU), where that idle time is
    # 5-15 % of the throughput and an invoke of latency is little; 1 for a slow invoke (a Pi's CPU), where
    # it is the other way round. Item mode always uses 1.
    max_in_flight: Literal[1, 2, "auto"] = "auto"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from ..kernel import backends  # light: each backend module loads its native code only when opened

        known = ["auto", *backends.names()]
        if value not in known:
            raise ValueError(f"{value!r} is not a backend here; known: {', '.join(known)}")
        return value

    def in_flight_limit(self, invoke_s: float) -> int:
        """Frames at the worker at once in continuous mode, given the invoke's moving average (0: none
        yet)."""
        if self.max_in_flight != "auto":
            return self.max_in_flight
        return 2 if 0 < invoke_s < AUTO_IN_FLIGHT_INVOKE_S else 1

    def interpreter_threads(self) -> int:
        """num_threads, else one less than the CPUs this process may use (at least 1): capture, preprocessing
        and MQTT need a core of their own, or they take it from the interpreter at a worse moment
        (bench/bench_daemon.py measures both on the same machine)."""
        if self.num_threads is not None:
            return self.num_threads
        return max(1, len(os.sched_getaffinity(0)) - 1)


class TlsConfig(_Strict):
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


class MqttConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["v5", "v311"] = "v5"
    prefix: str = "taxonedge"
    # Default: taxonedge-<device>-<random>, unique per process so two daemons never kick each other off.
    client_id: str | None = None
    keepalive_s: int = Field(30, ge=5)
    label_expiry_s: int | None = Field(60, ge=1)
    will_delay_s: int = Field(5, ge=0)
    stats_interval_s: float = Field(10.0, gt=0)
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: TlsConfig | None = None
    # Extra topics this device takes model deployments from (fleet groups), besides its own.
    groups: list[str] = []

    _check_prefix = field_validator("prefix")(_topic_level)
    _check_host = field_validator("host")(_host)

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        return [_topic_level(g) for g in v]

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        if self.password_file and self.password_env:
            raise ValueError("set password_file or password_env, not both")
        return self

    def password(self) -> str | None:
        """The broker password from its file (or systemd credential) or environment variable."""
        if self.password_file is not None:
            path = self.password_file
            if not path.is_absolute() and os.environ.get("CREDENTIALS_DIRECTORY"):
                path = Path(os.environ["CREDENTIALS_DIRECTORY"]) / path
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"mqtt.password_file: cannot read {path}: {exc.strerror or exc}") from None
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env: environment variable {self.password_env} is not set")
            return value
        return None


class OutboxConfig(_Strict):
    path: Path | None = None  # default: <state_dir>/outbox.sqlite
    max_messages: int = Field(100_000, ge=10)


class HealthConfig(_Strict):
    prometheus_port: int | None = Field(None, ge=1, le=65535)
    prometheus_host: str = "127.0.0.1"
    # WATCHDOG=1 is only sent while a frame and an inference happened within this window.
    progress_timeout_s: float = Field(30.0, gt=0)

    _check_host = field_validator("prometheus_host")(_host)


class DriftConfig(_Strict):
    """Drift monitoring (`[drift]`, edge/service/drift.py): the labels of the last `window` decisions against
    the bundle's calibration figures; `status` turns degraded when one is more than `tolerance` off."""

    enabled: bool = True
    window: int = Field(500, ge=10, le=100_000)  # labels; bounded: the tracker keeps one entry per label
    # Fewer labels than this in the window are too few to tell drift from chance: no warning yet.
    min_samples: int = Field(200, ge=1)
    # Absolute share: 0.15 warns when 2 % unknown at calibration became more than 17 %.
    tolerance: float = Field(0.15, gt=0, le=1)

    @field_validator("min_samples")
    @classmethod
    def _within_window(cls, value: int, info: ValidationInfo) -> int:
        # `window` is validated first (field order): absent from info.data only when it was itself wrong.
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(
                f"must be at most drift.window ({window}): the window never holds more labels than that, "
                "so the check would never run"
            )
        return value


class NoItemConfig(_Strict):
    """Frames without a product (`[no_item]`, edge/service/noitem.py): close to the empty belt learned with
    `learn_empty` (`taxonedge empty-belt`), or labelled at or under a trained background class."""

    enabled: bool = True
    # Continuous mode: "event" publishes a no-item frame as `unknown` with reason `no_item`; "none" publishes
    # nothing for it (counted in stats: no_item_withheld). Item mode always labels every item.
    publish: Literal["none", "event"] = "event"
    # The similarity threshold comes from the captured empty-belt frames only: the lowest similarity of a
    # captured frame to their mean, less `margin`, and never below `min_similarity`; the rule and the
    # defaults are edge/kernel/emptybelt.py's, which `taxonedge evaluate --belt` uses too.
    margin: float = Field(emptybelt.MARGIN, ge=0, le=1)
    min_similarity: float = Field(emptybelt.MIN_SIMILARITY, ge=0, le=1)
    # A taxonomy node (e.g. "Background"): a decision whose label is this node or below it is no item.
    background_label: str | None = Field(None, min_length=1)


class EnrollConfig(_Strict):
    """Products enrolled on the device (`[enroll]`, edge/service/enrollment.py, `taxonedge enroll`). An
    enrolled product decides a frame when the cosine similarity of the frame's embedding to its prototype
    is at least `min_similarity` and beats by `margin` the similarity to the centroids of the `rivals`
    trained classes the model ranks highest (so a trained product keeps its label). Both are measured in
    the bundle's whitened embedding space (edge/kernel/prototypes.py; a bundle without one: raw cosine,
    where the old 0.6 and 0.05 fit better); the defaults are prototypes.py's, measured in
    docs/benchmarks.md "Enrolled products". A negative margin lets an enrolled product win a near tie."""

    enabled: bool = True
    min_similarity: float = Field(prototypes.MIN_SIMILARITY, ge=0, le=1)
    margin: float = Field(prototypes.MARGIN, ge=-1, le=1)
    rivals: int = Field(prototypes.RIVALS, ge=1, le=100)
    min_photos: int = Field(1, ge=1, le=32)


class Config(_Strict):
    device: DeviceConfig = DeviceConfig()
    model: ModelConfig
    source: SourceType
    capture: SourceConfig = SourceConfig()
    trigger: TriggerConfig = TriggerConfig()
    inference: InferenceConfig = InferenceConfig()
    mqtt: MqttConfig = MqttConfig()
    outbox: OutboxConfig = OutboxConfig()
    health: HealthConfig = HealthConfig()
    drift: DriftConfig = DriftConfig()
    no_item: NoItemConfig = NoItemConfig()
    enroll: EnrollConfig = EnrollConfig()

    @property
    def topic_base(self) -> str:
        from ..kernel.protocol import device_base

        return device_base(self.mqtt.prefix, self.device.site, self.device.line, self.device.id)

    @property
    def outbox_path(self) -> Path:
        return self.outbox.path or self.device.state_dir / "outbox.sqlite"


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(_decode(data, str(path)), str(path))


def _decode(data: bytes, where: str) -> str:
    """The file's text; a byte that is not UTF-8 (TOML files are UTF-8) is named by line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{where}:{line}:{column}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}): TOML files must be UTF-8; save the file as UTF-8"
        ) from None


def parse_config(text: str, where: str = "config") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {one_line(str(exc))}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{where}: not valid TOML: arrays or inline tables nested too deeply") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if not _is_union_tag(p, data)]
            key = one_line(".".join(loc)) or "(top level)"
            line = _find_line(text, loc)
            prefix = f"{where}:{line}" if line else where
            msg = err["msg"]
            if err["type"] == "value_error":  # our validators' own words, without pydantic's "Value error, "
                msg = str(err["ctx"]["error"])
            elif err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see examples/config.toml for every key)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            lines.append(f"{prefix}: {key}: {one_line(msg)}")
        raise ConfigError("\n".join(lines)) from None


def one_line(text: str) -> str:
    """`text` with its control characters escaped (`\\n`, `\\x0c`): quoted TOML keys and values, and the
    paths they name, may hold them, and one problem must stay one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _is_union_tag(part: object, data: dict) -> bool:
    # pydantic puts the discriminator value ("video") into the error location; it is not a key.
    source = data.get("source")
    return isinstance(source, dict) and part == source.get("type") and part not in source


def _find_line(text: str, loc: list[str]) -> int | None:
    """The 1-based line of the key at `loc` ([table..., key]) in the TOML text, as near as can be told."""
    lines = text.splitlines()
    table: list[str] = []
    best: int | None = None
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        header = re.fullmatch(r"\[\s*([^\]]+?)\s*\]", line)
        if header:
            table = [p.strip().strip('"') for p in header.group(1).split(".")]
            if table == loc[: len(table)] and len(table) == len(loc):
                best = best or number
            continue
        match = re.match(r'^("?)([A-Za-z0-9_.-]+)\1\s*=', line)
        if not match:
            continue
        key_path = table + match.group(2).split(".")
        if key_path == loc[: len(key_path)]:
            return number
    if best is None and len(loc) > 1:
        return _find_line(text, loc[:-1])
    return best
