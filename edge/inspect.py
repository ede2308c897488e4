"""`taxonedge inspect BUNDLE`: verify a bundle and show what it holds, for people or (--json) machines."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .bundle import Bundle, BundleError, read_bundle
from .signing import SigningKeyError, load_public_key


def model_ops(model: bytes) -> dict[str, Any]:
    """Operators and tensor dtypes of a TFLite model, through the device's interpreter (no TensorFlow)."""
    from .runtime import interpreter_module

    module, _ = interpreter_module()
    interpreter = module.Interpreter(model_content=model)
    ops: dict[str, int] = {}
    for op in interpreter._get_ops_details():  # the only API that lists ops; stable across LiteRT releases
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    dtypes: dict[str, int] = {}
    for tensor in interpreter.get_tensor_details():
        name = getattr(tensor["dtype"], "__name__", str(tensor["dtype"]))
        dtypes[name] = dtypes.get(name, 0) + 1
    float_tensors = dtypes.get("float32", 0) + dtypes.get("float16", 0)
    return {"ops": dict(sorted(ops.items())), "tensor_dtypes": dict(sorted(dtypes.items())),
            "fully_integer": float_tensors == 0}


def describe(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    files = {name: entry.size for name, entry in m.files.items()}
    info: dict[str, Any] = {
        "path": str(bundle.path) if bundle.path else None,
        "sha256": bundle.sha256,
        "signature": bundle.signature_status,
        "signing_key_id": m.signing_key_id,
        "manifest": m.model_dump(mode="json", exclude={"taxonomy"}),
        "taxonomy": {"summary": bundle.taxonomy.summary(), "hash": m.taxonomy_hash,
                     "leaves": bundle.taxonomy.leaf_labels},
        "file_sizes": files,
    }
    try:
        info["model"] = model_ops(bundle.model_bytes())
    except ImportError as exc:
        info["model"] = {"error": str(exc)}
    return info


def render(info: dict[str, Any]) -> str:
    m = info["manifest"]
    model = m["model"]
    lines = [
        f"bundle     {info['path'] or '-'}",
        f"sha256     {info['sha256']}",
        f"signature  {info['signature']}" + (f" (key {info['signing_key_id']})" if info["signing_key_id"] else ""),
        f"model      {model['name']} {model['version']}  backbone {model['backbone']}  created {model['created_at']}",
        f"format     {m['format']} v{m['format_version']}  compatible '{m['compatible']}'  "
        f"min daemon {m['min_daemon_version']}",
        f"taxonomy   {info['taxonomy']['summary']}  {info['taxonomy']['hash'][:23]}...",
        f"input      {m['input']['height']}x{m['input']['width']}x3 {m['input']['color_order']} {m['input']['dtype']} "
        f"(scale {m['input']['scale']:g}, zero point {m['input']['zero_point']}; crop {m['input']['crop']} "
        f"{m['input']['crop_fraction']:g}, resize {m['input']['resize']})",
        f"output     '{m['output']['name']}' {m['output']['kind']} x{m['output']['num_classes']} "
        f"{m['output']['dtype']} (scale {m['output']['scale']:g}, zero point {m['output']['zero_point']})",
        f"quantized  {m['quantization']['mode']}" + (" (quantization-aware)" if m["quantization"]["qat"] else "")
        + f", temperature {m['temperature']:g}",
        "thresholds " + (", ".join(f"{k} {v:.3f}" for k, v in m["thresholds"].items()) or "none (accept all)"),
        "files      " + ", ".join(f"{n} {s / 1e6:.2f} MB" for n, s in info["file_sizes"].items()),
    ]
    ops = info.get("model", {})
    if "ops" in ops:
        lines.append("ops        " + ", ".join(f"{k} x{v}" for k, v in ops["ops"].items()))
        lines.append("tensors    " + ", ".join(f"{k} x{v}" for k, v in ops["tensor_dtypes"].items())
                     + ("  (fully integer)" if ops["fully_integer"] else "  (NOT fully integer)"))
    elif "error" in ops:
        lines.append(f"ops        cannot list: {ops['error']}")
    if m["edgetpu"]:
        lines.append(f"edge tpu   {m['edgetpu'].get('summary', json.dumps(m['edgetpu']))}")
    if m["metrics"]:
        lines.append("metrics    " + json.dumps(m["metrics"], sort_keys=True)[:2000])
    return "\n".join(lines)


def inspect_command(args: argparse.Namespace) -> int:
    from taxonedge.cli import CliError

    try:
        key = load_public_key(args.pubkey) if args.pubkey else None
        bundle = read_bundle(args.bundle, public_key=key)
    except (BundleError, SigningKeyError) as exc:
        raise CliError(str(exc), code=1) from None
    info = describe(bundle)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
