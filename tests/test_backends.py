"""Inference backends are plug-ins: a new one is one file. Here a toy backend, kept outside the tree and
named in TAXONEDGE_BACKENDS as a site would install one, serves a real bundle in a real daemon."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from taxonedge.edge.kernel import backends

from .conftest import TINY_LABELS, write_image_tree
from .daemonkit import DaemonProcess, Recorder, labels_of, validate_device_messages, write_config
from .tinymodels import write_tiny_bundle

TOY = '''
"""A toy backend: the CPU interpreter, counting its invokes in a file (what a real plug-in would hand to
its accelerator's runtime instead)."""
import os

from taxonedge.edge.kernel.runtime import Classifier


class _Counting(Classifier):
    def raw(self, image):
        with open(os.environ["TOY_COUNT_FILE"], "a") as fh:
            fh.write("x")
        return super().raw(image)


class _Toy:
    name = "toy"
    accelerator = False
    tolerance = 0

    def present(self, device):
        return True

    def open(self, model, num_threads, device):
        return _Counting(model, num_threads=num_threads)


BACKEND = _Toy()
'''


def test_the_shipped_backends_register_themselves():
    assert {"cpu", "edgetpu"} <= set(backends.names())
    assert backends.registry()["edgetpu"].accelerator and not backends.registry()["cpu"].accelerator


def test_an_unknown_backend_is_refused_by_name(tmp_path, broker):
    from taxonedge.edge.service.config import ConfigError, load_config

    cfg = write_config(
        tmp_path / "c.toml", broker, tmp_path / "b.tebundle", 'type = "folder"\npath = "."', tmp_path / "st"
    )
    cfg.write_text(cfg.read_text().replace('backend = "auto"', 'backend = "hailo"'))
    with pytest.raises(ConfigError, match="inference.backend.*hailo.*auto, cpu, edgetpu"):
        load_config(cfg)


@pytest.mark.slow
def test_a_toy_backend_in_one_file_serves_a_bundle_in_the_daemon(tmp_path, broker):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy_backend.py").write_text(TOY)
    count_file = tmp_path / "invokes.txt"
    env = {
        "TAXONEDGE_BACKENDS": "toy_backend",
        "TOY_COUNT_FILE": str(count_file),
        "PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]),
    }
    bundle = write_tiny_bundle(tmp_path / "tiny.tebundle")
    frames = next(
        p for p in write_image_tree(tmp_path / "tree", TINY_LABELS[:1], per_class=4).rglob("*.jpg")
    ).parent
    cfg = write_config(
        tmp_path / "c.toml", broker, bundle, f'type = "folder"\npath = "{frames}"', tmp_path / "st"
    )
    cfg.write_text(cfg.read_text().replace('backend = "auto"', 'backend = "toy"'))
    rec = Recorder(broker.port)
    try:
        daemon = DaemonProcess(cfg, env=env)
        assert daemon.wait(60) == 0, daemon.log
        assert rec.wait(lambda r: len(labels_of(r)) >= 4, 10), daemon.log
        labels = labels_of(rec)
        assert {lb["backend"] for lb in labels} == {"toy"}
        assert rec.on("status")[0]["backend"] == "toy" and rec.on("status")[0]["state"] == "online"
        validate_device_messages(
            [(t, _raw(p), props) for t, p, props in rec.messages], "taxonedge/plant/line1/dev1"
        )
    finally:
        rec.close()
    assert len(Path(count_file).read_text()) >= len(labels)  # the toy's interpreter answered every frame


def _raw(payload) -> bytes:
    import json

    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()
