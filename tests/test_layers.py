"""The layers and which way the arrows go, read from the source (every import, lazy ones included).

The layers are the folders of edge/ (a module's layer is the subpackage it sits in):
- kernel (edge/kernel/): the contract the host and the device share: bundle, taxonomy, preprocessing,
  signing, decoding, the runtime and its backends (edge/kernel/backends/), the wire protocol and its
  schemas. It imports only itself.
- service (edge/service/): the device daemon and its stages. It imports the kernel and itself, never the
  tools and never the CLI's errors (the core raises its own; the CLI maps them to exit codes).
- tools (edge/tools/): the operator's commands (cli, deploy, listen, inspect, sign). Anything in edge/.
- host (train/, convert/): the kernel of edge/ only, never the device service or tools.
edge/ never imports train/ or convert/. No module sits directly in edge/ but its (light) __init__.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

LAYERS = ("kernel", "service", "tools")
PACKAGES = {"edge": "taxonedge.edge", "train": "taxonedge.train", "convert": "taxonedge.convert"}


def imports(path: Path, package: str) -> set[str]:
    """Absolute module names `path` imports (relative ones resolved), at any depth of the file. For
    `from M import n`, `M.n` is listed too (n may be a module: `from taxonedge.edge import service`)."""
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
            found |= {f"{base}.{alias.name}" for alias in node.names if alias.name != "*"}
    return {name for name in found if name.startswith("taxonedge")}


def edge_layer(name: str) -> str | None:
    """The layer of edge/ a module name lies in (`taxonedge.edge.kernel.bundle` -> kernel), else None."""
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["taxonedge", "edge"] else None


def misplaced(edge: Path) -> list[str]:
    """What lies in edge/ outside the three layers: modules directly in it (but __init__.py), other
    folders, a layer without its __init__.py."""
    found = [
        f"{p.name}: put it in a layer ({', '.join(LAYERS)})"
        for p in edge.glob("*.py")
        if p.name != "__init__.py"
    ]
    for folder in sorted(p for p in edge.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if folder.name not in LAYERS:
            found.append(f"{folder.name}/: not a layer ({', '.join(LAYERS)}); move its modules into one")
    for layer in LAYERS:
        if not (edge / layer / "__init__.py").is_file():
            found.append(f"{layer}/__init__.py is missing")
    return sorted(found)


def edge_problem(layer: str | None, target: str) -> str | None:
    """Why a module of edge/ in `layer` (None: edge/__init__.py) may not import `target`, else None."""
    if target.startswith(("taxonedge.train", "taxonedge.convert")):
        return "the device never imports the host stage"
    to = edge_layer(target)
    if layer is None:
        return "edge/__init__.py stays light: it imports no layer" if to is not None else None
    if layer == "kernel" and to is not None and to != "kernel":
        return "the kernel imports only the kernel"
    if layer in ("kernel", "service") and target.startswith("taxonedge.cli"):
        return "the core raises its own errors; the CLI maps them"
    if layer == "service" and to == "tools":
        return "the service never imports operator tools"
    return None


def test_every_edge_module_has_a_layer():
    problems = misplaced(REPO / "edge")
    assert not problems, "\n".join(problems)


def test_arrows_point_one_way():
    problems = []
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            sub = path.parent.relative_to(REPO / folder).parts
            package_of_file = ".".join([package, *sub])
            layer = sub[0] if sub else None  # edge/kernel/backends/cpu.py is in the kernel
            for target in sorted(imports(path, package_of_file)):
                where = f"{path.relative_to(REPO)} imports {target}"
                if folder == "edge":
                    why = edge_problem(layer, target)
                    if why:
                        problems.append(f"{where}: {why}")
                elif edge_layer(target) not in (None, "kernel"):
                    problems.append(f"{where}: the host uses the kernel of edge/ only")
    assert not problems, "\n".join(problems)


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: a kernel module reaching into the service is found, in every spelling."""
    bad = tmp_path / "decode.py"
    bad.write_text(
        "from ..service.daemon import Daemon\nfrom ..service import update\nfrom . import bundle\n"
    )
    found = imports(bad, "taxonedge.edge.kernel")
    assert found == {
        "taxonedge.edge.service.daemon",
        "taxonedge.edge.service.daemon.Daemon",
        "taxonedge.edge.service",
        "taxonedge.edge.service.update",
        "taxonedge.edge.kernel",
        "taxonedge.edge.kernel.bundle",
    }
    assert edge_problem("kernel", "taxonedge.edge.service.update")
    assert not edge_problem("kernel", "taxonedge.edge.kernel.bundle")
    assert edge_problem("service", "taxonedge.edge.tools.deploy")
    assert edge_problem("service", "taxonedge.cli.CliError")
    assert not edge_problem("tools", "taxonedge.edge.service.daemon")
    assert edge_problem("tools", "taxonedge.train.trainer")
    assert edge_problem(None, "taxonedge.edge.kernel.bundle")


def test_the_layout_check_catches_a_stray_module(tmp_path):
    edge = tmp_path / "edge"
    for layer in LAYERS:
        (edge / layer).mkdir(parents=True)
        (edge / layer / "__init__.py").write_text("")
    (edge / "__init__.py").write_text("")
    assert misplaced(edge) == []
    (edge / "stray.py").write_text("")
    (edge / "extras").mkdir()
    assert misplaced(edge) == [
        "extras/: not a layer (kernel, service, tools); move its modules into one",
        "stray.py: put it in a layer (kernel, service, tools)",
    ]
