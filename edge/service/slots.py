"""A/B model slots in the state directory: which bundle the device runs, safe across power loss.

    <state_dir>/models/slot-a.tebundle, slot-b.tebundle    two installed bundles
    <state_dir>/models/state.json                          {"committed", "previous", "trial", ...}

A new bundle is staged into the spare slot (never the one that serves), then marked as the trial, switched
to, and committed after its health window; the committed slot's predecessor stays as `previous`. Every
file is written temp + fsync + rename + fsync directory (`bundle.atomic_write`), so after a SIGKILL or a
power cut each file is whole, old or new. At start-up an unfinished trial (the process died during the
switch or its health window) is rolled back: the device runs the committed slot, or the previous one if
the committed slot no longer verifies, or `model.bundle` from the config when no slot is installed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..kernel.bundle import Bundle, BundleError, read_bundle, utc_now
from ..kernel.files import atomic_write
from ..kernel.signing import load_public_key
from .config import Config, ModelConfig

log = logging.getLogger(__name__)

SlotName = Literal["a", "b"]
SLOTS: tuple[SlotName, SlotName] = ("a", "b")


class SlotState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    committed: SlotName | None = None
    previous: SlotName | None = None
    trial: SlotName | None = None
    trial_id: str | None = None
    # A trial that start-up found unfinished and rolled back: {"id", "slot", "reason", "time"}; the update
    # plugin reports it on MQTT and clears it.
    interrupted: dict | None = None


class Slots:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "models"
        self.state_path = self.dir / "state.json"

    def path(self, slot: SlotName) -> Path:
        return self.dir / f"slot-{slot}.tebundle"

    def state(self) -> SlotState:
        try:
            return SlotState.model_validate(json.loads(self.state_path.read_bytes()))
        except FileNotFoundError:
            return SlotState()
        except (OSError, ValueError, ValidationError) as exc:
            # Only disk damage gets here (writes are atomic); start from the config bundle rather than crash.
            log.error("%s is unreadable (%s): ignoring the installed slots", self.state_path, exc)
            return SlotState()

    def save(self, state: SlotState) -> None:
        atomic_write(self.state_path, json.dumps(state.model_dump(), indent=2).encode())

    def spare(self) -> SlotName:
        """The slot a new bundle may be written to: never the committed one, which may be serving."""
        return "b" if self.state().committed == "a" else "a"

    def stage(self, data: bytes) -> tuple[SlotName, Path]:
        """Write a verified bundle into the spare slot. The spare may hold `previous`, which is then gone."""
        state = self.state()
        slot = self.spare()
        if state.previous == slot:
            self.save(state.model_copy(update={"previous": None}))
        path = self.path(slot)
        atomic_write(path, data)
        return slot, path

    def begin_trial(self, slot: SlotName, deployment_id: str) -> None:
        self.save(self.state().model_copy(update={"trial": slot, "trial_id": deployment_id}))

    def commit(self) -> None:
        state = self.state()
        if state.trial is None:
            raise RuntimeError("no trial to commit")
        self.save(
            state.model_copy(
                update={
                    "previous": state.committed,
                    "committed": state.trial,
                    "trial": None,
                    "trial_id": None,
                }
            )
        )

    def rollback(self) -> None:
        self.save(self.state().model_copy(update={"trial": None, "trial_id": None}))

    def take_interrupted(self) -> dict | None:
        state = self.state()
        if state.interrupted is not None:
            self.save(state.model_copy(update={"interrupted": None}))
        return state.interrupted

    def remove_temporaries(self) -> None:
        """Temp files of writes a crash cut short (`.slot-a.tebundle.tmp-PID`); the real files are intact."""
        for tmp in self.dir.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)


def read_verified(source: str | Path | bytes, model: ModelConfig) -> Bundle:
    """Read a bundle with the signature policy of the config: required against `public_key` unless
    `require_signature = false`; even then a signed bundle must verify when a key is configured."""
    key = load_public_key(model.public_key) if model.public_key else None
    if model.require_signature:
        return read_bundle(source, public_key=key, require_signature=True, max_bytes=model.max_bundle_bytes)
    bundle = read_bundle(source, max_bytes=model.max_bundle_bytes)
    if key is not None and bundle.signature is not None:
        bundle = read_bundle(source, public_key=key, max_bytes=model.max_bundle_bytes)
    return bundle


def startup_bundle(config: Config, problems: list[str] | None = None) -> Path | None:
    """The bundle the daemon starts with: the committed slot (an unfinished trial is rolled back), else the
    previous slot if the committed one fails verification, else None (use `config.model.bundle`). Each
    installed slot that did not verify is appended to `problems` (the daemon reports them as degraded)."""
    slots = Slots(config.device.state_dir)
    if not slots.dir.exists():
        return None
    slots.remove_temporaries()
    state = slots.state()
    if state.trial is not None:
        log.warning(
            "model slot %s (deployment %s) was not committed before the restart: rolling back",
            state.trial,
            state.trial_id,
        )
        state = state.model_copy(
            update={
                "trial": None,
                "trial_id": None,
                "interrupted": {
                    "id": state.trial_id,
                    "slot": state.trial,
                    "time": utc_now(),
                    "reason": "the daemon stopped before the new model was committed",
                },
            }
        )
        slots.save(state)
    for slot in (state.committed, state.previous):
        if slot is None:
            continue
        path = slots.path(slot)
        try:
            read_verified(path, config.model)
        except (BundleError, ValueError) as exc:
            log.error("model slot %s does not verify, not using it: %s", slot, exc)
            if problems is not None:
                problems.append(f"installed model (slot {slot}) does not verify, not using it: {exc}")
            continue
        if slot != state.committed:  # fell back: the previous slot is now what the device runs
            slots.save(state.model_copy(update={"committed": slot, "previous": None}))
        return path
    if state.committed is not None:
        slots.save(state.model_copy(update={"committed": None, "previous": None}))
    return None
