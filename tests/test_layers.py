"""The layers and which way the arrows go, read from the source (every import, lazy ones included).

- kernel (edge/): the contract the host and the device share: bundle, taxonomy, preprocessing, signing,
  decoding, the runtime and its backends (edge/backends/), the wire protocol. It imports only itself.
- service (edge/): the device daemon and its stages. It imports the kernel and itself, never the tools and
  never the CLI's errors (the core raises its own; the CLI maps them to exit codes).
- tools (edge/): the operator's commands (cli, deploy, listen, inspect, sign). Anything in edge/.
- host (train/, convert/): the kernel of edge/ only, never the device service or tools.
edge/ never imports train/ or convert/.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

KERNEL = {
    "bundle",
    "taxonomy",
    "preprocess",
    "signing",
    "decode",
    "runtime",
    "protocol",
    "schemas",
    "backends",
    "thresholds",
    "files",
}
SERVICE = {
    "config",
    "daemon",
    "pipeline",
    "serving",
    "control",
    "health",
    "publish",
    "source",
    "infer",
    "outbox",
    "mqtt",
    "update",
    "transfer",
    "vetting",
    "slots",
    "trigger",
    "notify",
    "osthread",
}
TOOLS = {"cli", "deploy", "listen", "inspect"}
PACKAGES = {"edge": "taxonedge.edge", "train": "taxonedge.train", "convert": "taxonedge.convert"}


def imports(path: Path, package: str) -> set[str]:
    """Absolute module names `path` imports (relative ones resolved), at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            if not node.module:  # `from . import update`
                found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("taxonedge")}


def edge_module(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["taxonedge", "edge"] else None


def test_every_edge_module_has_a_layer():
    modules = {p.stem for p in (REPO / "edge").glob("*.py") if p.stem != "__init__"}
    assert modules <= KERNEL | SERVICE | TOOLS, f"put {sorted(modules - KERNEL - SERVICE - TOOLS)} in a layer"


def test_arrows_point_one_way():
    problems = []
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            sub = path.parent.relative_to(REPO / folder).parts
            name = sub[0] if sub else path.stem  # edge/backends/cpu.py is in the layer of `backends`
            package_of_file = ".".join([package, *sub])
            for target in sorted(imports(path, package_of_file)):
                module = edge_module(target)
                where = f"{folder}/{path.name} imports {target}"
                if folder == "edge":
                    if target.startswith(("taxonedge.train", "taxonedge.convert")):
                        problems.append(f"{where}: the device never imports the host stage")
                    elif name in KERNEL and module is not None and module not in KERNEL:
                        problems.append(f"{where}: the kernel imports only the kernel")
                    elif name in KERNEL | SERVICE and target == "taxonedge.cli":
                        problems.append(f"{where}: the core raises its own errors; the CLI maps them")
                    elif name in SERVICE and module in TOOLS:
                        problems.append(f"{where}: the service never imports operator tools")
                elif module is not None and module not in KERNEL:
                    problems.append(f"{where}: the host uses the kernel of edge/ only")
    assert not problems, "\n".join(problems)


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: a kernel module reaching into the service is found."""
    bad = tmp_path / "decode.py"
    bad.write_text("from .daemon import Daemon\nfrom . import update\n")
    assert imports(bad, "taxonedge.edge") == {
        "taxonedge.edge.daemon",
        "taxonedge.edge",
        "taxonedge.edge.update",
    }
