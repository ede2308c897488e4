"""examples/config.toml: it validates, and it shows every key of the config models with its default."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from taxonedge.edge.service.config import Config

from .conftest import REPO

EXAMPLE = REPO / "examples" / "config.toml"

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def shown_keys(text: str) -> tuple[dict[tuple[str, str], object], set[str]]:
    """{(table, key): value} for every assignment, commented out or not, and every table header.

    A commented-out line counts (`# num_threads = 2` shows an optional key); each `[source]` block is
    named by its type (`source:video`), as the config models tell the sources apart.
    """
    keys: dict[tuple[str, str], object] = {}
    tables: set[str] = set()
    table = ""
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        if line.startswith("[") and line.endswith("]"):
            table = line.strip("[]").strip()
            tables.add(table)
            continue
        try:
            ((key, value),) = tomllib.loads(line).items()
        except (tomllib.TOMLDecodeError, ValueError):  # prose in a comment
            continue
        if table == "source" and key == "type":
            table = f"source:{value}"
            tables.add(table)
        keys.setdefault((table, key), value)
    return keys, tables


def model_fields(model: type[BaseModel], table: str = "") -> typing.Iterator[tuple[str, str, object]]:
    """(table, key, default) of every leaf key; nested models are tables, the source union one per type."""
    for key, field in model.model_fields.items():
        name = f"{table}.{key}" if table else key
        args = typing.get_args(field.annotation)
        if key == "source":  # the union of source types, told apart by `type`
            for variant in args:
                source_type = typing.get_args(variant.model_fields["type"].annotation)[0]
                yield from model_fields(variant, f"source:{source_type}")
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from model_fields(field.annotation, name)
        elif any(isinstance(a, type) and issubclass(a, BaseModel) for a in args):  # optional table: tls
            (sub,) = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            yield name, "", None
            yield from model_fields(sub, name)
        else:
            yield table, key, field.default


def test_the_example_shows_every_key_with_its_default() -> None:
    keys, tables = shown_keys(EXAMPLE.read_text(encoding="utf-8"))
    fields = list(model_fields(Config))
    assert len(fields) > 60 and "source:folder" in tables  # the walk found the models, sources and all
    problems = []
    for table, key, default in fields:
        if not key:  # an optional table such as [mqtt.tls]
            if table not in tables:
                problems.append(f"[{table}] is not shown")
            continue
        if (table, key) not in keys:
            problems.append(f"{table}.{key} is not shown")
        elif key != "type" and default not in (None, PydanticUndefined):
            shown = keys[(table, key)]
            expected = str(default) if isinstance(default, Path) else default
            if shown != expected and not (isinstance(default, tuple | list) and list(default) == shown):
                problems.append(f"{table}.{key} = {shown!r} but its default is {expected!r}")
    assert not problems, "\n".join(problems)


def test_the_walk_notices_a_missing_key_and_a_wrong_default() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    keys, _ = shown_keys(text.replace("chunk_retries = 3", "chunk_retries = 4").replace("max_waiting", "#"))
    assert keys[("model.update", "chunk_retries")] == 4
    assert ("trigger", "max_waiting") not in keys and ("inference", "num_threads") in keys


def test_the_example_validates_from_the_repository_root() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "taxonedge", "run", "--validate-config", "examples/config.toml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("examples/config.toml: valid (video source"), proc.stdout


@pytest.mark.parametrize("path", ["examples/models/grocery/grocery.tebundle", "examples/demo/belt.mp4"])
def test_the_files_the_example_names_are_in_the_repository(path: str) -> None:
    assert f'"{path}"' in EXAMPLE.read_text(encoding="utf-8") and (REPO / path).is_file()
