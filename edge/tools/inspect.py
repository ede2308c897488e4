"""`taxonedge inspect BUNDLE`: verify a bundle and show what it holds, for people or (--json) machines."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..kernel.bundle import Bundle, BundleError, CentroidTerm, read_bundle
from ..kernel.signing import SigningKeyError, load_public_key


def model_ops(model: bytes) -> dict[str, Any]:
    """Operators (execution order counts) and tensor dtypes of a TFLite model, through the device's
    interpreter (no TensorFlow). Default delegates are off so the list is the model's own ops."""
    from ..kernel.runtime import interpreter_module

    module, _ = interpreter_module()
    resolver = getattr(module, "OpResolverType", None)
    kwargs = {"experimental_op_resolver_type": resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if resolver else {}
    interpreter = module.Interpreter(model_content=model, **kwargs)
    ops: dict[str, int] = {}
    for op in interpreter._get_ops_details():  # the only API that lists ops; stable across LiteRT releases
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    dtypes: dict[str, int] = {}
    for tensor in interpreter.get_tensor_details():
        name = getattr(tensor["dtype"], "__name__", str(tensor["dtype"]))
        dtypes[name] = dtypes.get(name, 0) + 1
    float_tensors = dtypes.get("float32", 0) + dtypes.get("float16", 0)
    return {
        "ops": dict(sorted(ops.items())),
        "tensor_dtypes": dict(sorted(dtypes.items())),
        "fully_integer": float_tensors == 0,
    }


def signature_words(bundle: Bundle) -> str:
    key = bundle.manifest.signing_key_id
    if bundle.signature_status == "valid":
        return f"valid (key {key})"
    if bundle.signature_status == "not checked":
        return f"present, not checked (signed by key {key}; pass --pubkey KEY to verify)"
    return "unsigned"


def edgetpu_words(bundle: Bundle) -> str:
    report = bundle.manifest.edgetpu
    compiled = "model_edgetpu.tflite included" if bundle.has_edgetpu_model else "no Edge TPU model (CPU only)"
    if not report:
        return compiled
    return f"{report.get('status', '?')} - {report.get('summary', '')} [{compiled}]"


def describe(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    files = {name: entry.size for name, entry in m.files.items()}
    info: dict[str, Any] = {
        "path": str(bundle.path) if bundle.path else None,
        "sha256": bundle.sha256,
        "signature": bundle.signature_status,
        "signature_text": signature_words(bundle),
        "signing_key_id": m.signing_key_id,
        "manifest": m.model_dump(mode="json", exclude={"taxonomy"}),
        "taxonomy": {
            "summary": bundle.taxonomy.summary(),
            "hash": m.taxonomy_hash,
            "leaves": bundle.taxonomy.leaf_labels,
        },
        "file_sizes": files,
        "bundle_size": (len(bundle.manifest_bytes) + sum(files.values())),
        "edgetpu": {
            "status": m.edgetpu.get("status", "unknown"),
            "text": edgetpu_words(bundle),
            "has_model": bundle.has_edgetpu_model,
            "warnings": m.edgetpu.get("warnings", []),
        },
    }
    if bundle.path is not None:
        info["bundle_size"] = bundle.path.stat().st_size
    try:
        info["model"] = model_ops(bundle.model_bytes())
    except (ImportError, ValueError, RuntimeError) as exc:
        info["model"] = {"error": str(exc)}
    return info


def render(info: dict[str, Any]) -> str:
    m = info["manifest"]
    model = m["model"]
    q = m["quantization"]
    lines = [
        f"bundle     {info['path'] or '-'}  ({info['bundle_size'] / 1e6:.2f} MB)",
        f"sha256     {info['sha256']}",
        f"signature  {info['signature_text']}",
        f"model      {model['name']} {model['version']}  backbone {model['backbone']}  created "
        f"{model['created_at']}",
        f"format     {m['format']} v{m['format_version']}  compatible '{m['compatible']}'  "
        f"min daemon {m['min_daemon_version']}",
        f"taxonomy   {info['taxonomy']['summary']}  {info['taxonomy']['hash'][:23]}...",
        f"input      {m['input']['height']}x{m['input']['width']}x3 {m['input']['color_order']} "
        f"{m['input']['dtype']} "
        f"(scale {m['input']['scale']:g}, zero point {m['input']['zero_point']}; crop {m['input']['crop']} "
        f"{m['input']['crop_fraction']:g}, resize {m['input']['resize']})",
        f"output     '{m['output']['name']}' {m['output']['kind']} x{m['output']['num_classes']} "
        f"{m['output']['dtype']} (scale {m['output']['scale']:g}, zero point {m['output']['zero_point']})",
        *_v3_lines(m),
        f"quantized  {q['mode']}"
        + (" (quantization-aware)" if q["qat"] else "")
        + (f", {q['calibration_images']} calibration images" if q["calibration_images"] else "")
        + f", temperature {m['temperature']:g}",
        "thresholds "
        + (", ".join(f"{k} {v:.3f}" for k, v in m["thresholds"].items()) or "none (accept all)")
        + _threshold_note((m.get("metrics") or {}).get("thresholds") or {}),
        "files      " + ", ".join(f"{n} {s / 1e6:.2f} MB" for n, s in info["file_sizes"].items()),
    ]
    ops = info.get("model", {})
    if "ops" in ops:
        lines.append("ops        " + ", ".join(f"{k} x{v}" for k, v in ops["ops"].items()))
        lines.append(
            "tensors    "
            + ", ".join(f"{k} x{v}" for k, v in ops["tensor_dtypes"].items())
            + ("  (fully integer)" if ops["fully_integer"] else "  (NOT fully integer)")
        )
    elif "error" in ops:
        lines.append(f"ops        cannot list: {ops['error']}")
    lines.append(f"edge tpu   {info['edgetpu']['text']}")
    lines.extend(f"  warning  {w}" for w in info["edgetpu"]["warnings"])
    if m["golden"]:
        g = m["golden"]
        lines.append(
            f"golden     {g.get('count', '?')} self-test images, tolerance {g.get('tolerance', '?')} "
            f"{g.get('unit', '')}".rstrip()
        )
    lines.extend(_metrics_lines(m["metrics"]))
    return "\n".join(lines)


def _threshold_note(chosen: dict[str, Any]) -> str:
    """What the converter chose the thresholds for, and what its two-fold check says they give."""
    if "target_precision" not in chosen:
        return ""
    rule = chosen.get("rule", "per_depth")
    note = f"  (for {chosen['target_precision']:g} precision, {rule.replace('_', ' ')}"
    check = dict(chosen.get("two_fold_check") or {})
    published = check.pop("published", None)
    if check:
        note += (
            "; two-fold check "
            + " / ".join(
                "-" if row["precision"] is None else f"{100 * row['precision']:.1f}" for row in check.values()
            )
            + " %"
        )
    if published and published["precision"] is not None:
        note += f", published {100 * published['precision']:.1f} %"
    return note + ")"


def _metrics_lines(metrics: dict[str, Any]) -> list[str]:
    """Per-level accuracy table when the converter's metrics are there, else the raw JSON."""
    levels = metrics.get("per_level")
    if not levels:
        return ["metrics    " + json.dumps(metrics, sort_keys=True)[:2000]] if metrics else []
    quant = next((k for k in next(iter(levels.values())) if k not in ("float", "drop_points")), "quantized")
    gate = metrics.get("gate", {})
    lines = [
        f"accuracy   {'level':<10} {'float':>7} {quant:>8} {'drop':>7}   (validation, "
        f"n={metrics.get('float', {}).get('n', '?')})"
    ]
    for key, row in levels.items():
        lines.append(
            f"           {key:<10} {row['float'] * 100:6.1f}% {row.get(quant, 0) * 100:7.1f}% "
            f"{row['drop_points']:+6.2f}"
        )
    lines.append(
        f"           top-1 agreement {metrics.get('agreement', 0) * 100:.1f}%; gate "
        + ("passed" if gate.get("passed") else "FAILED (written with --force)")
        + f" (max drop {gate.get('max_drop_points', '?')} points)"
    )
    return lines


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


def _v3_lines(m: dict) -> list[str]:
    """The embedding output and the open-set threshold of a format v3 bundle."""
    lines = []
    if m.get("embedding"):
        e = m["embedding"]
        lines.append(
            f"embedding  '{e['name']}' x{e['size']} {e['dtype']} (scale {e['scale']:g}, zero point "
            f"{e['zero_point']})"
        )
    if (m.get("output") or {}).get("centroid"):
        lines.append("centroid   " + CentroidTerm.model_validate(m["output"]["centroid"]).formula())
    if m.get("open_set"):
        o = m["open_set"]
        report = (m.get("metrics") or {}).get("open_set") or {}
        rejected = report.get("known_rejected")
        lines.append(
            f"open set   {o['score']} below {o['threshold']:g} is unknown (unfamiliar); lets "
            f"{100 * o['known_pass_rate']:.1f} % of known validation images through"
            + (f" ({100 * rejected:.1f} % rejected as converted)" if rejected is not None else "")
        )
    return lines
