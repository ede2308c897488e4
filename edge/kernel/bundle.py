"""Model bundles, format v3 (v1, v2 still read): the one reader and writer for both the host and the device.

A bundle is one uncompressed tar file:

    manifest.json          what the model is and how to feed and read it (`Manifest`)
    model.tflite           the CPU model (full int8 unless the manifest says otherwise)
    model_<backend>.<ext>  optional, the same model compiled for an accelerator backend
                           (edge/kernel/backends/), e.g. model_edgetpu.tflite from edgetpu_compiler;
                           `artifacts` in the manifest names each backend's file (v2; a v1 bundle's are
                           derived from its file names)
    golden.npz             optional, self-test inputs and the exact outputs the CPU interpreter gave
    manifest.sig           optional, Ed25519 signature over the exact bytes of manifest.json
    SHA256SUMS             sha256 of manifest.json and manifest.sig, so damage to them is caught unsigned

The manifest lists the sha256 and size of every other file (except the signature, which covers the
manifest). Reading verifies all of it, and that the tar framing is exactly what the writer produces (so
one flipped byte anywhere is caught), and rejects anything unexpected with a message naming the file and
what was expected. Writing goes to a temporary name, is fsynced, then renamed: never a half-written bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zipfile
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .files import atomic_write
from .preprocess import InputSpec
from .prototypes import EmbeddingSpace, Whitening
from .signing import Ed25519PrivateKey, Ed25519PublicKey, key_id, sign, verify
from .taxonomy import Taxonomy, TaxonomyError
from .thresholds import check_thresholds

FORMAT = "taxonedge-bundle"
FORMAT_VERSION = 3
# v1: no `artifacts` (derived from the file names when read); v2: leaf probabilities only; v3: leaf logits
# (softmax on the device, in float), an optional embedding output and an open-set threshold.
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CHECKSUMS = "SHA256SUMS"
MODEL = "model.tflite"
MODEL_EDGETPU = "model_edgetpu.tflite"
GOLDEN = "golden.npz"
CENTROIDS = "centroids.npz"  # v3, optional: per trained leaf, the mean embedding of its training images
# ... and, optionally, the whitening enrolled products are matched in, with the centroids in that space
WHITENING_KEYS = ("whitened_centroids", "whiten_mean", "whiten_basis", "whiten_scales", "whiten_residual")
KNOWN_FILES = (MODEL, MODEL_EDGETPU, GOLDEN)  # v1's; v2 adds any model_<backend>.<ext> named in artifacts
CPU = "cpu"  # the reference backend: its artifact is MODEL, the golden outputs are its own
COMPATIBLE = "taxonedge-classifier-v1"
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
ARTIFACT_NAME = re.compile(r"^model_([a-z0-9_]{1,32})\.[a-z0-9]{1,16}$")
BACKEND_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")


class BundleError(ValueError):
    """A bundle that must not be used. The message names the file and what was expected.

    Always one line, publishable as UTF-8: it may quote names and values from a hostile bundle, and it goes
    into logs, deployment answers and `inspect` output as it is."""

    def __init__(self, message: str):
        super().__init__(_one_line(message, 1000))


class OutputSpec(BaseModel):
    """Which output tensor holds what: one score per leaf, in `leaf_order`.

    `leaf_probabilities` (v1, v2): a softmax inside the model; as uint8 it saturates at 255/256, so the
    confident answers, right or wrong, all read the same. `leaf_logits` (v3): the scores before the softmax,
    which the device turns into probabilities in float (`decode.leaf_probabilities`), so they keep ranking
    at the top, and whose maximum is the open-set score."""

    model_config = ConfigDict(extra="forbid")

    # Signature-runner output name (`get_output_details()` order is not the Keras order, names are stable).
    name: str = "output_0"
    kind: Literal["leaf_probabilities", "leaf_logits"] = "leaf_probabilities"
    dtype: Literal["uint8", "int8", "float32"] = "uint8"
    scale: float = 1.0 / 256.0
    zero_point: int = 0
    num_classes: int = Field(ge=1)
    leaf_order: list[str]
    # v3, optional (None: the logits alone). Written only when set, so other bundles still reach daemons
    # that predate it (which refuse a bundle that sets it, by name: they would decide on the logits alone).
    centroid: CentroidTerm | None = None


class CentroidTerm(BaseModel):
    """v3, optional: the leaf scores the device decides on are (logits + `weight` x the cosine of the
    frame's embedding to each trained leaf's centroid in the bundle's whitened space, centroids.npz) /
    `temperature`. A nearest-centroid vote in that space holds better on occasions the model was not
    trained on than the fine-tuned head alone (docs/trust.md); the temperature, fitted where the thresholds
    are chosen, keeps the probabilities calibrated."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(gt=0.0, allow_inf_nan=False)
    temperature: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)

    def formula(self) -> str:
        """The sum in one line, as `inspect` and evaluation reports show it."""
        return f"scores = (logits + {self.weight:g} x whitened centroid cosine) / {self.temperature:g}"


OutputSpec.model_rebuild()


class EmbeddingSpec(BaseModel):
    """v3: the penultimate features (the pooled backbone output the leaf layer reads), a second output of
    the same invoke: what no-item detection and enrolled products compare."""

    model_config = ConfigDict(extra="forbid")

    name: str = "embedding"
    dtype: Literal["uint8", "int8", "float32"] = "uint8"
    scale: float = 1.0
    zero_point: int = 0
    size: int = Field(ge=1)


class OpenSet(BaseModel):
    """v3: when a product is not one the model knows. The score is the largest leaf logit (max-logit: a
    closed-set classifier that is sure of nothing it knows gives all its logits low); below `threshold`
    the label is `unknown` with reason `unfamiliar`. The threshold lets `known_pass_rate` of the
    calibration images of known products through."""

    model_config = ConfigDict(extra="forbid")

    score: Literal["max_logit"] = "max_logit"
    threshold: float
    known_pass_rate: float = Field(ge=0.0, le=1.0)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    size: int = Field(ge=0)


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    created_at: str
    backbone: str = "unknown"
    description: str = ""


class Quantization(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # int8: full integer (Edge TPU capable); float16 / dynamic: CPU only; float32: not quantized.
    mode: Literal["int8", "float16", "dynamic", "float32"] = "int8"
    qat: bool = False
    calibration_images: int = 0


class Manifest(BaseModel):
    """manifest.json. Unknown keys are rejected: a new field means a new format version."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["taxonedge-bundle"] = FORMAT
    format_version: int = FORMAT_VERSION
    compatible: str = COMPATIBLE
    min_daemon_version: str = "0.1.0"
    model: ModelInfo
    taxonomy: dict[str, Any]
    taxonomy_hash: str
    input: InputSpec
    output: OutputSpec
    quantization: Quantization = Quantization()
    # Per-depth back-off thresholds on calibrated probabilities: {"depth_1": 0.9, "depth_2": ..., ...}.
    thresholds: dict[str, float] = {}
    # Softmax temperature fitted on validation data; already folded into the model's logits.
    temperature: float = 1.0
    metrics: dict[str, Any] = {}
    edgetpu: dict[str, Any] = {}
    golden: dict[str, Any] = {}
    signing_key_id: str | None = None
    # v2: the file each inference backend runs, {"cpu": "model.tflite", "edgetpu": "model_edgetpu.tflite"}
    artifacts: dict[str, str] = {}
    # v3: the embedding output and the open-set threshold (None: the model has none)
    embedding: EmbeddingSpec | None = None
    open_set: OpenSet | None = None
    files: dict[str, FileEntry]

    @field_validator("format_version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v not in READABLE_VERSIONS:
            raise ValueError(
                f"format_version {v} is not supported (this reader reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        return v

    @model_validator(mode="after")
    def _v3_fields(self) -> Manifest:
        if self.format_version < 3:
            for name, used in (
                ("output.kind leaf_logits", self.output.kind == "leaf_logits"),
                ("embedding", self.embedding is not None),
                ("open_set", self.open_set is not None),
            ):
                if used:
                    raise ValueError(f"{name}: not a format_version {self.format_version} field (v3)")
        if self.open_set is not None and self.output.kind != "leaf_logits":
            raise ValueError("open_set: the max-logit score needs output.kind leaf_logits")
        if self.output.centroid is not None and (self.output.kind != "leaf_logits" or self.embedding is None):
            raise ValueError("output.centroid: needs output.kind leaf_logits and an embedding output")
        return self

    @model_validator(mode="after")
    def _artifacts(self) -> Manifest:
        if self.format_version == 1:
            if self.artifacts:
                raise ValueError("artifacts: not a format_version 1 field")
            return self
        for backend, name in self.artifacts.items():
            if not (name == MODEL or ARTIFACT_NAME.match(name)) or not BACKEND_NAME.match(backend):
                raise ValueError(f"artifacts: {backend!r}: {name!r} is not a backend name and model_* file")
        if self.artifacts.get(CPU) != MODEL:
            raise ValueError(f"artifacts: the {CPU} backend's file must be {MODEL}")
        return self

    def artifact_files(self) -> dict[str, str]:
        """Backend name -> file in the bundle (a v1 bundle's from the file names it has)."""
        if self.format_version >= 2:
            return dict(self.artifacts)
        return {CPU: MODEL, **({"edgetpu": MODEL_EDGETPU} if MODEL_EDGETPU in self.files else {})}

    @field_validator("thresholds")
    @classmethod
    def _thresholds_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        return check_thresholds(v)


class Bundle:
    """A verified bundle held in memory. Build with `read_bundle`."""

    def __init__(
        self,
        manifest: Manifest,
        manifest_bytes: bytes,
        files: dict[str, bytes],
        signature: bytes | None,
        sha256: str,
        path: Path | None,
        signature_status: str,
    ):
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.files = files
        self.signature = signature
        self.sha256 = sha256
        self.path = path
        # "valid", "unsigned" or "not checked" (signed, but no public key was given)
        self.signature_status = signature_status
        self.taxonomy = Taxonomy.from_dict(manifest.taxonomy)

    @property
    def name(self) -> str:
        return self.manifest.model.name

    @property
    def version(self) -> str:
        return self.manifest.model.version

    def artifacts(self) -> dict[str, bytes]:
        """Backend name -> the model it runs (`cpu` always)."""
        return {backend: self.files[name] for backend, name in self.manifest.artifact_files().items()}

    def has_artifact(self, backend: str) -> bool:
        return backend in self.manifest.artifact_files()

    @property
    def has_edgetpu_model(self) -> bool:
        return self.has_artifact("edgetpu")

    def model_bytes(self) -> bytes:
        """The CPU model, the reference the golden outputs were recorded on."""
        return self.files[MODEL]

    def golden(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(inputs NxHxWx3, outputs NxC) of the self-test set, or None when the bundle has none."""
        if GOLDEN not in self.files:
            return None
        with np.load(io.BytesIO(self.files[GOLDEN]), allow_pickle=False) as data:
            return data["inputs"], data["outputs"]

    def golden_embeddings(self) -> np.ndarray | None:
        """The embedding output (NxD) for the golden inputs, when the model has one (v3)."""
        if GOLDEN not in self.files or self.manifest.embedding is None:
            return None
        with np.load(io.BytesIO(self.files[GOLDEN]), allow_pickle=False) as data:
            return data["embeddings"] if "embeddings" in data.files else None

    def centroids(self) -> np.ndarray | None:
        """Per trained leaf (in leaf order), the unit mean embedding of its training images (L x D), or
        None: what an enrolled product must beat to override the model's own class (v3)."""
        if CENTROIDS not in self.files or self.manifest.embedding is None:
            return None
        centroids = self._centroid_arrays()["centroids"]
        if centroids.shape != (self.taxonomy.num_leaves, self.manifest.embedding.size):
            raise BundleError(
                f"{CENTROIDS}: shape {centroids.shape}, expected "
                f"({self.taxonomy.num_leaves}, {self.manifest.embedding.size})"
            )
        return centroids

    def embedding_space(self) -> EmbeddingSpace | None:
        """Where enrolled products are matched and the centroid term is computed (v3; None without an
        embedding): the whitening and the centroids in it when centroids.npz has them, else raw cosine with
        the raw centroids (older bundles), or no centroids at all. Read once per bundle."""
        return self._embedding_space

    @cached_property
    def _embedding_space(self) -> EmbeddingSpace | None:
        if self.manifest.embedding is None:
            return None
        if CENTROIDS not in self.files:
            return EmbeddingSpace()
        arrays = self._centroid_arrays()
        if "whitened_centroids" not in arrays:
            return EmbeddingSpace(None, self.centroids())
        dim, leaves = self.manifest.embedding.size, self.taxonomy.num_leaves
        basis = arrays["whiten_basis"]
        rank = basis.shape[1] if basis.ndim == 2 else -1
        expected = {
            "whitened_centroids": (leaves, dim),
            "whiten_mean": (dim,),
            "whiten_basis": (dim, rank),
            "whiten_scales": (rank,),
            "whiten_residual": (),
        }
        for key, shape in expected.items():
            if key not in arrays or arrays[key].shape != shape:
                found = arrays[key].shape if key in arrays else "none"
                raise BundleError(f"{CENTROIDS}: {key} has shape {found}, expected {shape}")
        return whitened_space(arrays)

    def _centroid_arrays(self) -> dict[str, np.ndarray]:
        """centroids.npz's arrays in float32. Untrusted bytes: whatever numpy trips on is a BundleError."""
        try:
            with np.load(io.BytesIO(self.files[CENTROIDS]), allow_pickle=False) as data:
                return {key: data[key].astype(np.float32) for key in data.files}
        except (
            ValueError,
            OSError,
            KeyError,
            EOFError,
            AttributeError,
            TypeError,
            zipfile.BadZipFile,
        ) as exc:
            raise BundleError(f"{CENTROIDS} cannot be read: {_one_line(exc)}") from None

    def describe(self) -> dict[str, Any]:
        """A short identity for status messages and label payloads."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "taxonomy_hash": self.manifest.taxonomy_hash,
        }


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def read_bundle(
    source: str | Path | bytes,
    public_key: Ed25519PublicKey | None = None,
    require_signature: bool = False,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> Bundle:
    """Read and verify a bundle from a path or bytes. Raises BundleError on anything wrong. (Over 80 lines:
    the checks in the order a damaged file must be refused, one message each.)

    With `public_key`, a signature must be present and valid. `require_signature` without a key is a
    caller error (a signature cannot be checked without one).
    """
    path = None
    if isinstance(source, (bytes, bytearray)):
        raw = bytes(source)
        where = "bundle"
    else:
        path = Path(source)
        where = str(path)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise BundleError(f"{where}: {size} bytes is over the limit of {max_bytes}")
            raw = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{where}: cannot read: {exc.strerror or exc}") from None
    if require_signature and public_key is None:
        raise ValueError("require_signature needs a public key")
    members = _untar(raw, where, max_bytes)
    if MANIFEST not in members:
        raise BundleError(f"{where}: no {MANIFEST} in the bundle (is this a taxonedge bundle?)")
    if _tar_bytes(members) != raw:
        raise BundleError(f"{where}: the tar framing is damaged (bytes differ from what a writer produces)")
    _check_sums(members, where)
    manifest_bytes = members.pop(MANIFEST)
    try:
        manifest = Manifest.model_validate(json.loads(manifest_bytes.decode("utf-8")))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{where}: {MANIFEST} is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise BundleError(f"{where}: {MANIFEST} is nested too deeply") from None
    except ValidationError as exc:  # before ValueError: a ValidationError is one
        raise BundleError(f"{where}: {MANIFEST} is invalid: {_first_error(exc)}") from None
    except ValueError as exc:  # JSONDecodeError, or a number too long to convert
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({_one_line(exc)})") from None

    signature = members.pop(SIGNATURE, None)
    for name in members:
        if name not in manifest.files:
            raise BundleError(f"{where}: file '{name}' is in the bundle but not listed in {MANIFEST}")
    for name, entry in manifest.files.items():
        if name not in members:
            raise BundleError(f"{where}: '{name}' is listed in {MANIFEST} but missing from the bundle")
        data = members[name]
        if len(data) != entry.size:
            raise BundleError(f"{where}: '{name}' is {len(data)} bytes, the manifest expects {entry.size}")
        digest = sha256_hex(data)
        if digest != entry.sha256:
            raise BundleError(
                f"{where}: sha256 of '{name}' is {digest}, the manifest expects {entry.sha256} "
                "(the file was altered or damaged)"
            )
    if MODEL not in members:
        raise BundleError(f"{where}: the bundle has no {MODEL}")
    for backend, name in manifest.artifact_files().items():
        if name not in members:
            raise BundleError(f"{where}: the {backend} artifact '{name}' is not in the bundle")
    unexpected = set(members) - set(manifest.artifact_files().values()) - {GOLDEN}
    if manifest.format_version >= 3:
        unexpected -= {CENTROIDS}
    if unexpected:
        raise BundleError(f"{where}: '{sorted(unexpected)[0]}' is neither a backend's artifact nor {GOLDEN}")

    if public_key is not None:
        if signature is None:
            raise BundleError(f"{where}: the bundle is unsigned but a signature is required")
        if not verify(public_key, signature, manifest_bytes):
            raise BundleError(
                f"{where}: {SIGNATURE} does not verify against key {key_id(public_key)} "
                "(signed by another key, or the manifest was changed after signing)"
            )
        status = "valid"
    else:
        status = "unsigned" if signature is None else "not checked"

    try:
        taxonomy = Taxonomy.from_dict(manifest.taxonomy)
    except (TaxonomyError, TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        # untrusted input: whatever the taxonomy reader trips on is a refusal, named, not a traceback
        raise BundleError(f"{where}: taxonomy in {MANIFEST} is invalid: {_one_line(exc)}") from None
    if taxonomy.hash != manifest.taxonomy_hash:
        raise BundleError(
            f"{where}: taxonomy hash is {taxonomy.hash}, the manifest says {manifest.taxonomy_hash}"
        )
    if (
        manifest.output.leaf_order != taxonomy.leaf_labels
        or manifest.output.num_classes != taxonomy.num_leaves
    ):
        raise BundleError(
            f"{where}: output leaf_order does not match the taxonomy's {taxonomy.num_leaves} leaves"
        )
    bundle = Bundle(manifest, manifest_bytes, members, signature, sha256_hex(raw), path, status)
    if manifest.output.centroid is not None:
        try:
            space = bundle.embedding_space()
        except BundleError as exc:
            raise BundleError(f"{where}: {exc}") from None
        if space is None or space.whitening is None or space.centroids is None:
            raise BundleError(f"{where}: output.centroid is set but {CENTROIDS} has no whitened centroids")
    return bundle


def whitened_space(arrays: Mapping[str, np.ndarray]) -> EmbeddingSpace:
    """The whitened space and centroids of centroids.npz's arrays, in float32 as the device reads them."""
    a = {key: np.asarray(arrays[key]).astype(np.float32, copy=False) for key in WHITENING_KEYS}
    whitening = Whitening(
        a["whiten_mean"], a["whiten_basis"], a["whiten_scales"], float(a["whiten_residual"])
    )
    return EmbeddingSpace(whitening, a["whitened_centroids"])


def build_manifest(
    *,
    model: ModelInfo | dict,
    taxonomy: Taxonomy,
    input_spec: InputSpec,
    output: OutputSpec | dict | None = None,
    files: dict[str, bytes],
    **fields: Any,
) -> Manifest:
    """A manifest for `files`, with the taxonomy, its hash and every file's sha256 filled in."""
    output_fields = dict(output) if isinstance(output, dict) else (output.model_dump() if output else {})
    output_fields.update(num_classes=taxonomy.num_leaves, leaf_order=taxonomy.leaf_labels)
    # The lowest version that holds these fields, so a bundle without v3's outputs still reaches v2 daemons.
    v3 = output_fields.get("kind") == "leaf_logits" or fields.get("embedding") or fields.get("open_set")
    fields.setdefault("format_version", FORMAT_VERSION if v3 else 2)
    return Manifest(
        model=ModelInfo.model_validate(model) if isinstance(model, dict) else model,
        taxonomy=taxonomy.to_dict(),
        taxonomy_hash=taxonomy.hash,
        input=input_spec,
        output=OutputSpec(**output_fields),
        files={name: FileEntry(sha256=sha256_hex(data), size=len(data)) for name, data in files.items()},
        artifacts=artifacts_of(files),
        **fields,
    )


def artifacts_of(files: dict[str, bytes]) -> dict[str, str]:
    """Backend name -> file, from the file names: model.tflite is the CPU's, model_<backend>.<ext> the
    backend's (convert/targets.py names what it compiles that way)."""
    found = {CPU: MODEL} if MODEL in files else {}
    for name in sorted(files):
        match = ARTIFACT_NAME.match(name)
        if match and name != MODEL:
            found[match.group(1)] = name
    return found


def write_bundle(
    path: str | Path, manifest: Manifest, files: dict[str, bytes], sign_key: Ed25519PrivateKey | None = None
) -> Path:
    """Write `files` and `manifest` (whose file entries must match) atomically; sign when a key is given."""
    path = Path(path)
    for name in files:
        if name not in (MODEL, GOLDEN, CENTROIDS) and not ARTIFACT_NAME.match(name):
            raise BundleError(
                f"'{name}' is not a bundle file (expected {MODEL}, model_<backend>.<ext>, {GOLDEN} or "
                f"{CENTROIDS})"
            )
    if set(files) != set(manifest.files):
        raise BundleError(
            "the manifest's file list does not match the files given: rebuild it with build_manifest"
        )
    for name, data in files.items():
        if sha256_hex(data) != manifest.files[name].sha256:
            raise BundleError(
                f"sha256 of '{name}' does not match the manifest: rebuild it with build_manifest"
            )
    if sign_key is not None:
        manifest = manifest.model_copy(update={"signing_key_id": key_id(sign_key.public_key())})
    # an unset centroid term is left out, so that daemons that predate the field still read the bundle
    unset = {"output": {"centroid"}} if manifest.output.centroid is None else None
    manifest_bytes = json.dumps(
        manifest.model_dump(mode="json", exclude=unset), indent=2, ensure_ascii=False
    ).encode("utf-8")
    members = {MANIFEST: manifest_bytes, **files}
    if sign_key is not None:
        members[SIGNATURE] = sign(sign_key, manifest_bytes)
    sums = "".join(f"{sha256_hex(members[n])}  {n}\n" for n in (MANIFEST, SIGNATURE) if n in members)
    members[CHECKSUMS] = sums.encode()
    atomic_write(path, _tar_bytes(members))
    return path


def resign_bundle(
    source: str | Path | bytes,
    out: str | Path,
    sign_key: Ed25519PrivateKey,
    public_key: Ed25519PublicKey | None = None,
    version: str | None = None,
) -> Bundle:
    """Write a verified copy of a bundle signed with `sign_key` (optionally as model `version`); the files
    are unchanged, the manifest gets the new `signing_key_id`. With `public_key` the old signature must
    verify."""
    old = read_bundle(source, public_key=public_key)
    manifest = old.manifest
    if version is not None:
        manifest = manifest.model_copy(
            update={"model": manifest.model.model_copy(update={"version": version})}
        )
        try:  # the same checks a reader makes
            manifest = Manifest.model_validate(manifest.model_dump(mode="json"))
        except ValidationError as exc:
            raise BundleError(f"--version {version!r}: {_first_error(exc)}") from None
    path = write_bundle(out, manifest, old.files, sign_key=sign_key)
    return read_bundle(path, public_key=sign_key.public_key())


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    """The canonical tar of `members`, in order: fixed mode, owner and mtime, so equal content gives equal
    bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _check_sums(members: dict[str, bytes], where: str) -> None:
    sums = members.pop(CHECKSUMS, None)
    if sums is None:
        raise BundleError(f"{where}: no {CHECKSUMS} in the bundle")
    expected: dict[str, str] = {}
    for line in sums.decode("ascii", "replace").splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    for name in (MANIFEST, SIGNATURE):
        if name in members and expected.get(name) != sha256_hex(members[name]):
            raise BundleError(f"{where}: '{name}' does not match its sha256 in {CHECKSUMS} (damaged)")
        if name not in members and name in expected:
            raise BundleError(f"{where}: {CHECKSUMS} lists '{name}' but the bundle lacks it")


def _untar(raw: bytes, where: str, max_bytes: int) -> dict[str, bytes]:
    if len(raw) > max_bytes:
        raise BundleError(f"{where}: {len(raw)} bytes is over the limit of {max_bytes}")
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    raise BundleError(f"{where}: member '{info.name}' is not a regular file")
                if "/" in info.name or info.name.startswith(".") or info.name in members:
                    raise BundleError(f"{where}: unexpected or repeated member name '{info.name}'")
                fh = tar.extractfile(info)
                data = fh.read() if fh else b""
                if len(data) != info.size:
                    raise BundleError(f"{where}: member '{info.name}' is truncated")
                members[info.name] = data
    except tarfile.TarError as exc:
        raise BundleError(f"{where}: not a readable bundle (tar): {exc}") from None
    if not members:
        raise BundleError(f"{where}: empty or truncated bundle")
    return members


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return _one_line(f"{loc}: {err['msg']}")


def _one_line(text: object, limit: int = 300) -> str:
    """A message from untrusted content: one line, printable as UTF-8, bounded."""
    line = "".join(c if c.isprintable() else " " for c in str(text)).strip() or type(text).__name__
    return line.encode("utf-8", "replace").decode("utf-8")[:limit]
