"""Device config: validated, unknown keys rejected, errors name the key and the line."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from taxonedge.edge.service.config import ConfigError, load_config, parse_config

from .conftest import run_cli

GOOD = """\
[device]
id = "cam-1"
site = "dc-north"
line = "sorter-2"
state_dir = "/tmp/taxonedge-state"

[model]
bundle = "/opt/models/grocery.tebundle"
require_signature = false

[source]
type = "video"
path = "/data/belt.mp4"
loop = true

[mqtt]
host = "127.0.0.1"
port = 1883
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_good_config_parses():
    cfg = parse_config(GOOD)
    assert cfg.topic_base == "taxonedge/dc-north/sorter-2/cam-1"
    assert cfg.source.type == "video" and cfg.source.loop is True
    assert cfg.mqtt.protocol == "v5" and cfg.inference.backend == "auto"


def test_typo_names_key_and_line(tmp_path):
    text = GOOD.replace("loop = true", "lop = true")
    path = tmp_path / "device.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:{line_of(text, 'lop = true')}: source.lop: unknown key" in str(err.value)


def test_wrong_type_names_key_and_line():
    text = GOOD.replace("port = 1883", 'port = "eighteen"')
    with pytest.raises(ConfigError, match=rf"config:{line_of(text, 'port =')}: mqtt.port: .*integer"):
        parse_config(text)
    with pytest.raises(ConfigError, match=r"config:2: device.id: .*single MQTT topic level"):
        parse_config(GOOD.replace('id = "cam-1"', 'id = "cam/1"'))


@pytest.mark.parametrize("host", ["broker\\nx", "my broker", ""])
def test_a_host_with_a_space_or_a_control_character_is_refused_on_its_line(host):
    """It could only fail at connect time, after --validate-config said valid."""
    text = GOOD.replace('host = "127.0.0.1"', f'host = "{host}"')
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"config:{line_of(text, 'host =')}: mqtt.host: must be a host name"), line
    text = GOOD + f'\n[health]\nprometheus_host = "{host}"\n'
    with pytest.raises(ConfigError, match=r"health.prometheus_host: must be a host name"):
        parse_config(text)


def test_unknown_section_and_missing_section():
    text = GOOD + '\n[mqqt]\nhost = "x"\n'
    with pytest.raises(ConfigError, match=rf"config:{line_of(text, '[mqqt]')}: mqqt: unknown key"):
        parse_config(text)
    with pytest.raises(ConfigError, match=r"source: required key is missing"):
        parse_config(GOOD.split("[source]")[0])


def test_signature_needs_a_key_unless_turned_off():
    with pytest.raises(ConfigError, match="model: .*require_signature is true but no public_key"):
        parse_config(GOOD.replace("require_signature = false\n", ""))


def test_secrets_from_file_credentials_or_environment(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = parse_config(GOOD + f'username = "cam-1"\npassword_file = "{tmp_path / "pw"}"\n')
    assert cfg.mqtt.password() == "s3cret"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert parse_config(GOOD + 'password_file = "pw"\n').mqtt.password() == "s3cret"
    monkeypatch.setenv("TAXONEDGE_MQTT_PASSWORD", "from-env")
    assert parse_config(GOOD + 'password_env = "TAXONEDGE_MQTT_PASSWORD"\n').mqtt.password() == "from-env"
    with pytest.raises(ConfigError, match="password_env: environment variable NOPE is not set"):
        parse_config(GOOD + 'password_env = "NOPE"\n').mqtt.password()
    # the config has no key for a literal password
    with pytest.raises(ConfigError, match="mqtt.password: unknown key"):
        parse_config(GOOD + 'password = "plain"\n')


def test_not_toml():
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[device\nid=")


def test_max_in_flight_auto_follows_the_invoke_time():
    """auto: a second frame waits at the worker only while the invoke is short (an Edge TPU, a fast CPU),
    where the pipe between two invokes is a large share; a slow invoke keeps one (latency)."""
    inference = parse_config(GOOD).inference
    assert inference.max_in_flight == "auto"
    assert inference.in_flight_limit(0.0) == 1  # no invoke measured yet
    assert inference.in_flight_limit(0.003) == 2
    assert inference.in_flight_limit(0.050) == 1
    pinned = parse_config(GOOD + "\n[inference]\nmax_in_flight = 1\n").inference
    assert pinned.in_flight_limit(0.003) == 1
    for bad in ("3", '"fast"'):
        text = GOOD + f"\n[inference]\nmax_in_flight = {bad}\n"
        with pytest.raises(
            ConfigError, match=rf"config:{line_of(text, 'max_in_flight')}: inference.max_in_flight"
        ):
            parse_config(text)


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        ("[0, 0, 100]", "expected 4 whole numbers [x, y, width, height] in pixels, got [0, 0, 100]"),
        (
            "[0, 0, 100, 100, 5]",
            "expected 4 whole numbers [x, y, width, height] in pixels, got [0, 0, 100, 100, 5]",
        ),
        (
            '[0, "a", 100, 100]',
            "expected 4 whole numbers [x, y, width, height] in pixels, got [0, 'a', 100, 100]",
        ),
        ("[0, 0, 1.5, 100]", "expected 4 whole numbers"),
        ("[0, true, 100, 100]", "expected 4 whole numbers"),
        ("[0, 0, -100, 100]", "x and y must be >= 0, width and height > 0; got [0, 0, -100, 100]"),
    ],
)
def test_wrong_roi_gets_one_line_with_the_key_the_line_and_what_a_roi_is(tmp_path, roi, message):
    text = GOOD + f"\n[capture]\nstall_timeout_s = 5\nroi = {roi}\n"
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    # one line on the list's key: not pydantic's "capture.roi.3: Field required" per missing item
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{path}:{line_of(text, 'roi =')}: capture.roi: {message}"), line


def test_non_utf8_config_is_one_line_with_file_line_and_column(tmp_path):
    """The issue's reproduction, through the real command: one line, exit 2, no UnicodeDecodeError
    traceback."""
    path = tmp_path / "c.toml"
    path.write_bytes(GOOD.encode() + b"# caf\xe9\n")
    proc = run_cli("run", "--validate-config", str(path), check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = len(GOOD.splitlines()) + 1
    assert proc.stderr.splitlines() == [
        f"taxonedge run: error: {path}:{line}:6: not UTF-8 (byte 0xe9 at offset {len(GOOD) + 5}): "
        "TOML files must be UTF-8; save the file as UTF-8"
    ]


def test_deep_nesting_and_control_characters_in_keys_stay_one_line():
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config("a = " + "[" * 5000)
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD + '"x\\ny" = 1\n')
    (line,) = str(err.value).splitlines()
    assert r"mqtt.x\ny: unknown key" in line


# ---- bytes-level fuzz of config files through `taxonedge run --validate-config` ----------------------------


def _seed(folder: Path) -> bytes:
    # valid as it stands (validate() finds nothing): a folder source that exists, no bundle to read
    return (
        GOOD.replace('type = "video"\npath = "/data/belt.mp4"', f'type = "folder"\npath = "{folder}"')
        .replace("/opt/models/grocery.tebundle", str(folder / "missing.tebundle"))
        .replace('bundle = "', '# bundle = "')
        + '\n[trigger]\nmode = "item"\nmax_waiting = 10\n'
    ).encode()


@st.composite
def config_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """A config file as a user or a broken disk could leave it: the valid seed with bytes replaced, inserted,
    deleted or repeated, or random bytes, or bytes that are not UTF-8."""
    kind = draw(st.sampled_from(["replace", "insert", "delete", "repeat", "random", "latin1"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "latin1":
        return seed.replace(
            b"sorter-2", draw(st.sampled_from([b"sorter-\xe9", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80"]))
        )
    start = draw(st.integers(0, len(seed)))
    end = draw(st.integers(start, min(len(seed), start + 40)))
    chunk = draw(
        st.one_of(
            st.binary(min_size=1, max_size=12),
            st.sampled_from([b"[", b"]", b"=", b'"', b"\n", b"#", b"\x00", b"\\", b"{", b"."]),
        )
    )
    if kind == "replace":
        return seed[:start] + chunk + seed[end:]
    if kind == "insert":
        return seed[:start] + chunk + seed[start:]
    if kind == "delete":
        return seed[:start] + seed[end:]
    return seed[:end] + seed[start:end] + seed[end:]


_ANSWER = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)*: ")  # a problem validate() names by its key


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_config_files_are_valid_or_refused_with_one_line_each(tmp_path, data):
    """Every input is valid (exit 0) or refused (exit 2) with lines that each name the file (with the line
    where one can be told) or the key; never a traceback, never another exit status."""
    from taxonedge.cli import main

    folder = tmp_path / "frames"
    folder.mkdir(exist_ok=True)
    content = data.draw(config_bytes(_seed(folder)), label="config")
    path = tmp_path / "device.toml"
    path.write_bytes(content)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", "--validate-config", str(path)])
    if code == 0:
        assert out.getvalue().startswith(f"{path}: valid ("), out.getvalue()
        assert err.getvalue() == ""
        return
    assert code == 2, (code, err.getvalue())
    first, *rest = err.getvalue().splitlines()
    assert first.startswith(f"taxonedge run: error: {path}") or _ANSWER.match(
        first.removeprefix("taxonedge run: error: ")
    ), first
    for line in rest:
        assert line.startswith(f"{path}") or _ANSWER.match(line), line
    assert "Traceback" not in err.getvalue()


@pytest.mark.parametrize("escape, shown", [("\\f", "\\x0c"), ("\\n", "\\n"), ("\\u2028", "\\u2028")])
def test_a_missing_path_with_a_line_break_in_it_is_one_problem_on_one_line(tmp_path, escape, shown):
    """validate()'s problems name paths from the file, which TOML escapes can fill with line breaks (a
    form feed is one to str.splitlines): each problem stays one line, the character shown escaped. Found by
    the fuzz above."""
    folder = tmp_path / "frames"
    folder.mkdir()
    path = tmp_path / "c.toml"
    path.write_bytes(
        _seed(folder).replace(f'path = "{folder}"'.encode(), f'path = "{folder}{escape}x"'.encode())
    )
    proc = run_cli("run", "--validate-config", str(path), check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"taxonedge run: error: source.path: {folder}{shown}x does not exist (the daemon would keep retrying)"
    ]


def test_the_seed_of_the_fuzz_is_valid(tmp_path):
    """The fuzz mutates a config that validates, so that near-valid inputs (one key wrong) are reached."""
    folder = tmp_path / "frames"
    folder.mkdir()
    (tmp_path / "c.toml").write_bytes(_seed(folder))
    proc = run_cli("run", "--validate-config", str(tmp_path / "c.toml"), check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
