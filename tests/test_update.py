"""The device-side update state machine against a real mosquitto, real signed bundles and real interpreters.

The host is `tests.update_host.SeamHost` (the daemon's seam, backed by a real Classifier that keeps
publishing labels); each bad bundle must be rejected or rolled back with its reason while the old model
keeps serving.
"""

from __future__ import annotations

import json
import time
from typing import get_args

import numpy as np
import pytest
from taxonedge.edge.kernel.bundle import read_bundle
from taxonedge.edge.kernel.protocol import DeployState
from taxonedge.edge.kernel.signing import generate_keypair, load_private_key
from taxonedge.edge.service import update
from taxonedge.edge.service.config import UpdateConfig, load_config
from taxonedge.edge.service.pipeline import InferenceResult
from taxonedge.edge.service.slots import Slots, read_verified, startup_bundle

from .conftest import TINY_LABELS
from .tinymodels import tiny_bundle_bytes
from .update_host import Observer, SeamHost, rebuilt, signed_bundles, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    made = signed_bundles()
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder / "other.key", folder / "other.pub")
    return {
        "private": made["key"],
        "public": made["public_key"],
        "other": load_private_key(folder / "other.key"),
    }


@pytest.fixture(scope="module")
def bundles(keys):
    made = signed_bundles()
    key, new = keys["private"], made["new"]
    _, golden_out = read_bundle(new).golden()
    return {
        **{name: made[name] for name in ("old", "new", "unsigned", "all_unknown")},
        "bad_signature": tiny_bundle_bytes(seed=1, version="2", sign_key=keys["other"]),
        # the manifest says 32x32 but the model takes 48x48
        "wrong_input": rebuilt(new, key, model=read_bundle(tiny_bundle_bytes(seed=1, size=48)).model_bytes()),
        "other_taxonomy": tiny_bundle_bytes(labels=[*TINY_LABELS, "Vegetables/Leek"], seed=0, sign_key=key),
        "nan": tiny_bundle_bytes(seed=0, version="nan", nan=True, sign_key=key),
        "wrong_golden": rebuilt(new, key, golden_outputs=golden_out ^ np.uint8(1)),  # off by one step
        "other_device": rebuilt(new, key, compatible="taxonedge-detector-v1"),
        "newer_daemon": rebuilt(new, key, min_daemon_version="99.0"),
    }


@pytest.fixture
def device(tmp_path, broker, keys, bundles):
    """A running host on the old bundle with the update plugin attached, and an observer."""
    old_path = tmp_path / "old.tebundle"
    old_path.write_bytes(bundles["old"])
    config = load_config(
        write_config(
            tmp_path, broker.port, keys["public"], old_path, groups=("line-a",), watch_dir=tmp_path / "drop"
        )
    )
    (tmp_path / "drop").mkdir()
    observer = Observer(broker.port)
    host = SeamHost(config, read_verified(old_path, config.model))
    update.attach(host)
    observer.wait_for(lambda: len(observer.labels) > 5)
    yield host, observer, config
    update.detach(host)
    host.close()
    observer.close()


def _still_serving_old(host, observer, bundles):
    old_sha = read_bundle(bundles["old"]).sha256
    assert host.active_bundle.sha256 == old_sha
    count = len(observer.labels)
    observer.wait_for(lambda: len(observer.labels) > count + 5)  # labels keep flowing ...
    assert observer.labels[-1][1]["model"]["sha256"] == old_sha  # ... from the old model
    assert observer.model["sha256"] == old_sha


def test_good_update_commits_while_labels_keep_flowing(device, bundles):
    host, observer, config = device
    new_sha = read_bundle(bundles["new"]).sha256
    start = time.monotonic()
    observer.send(bundles["new"], "dep-good")
    result = observer.outcome("dep-good")
    end = time.monotonic()
    assert result["state"] == "committed", result
    assert observer.states("dep-good") == [
        *(["receiving"] * observer.states("dep-good").count("receiving")),
        "received",
        "verifying",
        "staged",
        "warming",
        "self_test",
        "switched",
        "committed",
    ]
    assert host.active_bundle.sha256 == new_sha
    observer.wait_for(lambda: observer.labels[-1][1]["model"]["sha256"] == new_sha)
    assert observer.model["sha256"] == new_sha  # the retained model topic names what serves
    gap = observer.longest_label_gap(start, end)
    print(
        f"\nlongest gap between labels during the deployment: {gap * 1000:.1f} ms "
        f"({sum(start <= t <= end for t, _ in observer.labels)} labels in {end - start:.2f} s)"
    )
    assert gap < 1.0
    state = Slots(config.device.state_dir).state()
    assert (state.committed, state.trial) == ("a", None)
    assert startup_bundle(config) == Slots(config.device.state_dir).path("a")
    # the v5 response topic got the same progress, with the correlation data
    observer.wait_for(
        lambda: any(p["state"] == "committed" and corr == b"dep-good" for p, corr in observer.responses), 5
    )


CASES = {
    # name: (bundle key, request override, expected state, words the reason must contain)
    "wrong_sha256": ("new", {"sha256": "0" * 64}, "rejected", "sha256"),
    "bad_signature": ("bad_signature", {}, "rejected", "does not verify"),
    "unsigned": ("unsigned", {}, "rejected", "unsigned"),
    "wrong_input_shape": ("wrong_input", {}, "rejected", "model input is (1, 48, 48, 3)"),
    "incompatible_taxonomy": ("other_taxonomy", {}, "rejected", "taxonomy"),
    "nan_model": ("nan", {}, "rejected", "not finite"),
    "wrong_golden_outputs": ("wrong_golden", {}, "rejected", "golden input 0 gives outputs differing by 1 "),
    "fails_health_window": ("all_unknown", {}, "rolled_back", "unknown rate rose"),
    "incompatible_device": (
        "other_device",
        {},
        "rejected",
        "compatible: the bundle is for 'taxonedge-detector-v1'",
    ),
    "needs_newer_daemon": ("newer_daemon", {}, "rejected", "needs taxonedge >= 99.0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_update_is_refused_and_old_model_keeps_serving(device, bundles, case):
    host, observer, config = device
    key, override, expected_state, words = CASES[case]
    observer.send(bundles[key], f"dep-{case}", **override)
    result = observer.outcome(f"dep-{case}")
    assert result["state"] == expected_state, result
    assert words in result["reason"], result["reason"]
    assert "bundle: bundle:" not in result["reason"]  # one prefix, not the reader's and ours
    _still_serving_old(host, observer, bundles)
    state = Slots(config.device.state_dir).state()
    assert (state.committed, state.trial) == (None, None)
    assert startup_bundle(config) is None  # a restart runs the config's (old) bundle
    if expected_state == "rolled_back":  # it did serve for a moment, then the old one came back
        assert "switched" in observer.states(f"dep-{case}")


def test_truncated_chunk_stream_is_rejected(device, bundles):
    host, observer, _ = device
    observer.send(bundles["new"], "dep-trunc", skip={2, 5})
    result = observer.outcome("dep-trunc")
    assert result["state"] == "rejected"
    assert "truncated chunk stream" in result["reason"]
    # before giving up, the device asked (once, chunk_retries = 1) for exactly the missing chunks
    asks = [p for p in observer.progress["dep-trunc"] if p.get("missing")]
    assert [a["missing"] for a in asks] == [[2, 5]]
    assert not list((Slots(host.config.device.state_dir).dir / "incoming").iterdir())  # no partial file left
    _still_serving_old(host, observer, bundles)


def test_transfer_resumes_with_the_missing_chunks(device, bundles):
    host, observer, _ = device
    observer.send(bundles["new"], "dep-resume", skip={1, 3})
    ask = observer.wait_for(lambda: [p for p in observer.progress.get("dep-resume", []) if p.get("missing")])
    assert ask[0]["missing"] == [1, 3]
    observer.send_chunks(bundles["new"], "dep-resume", ask[0]["missing"])
    assert observer.outcome("dep-resume")["state"] == "committed"
    assert host.active_bundle.sha256 == read_bundle(bundles["new"]).sha256


def test_repeated_deployment_id_is_idempotent(device, bundles):
    host, observer, _ = device
    switches = []
    real_switch = host.switch_model
    host.switch_model = lambda b: switches.append(b.sha256) or real_switch(b)
    observer.send(bundles["new"], "dep-once")
    assert observer.outcome("dep-once")["state"] == "committed"
    seen = len(observer.progress["dep-once"])
    observer.send(bundles["new"], "dep-once")  # the operator's retry, e.g. after losing its connection
    again = observer.outcome("dep-once", after=seen)
    assert again["state"] == "committed" and again["repeat"] is True
    assert len(switches) == 1
    # a rejected id stays rejected, without redoing the work
    observer.send(bundles["unsigned"], "dep-no")
    assert observer.outcome("dep-no")["state"] == "rejected"
    seen = len(observer.progress["dep-no"])
    observer.send(bundles["unsigned"], "dep-no")
    assert observer.outcome("dep-no", after=seen)["repeat"] is True
    assert observer.states("dep-no")[seen:] == ["rejected"]


def test_redeploying_an_earlier_release_runs_it_again(device, bundles):
    """Deploy B, then A, then B again with the same id: the device must serve B again, not answer 'repeat'."""
    host, observer, _ = device
    new_sha, old_sha = read_bundle(bundles["new"]).sha256, read_bundle(bundles["old"]).sha256
    observer.send(bundles["new"], "release-b")
    assert observer.outcome("release-b")["state"] == "committed"
    observer.send(bundles["old"], "release-a")
    assert observer.outcome("release-a")["state"] == "committed"
    assert host.active_bundle.sha256 == old_sha
    seen = len(observer.progress["release-b"])
    observer.send(bundles["new"], "release-b")  # the operator goes back to B
    again = observer.outcome("release-b", after=seen)
    assert again["state"] == "committed" and "repeat" not in again, again
    assert again["model"]["sha256"] == new_sha
    assert host.active_bundle.sha256 == new_sha
    assert "switched" in observer.states("release-b")[seen:]
    # and now that B serves, the same id is a repeat that says what serves
    seen = len(observer.progress["release-b"])
    observer.send(bundles["new"], "release-b")
    repeat = observer.outcome("release-b", after=seen)
    assert repeat["repeat"] is True and repeat["model"]["sha256"] == new_sha


def test_retained_request_replayed_after_its_outcome_is_skipped(device, bundles):
    """A retained request arrives again at every reconnect (same nonce): handled once, never re-run or
    re-answered, even after another model was deployed; the device clears its own retained request."""
    host, observer, _ = device
    old_sha = read_bundle(bundles["old"]).sha256
    observer.send(bundles["new"], "kept", nonce="n1")
    assert observer.outcome("kept")["state"] == "committed"
    assert observer.progress["kept"][-1]["nonce"] == "n1"
    observer.send(bundles["old"], "other")
    assert observer.outcome("other")["state"] == "committed"
    seen = len(observer.progress["kept"])
    observer.send(bundles["new"], "kept", nonce="n1")  # the replay
    observer.send(bundles["unsigned"], "marker")  # answered after the replay was handled
    observer.outcome("marker")
    assert len(observer.progress["kept"]) == seen
    assert host.active_bundle.sha256 == old_sha


def test_unreadable_request_without_response_topic_is_answered(device, bundles):
    host, observer, _ = device
    base = "taxonedge/s1/l1/dev1"
    for payload, words in [
        (b'{"id": "zero", "size": 0, "sha256": "' + b"0" * 64 + b'", "url": "file:///x"}', "size"),
        (b"{not json", "not JSON"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (rb'{"id": "x", "\ud800": 1}', "unicode string"),  # a lone surrogate in a key
        (b"\xff\xfe", "not UTF-8"),
    ]:
        observer.client.publish(f"{base}/model/deploy", payload, qos=1)  # no response topic
        answer = observer.wait_for(
            lambda w=words: [p for ps in observer.progress.values() for p in ps if w in p.get("reason", "")],
            10,
        )[-1]
        assert answer["state"] == "rejected" and answer["reason"].startswith("malformed deploy request on ")
        assert "\n" not in answer["reason"]
    assert observer.progress["zero"][-1]["id"] == "zero"  # a usable id is named in the answer
    observer.send(bundles["new"], "dep-after")  # the plugin still works
    assert observer.outcome("dep-after")["state"] == "committed"


def test_response_topic_on_the_devices_own_topics_is_refused(device, bundles):
    """Progress never lands on the device's labels (or any of its own topics); it still goes to the
    retained progress topic."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from taxonedge.edge.tools.deploy import make_request

    host, observer, _ = device
    base = "taxonedge/s1/l1/dev1"
    for i, reply in enumerate([f"{base}/labels", "taxonedge/groups/line-a/deploy", "ops/+", "$SYS/x"]):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        request = make_request(bundles["unsigned"], f"reply-{i}", url="file:///nonexistent")
        observer.client.publish(f"{base}/model/deploy", json.dumps(request), qos=1, properties=props)
        assert observer.outcome(f"reply-{i}")["state"] == "rejected"
    time.sleep(0.5)
    assert not [p for _, p in observer.labels if "state" in p or "seq" not in p]


def test_group_deployment_and_file_url(device, bundles, tmp_path):
    host, observer, _ = device
    path = tmp_path / "new.tebundle"
    path.write_bytes(bundles["new"])
    observer.send(bundles["new"], "dep-url", topic="taxonedge/groups/line-a/deploy", url=path.as_uri())
    assert observer.outcome("dep-url")["state"] == "committed"
    assert host.active_bundle.sha256 == read_bundle(bundles["new"]).sha256


def test_malformed_and_oversized_requests_are_answered_not_fatal(device, bundles):
    host, observer, _ = device
    observer.client.publish("taxonedge/s1/l1/dev1/model/deploy", b"{not json", qos=1)
    observer.send(bundles["new"], "dep-big", size=10**12, url="file:///x")
    result = observer.outcome("dep-big")
    assert result["state"] == "rejected" and "max_bundle_bytes" in result["reason"]
    observer.send(bundles["new"], "dep-after")  # the plugin still works
    assert observer.outcome("dep-after")["state"] == "committed"


def test_bundle_dropped_into_watch_dir(device, bundles, tmp_path):
    host, observer, _ = device
    drop = tmp_path / "drop"
    (drop / "bad.tebundle").write_bytes(bundles["unsigned"])
    observer.wait_for(lambda: (drop / "rejected" / "bad.tebundle.reason.txt").exists(), 20)
    assert "unsigned" in (drop / "rejected" / "bad.tebundle.reason.txt").read_text()
    _still_serving_old(host, observer, bundles)
    (drop / "new.tebundle").write_bytes(bundles["new"])
    observer.wait_for(lambda: (drop / "installed" / "new.tebundle").exists(), 30)
    assert host.active_bundle.sha256 == read_bundle(bundles["new"]).sha256
    local = [json.dumps(p) for k, ps in observer.progress.items() if k.startswith("local-") for p in ps]
    assert any('"committed"' in p for p in local)


def test_latency_over_budget_rolls_back(device, bundles):
    host, observer, config = device
    config.model.update.latency_budget_s = 1e-6  # no model can be this fast: the window must fail on latency
    observer.send(bundles["new"], "dep-slow")
    result = observer.outcome("dep-slow")
    assert result["state"] == "rolled_back"
    assert "median latency" in result["reason"] and "over the budget of 0.0 ms" in result["reason"]
    _still_serving_old(host, observer, bundles)


def _results(n, ok=True, latency=0.01, decision="accepted"):
    return [
        InferenceResult(ok, None if ok else "invoke timed out", latency, decision if ok else None, "x")
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "window, baseline, words",
    [
        (_results(10), _results(20), None),
        (_results(9) + _results(1, ok=False), _results(20), "1 of 10 inferences failed (invoke timed out)"),
        (_results(10, latency=0.2), _results(20, latency=0.01), "median latency 200.0 ms"),
        (_results(10, latency=0.07), _results(20, latency=0.01), None),  # within 3 x 10 ms + 50 ms slack
        (_results(5) + _results(5, decision="unknown"), _results(20), "unknown rate rose from 0% to 50%"),
        (_results(8) + _results(2, decision="unknown"), _results(20), None),  # +20 %: allowed
        (_results(4), _results(20), "health window incomplete: 4 of 10"),
        (_results(10, decision="unknown"), [], None),  # no baseline yet: nothing to compare against
    ],
)
def test_health_window_verdict(window, baseline, words):
    cfg = UpdateConfig()  # the defaults
    health = update.HealthWindow("x", 10)
    for result in window:
        health.add(result)
    verdict = health.verdict(baseline, cfg)
    assert verdict is None if words is None else words in verdict, verdict


def test_recorded_states_are_the_protocols_steps():
    """update.STATES (what deploying.json records) is protocol.DeployState but "receiving", in order; the
    outcomes close it."""
    steps = get_args(DeployState)
    assert steps[0] == "receiving" and steps[1:] == update.STATES
    assert len(update.STATES) == 9 and update.STATES[-3:] == update.FINAL


def _self_signed(folder):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return folder / "cert.pem", folder / "key.pem"


def test_https_url_is_fetched_with_the_configured_ca(device, bundles, tmp_path):
    import functools
    import http.server
    import ssl
    import threading

    host, observer, config = device
    site = tmp_path / "site"
    site.mkdir()
    (site / "new.tebundle").write_bytes(bundles["new"])
    cert, key = _self_signed(tmp_path)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/new.tebundle"
    try:
        observer.send(
            bundles["new"], "dep-https-untrusted", url=url
        )  # the device does not trust the cert yet
        result = observer.outcome("dep-https-untrusted")
        assert result["state"] == "rejected" and "CERTIFICATE_VERIFY_FAILED" in result["reason"]
        config.model.update.fetch_ca_file = cert
        observer.send(bundles["new"], "dep-https", url=url)
        outcome = observer.outcome("dep-https")
        assert outcome["state"] == "committed", outcome
        assert host.active_bundle.sha256 == read_bundle(bundles["new"]).sha256
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "backend, state, words",
    [
        ("auto", "committed", None),  # no libedgetpu here: the self-test falls back to the CPU, exact match
        ("edgetpu", "rejected", "warming: Edge TPU delegate libedgetpu.so.1"),
    ],
)
def test_bundle_with_edgetpu_model(device, bundles, keys, backend, state, words):
    host, observer, config = device
    new = bundles["new"]
    # a stand-in for edgetpu_compiler output (not available here); the delegate fails before reading it
    with_tpu = rebuilt(new, keys["private"], edgetpu=read_bundle(new).model_bytes())
    config.inference.backend = backend
    observer.send(with_tpu, f"dep-tpu-{backend}")
    result = observer.outcome(f"dep-tpu-{backend}")
    assert result["state"] == state, result
    if words:
        assert words in result["reason"]
        _still_serving_old(host, observer, bundles)


def test_transfer_resumes_after_a_broker_outage(device, bundles, broker):
    host, observer, config = device
    config.model.update.chunk_timeout_s = 3
    request = observer.send(bundles["new"], "dep-outage", skip=set(range(3, 100)))  # first 3 chunks only
    observer.wait_for(lambda: "receiving" in observer.states("dep-outage"))
    broker.stop()  # the connection drops mid-transfer (a fresh broker: sessions and queues are gone)
    time.sleep(0.5)
    broker.start()
    observer.wait_for(lambda: observer.client.is_connected() and host.client.is_connected(), 20)
    ask = observer.wait_for(lambda: [p for p in observer.progress["dep-outage"] if p.get("missing")], 20)
    assert ask[-1]["missing"] == list(range(3, request["chunks"]))
    observer.send_chunks(bundles["new"], "dep-outage", ask[-1]["missing"])
    assert observer.outcome("dep-outage")["state"] == "committed"
    assert host.active_bundle.sha256 == read_bundle(bundles["new"]).sha256
