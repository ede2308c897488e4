"""A/B slots: staging never touches the serving slot; start-up rolls back unfinished trials and skips
damage."""

from __future__ import annotations

import pytest
from taxonedge.edge.service.config import parse_config
from taxonedge.edge.service.slots import Slots, startup_bundle

from .update_host import signed_bundles


@pytest.fixture
def config(tmp_path):
    made = signed_bundles()
    return parse_config(f"""
[device]
state_dir = "{tmp_path / "state"}"
[model]
bundle = "{tmp_path / "config.tebundle"}"
public_key = "{made["public_key"]}"
[source]
type = "folder"
path = "{tmp_path}"
""")


def test_nothing_installed_uses_the_config_bundle(config):
    assert startup_bundle(config) is None


def test_stage_commit_cycle_alternates_and_never_overwrites_the_committed_slot(config):
    made = signed_bundles()
    slots = Slots(config.device.state_dir)
    slot, path = slots.stage(made["old"])
    assert slot == "a" and path.read_bytes() == made["old"]
    slots.begin_trial(slot, "d1")
    slots.commit()
    assert startup_bundle(config) == slots.path("a")
    slot, _ = slots.stage(made["new"])
    assert slot == "b"
    assert slots.path("a").read_bytes() == made["old"]  # the serving slot is untouched
    slots.begin_trial("b", "d2")
    slots.commit()
    state = slots.state()
    assert (state.committed, state.previous, state.trial) == ("b", "a", None)
    assert startup_bundle(config) == slots.path("b")
    # staging the next one overwrites the previous slot, so it no longer counts as a fallback
    slots.stage(made["old"])
    assert slots.state().previous is None


def test_unfinished_trial_is_rolled_back_at_startup_and_remembered(config):
    made = signed_bundles()
    slots = Slots(config.device.state_dir)
    slots.stage(made["old"])
    slots.begin_trial("a", "d1")
    slots.commit()
    slots.stage(made["new"])
    slots.begin_trial("b", "d2")  # ... and the power goes out during the health window
    assert startup_bundle(config) == slots.path("a")
    state = slots.state()
    assert state.trial is None and state.committed == "a"
    assert state.interrupted["id"] == "d2" and state.interrupted["slot"] == "b"
    assert slots.take_interrupted()["id"] == "d2"
    assert slots.take_interrupted() is None


def test_damaged_committed_slot_falls_back_to_previous_then_to_config(config):
    made = signed_bundles()
    slots = Slots(config.device.state_dir)
    for data, dep in ((made["old"], "d1"), (made["new"], "d2")):
        slot, _ = slots.stage(data)
        slots.begin_trial(slot, dep)
        slots.commit()
    damaged = bytearray(slots.path("b").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    slots.path("b").write_bytes(bytes(damaged))
    assert startup_bundle(config) == slots.path("a")
    assert slots.state().committed == "a"  # what runs is now what the state names
    slots.path("a").write_bytes(made["unsigned"])  # fails the signature policy
    assert startup_bundle(config) is None
    assert slots.state().committed is None


def test_leftover_temp_files_of_a_cut_write_are_removed(config):
    made = signed_bundles()
    slots = Slots(config.device.state_dir)
    slots.stage(made["old"])
    slots.begin_trial("a", "d1")
    slots.commit()
    partial = slots.dir / ".slot-b.tebundle.tmp-4242"
    partial.write_bytes(made["new"][:1000])
    assert startup_bundle(config) == slots.path("a")
    assert not partial.exists()


def test_unreadable_state_file_is_ignored_not_fatal(config):
    slots = Slots(config.device.state_dir)
    slots.dir.mkdir(parents=True)
    slots.state_path.write_text("{ not json")
    assert startup_bundle(config) is None


def test_signature_policy_of_read_verified(tmp_path, config):
    from taxonedge.edge.kernel.bundle import BundleError
    from taxonedge.edge.kernel.signing import generate_keypair, load_private_key
    from taxonedge.edge.service.slots import read_verified

    from .tinymodels import tiny_bundle_bytes

    made = signed_bundles()
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    foreign = tiny_bundle_bytes(seed=1, sign_key=load_private_key(tmp_path / "other.key"))
    model = config.model
    assert read_verified(made["new"], model).signature_status == "valid"
    with pytest.raises(BundleError, match="unsigned but a signature is required"):
        read_verified(made["unsigned"], model)
    relaxed = model.model_copy(update={"require_signature": False})
    assert read_verified(made["unsigned"], relaxed).signature_status == "unsigned"  # explicitly allowed
    with pytest.raises(BundleError, match="does not verify"):  # a signature present must still be right
        read_verified(foreign, relaxed)
