"""The device install: a NON-editable `pip install .[edge]` in a fresh venv runs the device code with no
TensorFlow anywhere, and the distribution claims no generic top-level import names."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

from .conftest import REPO, TINY_LABELS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("edge-venv")
    src = root / "src"
    # copy the tracked tree only, so no local build or venv leaks into the install
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", f"{src}[edge]"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return env_dir


def run_in(env_dir: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, env=env, cwd=env_dir, **kw)


def test_no_tensorflow_in_the_device_install(edge_venv):
    py = str(edge_venv / "bin" / "python")
    proc = run_in(edge_venv, py, "-c", "import tensorflow")
    assert proc.returncode != 0 and "No module named 'tensorflow'" in proc.stderr
    installed = run_in(edge_venv, py, "-m", "pip", "list", "--format=freeze").stdout.lower()
    for heavy in ("tensorflow", "keras", "tf-keras", "tensorflow-model-optimization"):
        assert f"\n{heavy}==" not in "\n" + installed


def test_installed_non_editable_with_no_generic_names(edge_venv):
    py = str(edge_venv / "bin" / "python")
    code = textwrap.dedent("""
        import importlib.util, taxonedge, taxonedge.edge
        print(taxonedge.__file__)
        for name in ("train", "convert", "edge"):
            assert importlib.util.find_spec(name) is None, name
    """)
    proc = run_in(edge_venv, py, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "site-packages" in proc.stdout and str(REPO) not in proc.stdout


def test_cli_help_without_tensorflow(edge_venv):
    exe = str(edge_venv / "bin" / "taxonedge")
    for args in (["--help"], ["run", "--help"], ["inspect", "--help"], ["train", "--help"]):
        proc = run_in(edge_venv, exe, *args)
        assert proc.returncode == 0, proc.stderr
        assert "usage: taxonedge" in proc.stdout
    assert "--config" in run_in(edge_venv, exe, "run", "--help").stdout


def test_device_modules_classify_a_real_bundle(edge_venv, tmp_path):
    from .tinymodels import tiny_bundle_bytes

    bundle = tmp_path / "tiny.tebundle"
    bundle.write_bytes(tiny_bundle_bytes())
    code = textwrap.dedent(f"""
        import sys
        from taxonedge.edge.kernel.bundle import read_bundle
        from taxonedge.edge.kernel.runtime import Classifier, interpreter_module
        from taxonedge.edge.kernel.decode import Decoder
        b = read_bundle({str(bundle)!r})
        c = Classifier(b)
        inputs, outputs = b.golden()
        assert all((c.raw(x) == y).all() for x, y in zip(inputs, outputs)), "golden mismatch"
        d = Decoder(b.taxonomy, {{}}).decode(c.probabilities(inputs[0]))
        print(interpreter_module()[1], d.label)
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
    """)
    proc = run_in(edge_venv, str(edge_venv / "bin" / "python"), "-c", code)
    assert proc.returncode == 0, proc.stderr
    runtime, label = proc.stdout.split()
    assert runtime == "ai_edge_litert"
    assert label == sorted(TINY_LABELS)[0]
    proc = run_in(edge_venv, str(edge_venv / "bin" / "taxonedge"), "inspect", str(bundle))
    assert proc.returncode == 0 and "fully integer" in proc.stdout, proc.stderr
