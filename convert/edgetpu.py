"""Edge TPU checks: a static compatibility report of a TFLite model, and `edgetpu_compiler` runs and logs.

No TensorFlow here (LiteRT lists the ops), so the report can be made on any machine. The compiler maps
operations to the Edge TPU in execution order up to the first one it cannot map; everything after that
runs on the CPU, so one unsupported op early in the graph costs most of the speed-up ("splits the graph").
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from taxonedge.train.backbones import find_backbone

# TFLite builtin ops the Edge TPU compiler maps (coral.ai/docs/edgetpu/models-intro, "Supported operations"),
# for int8/uint8 tensors with static shapes. Anything else runs on the CPU and splits the graph.
SUPPORTED_OPS = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "DEQUANTIZE",
        "EXPAND_DIMS",
        "FULLY_CONNECTED",
        "L2_NORMALIZATION",
        "LOGISTIC",
        "LSTM",
        "MAXIMUM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "MUL",
        "PACK",
        "PAD",
        "PRELU",
        "QUANTIZE",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SQUARED_DIFFERENCE",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
    }
)
ON_CHIP_MEMORY_BYTES = 8 * 1024 * 1024  # parameters beyond this stream from host memory on every inference
COMPILER = "edgetpu_compiler"


class EdgeTpuError(RuntimeError):
    """The Edge TPU requirement (`--edgetpu require`) cannot be met; the message says why."""


def backbone_warnings(backbone: str, model_size: int | None = None) -> list[str]:
    """Why a backbone is a poor Edge TPU choice (its note in the backbone registry), plus a size warning for
    any model over the on-chip memory."""
    entry = find_backbone(backbone)  # None for a backbone the registry does not know: no note
    warnings = [entry.edgetpu_note] if entry and entry.edgetpu_note else []
    covered = entry is not None and entry.exceeds_on_chip_memory
    if model_size is not None and model_size > ON_CHIP_MEMORY_BYTES and not covered:
        warnings.append(
            f"the model is {model_size / 2**20:.1f} MiB, over the Edge TPU's 8 MiB on-chip memory: "
            "parameters that do not fit stream from the host on every inference"
        )
    return warnings


def check_model(model: bytes) -> dict[str, Any]:
    """Static Edge TPU report: ops against the supported list (in execution order), float tensors, dynamic
    shapes, and where the graph would split. `compatible` is True when the compiler should map everything."""
    from taxonedge.edge.kernel.runtime import interpreter_module

    module, _ = interpreter_module()
    # Without the default XNNPACK delegate, so the op list is the model's own (no DELEGATE nodes).
    interpreter = module.Interpreter(
        model_content=model,
        experimental_op_resolver_type=module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    details = interpreter._get_ops_details()  # execution order
    ops = [op["op_name"] for op in details]
    tensors = interpreter.get_tensor_details()
    is_float = {t["index"]: getattr(t["dtype"], "__name__", "") in {"float32", "float16"} for t in tensors}
    float_tensors = sorted({t["name"] for t in tensors if is_float[t["index"]]})
    float_ops = sorted(
        {
            op["op_name"]
            for op in details
            if any(is_float.get(int(i), False) for i in [*op["inputs"], *op["outputs"]] if i >= 0)
        }
    )
    dynamic = sorted({t["name"] for t in tensors if any(int(d) < 0 for d in t.get("shape_signature", []))})
    unsupported = sorted({op for op in ops if op not in SUPPORTED_OPS})
    first_bad = next((i for i, op in enumerate(ops) if op not in SUPPORTED_OPS), None)
    problems = []
    if unsupported:
        problems.append(
            f"unsupported ops {', '.join(unsupported)}: the graph splits at op #{first_bad} "
            f"({ops[first_bad]}); {len(ops) - first_bad} of {len(ops)} ops would run on the CPU"
        )
    if float_tensors:
        problems.append(
            f"{len(float_tensors)} float tensors (e.g. '{float_tensors[0]}', used by "
            f"{', '.join(float_ops) or 'no op'}): the Edge TPU needs a full-int8 model"
        )
    if dynamic:
        problems.append(
            f"{len(dynamic)} tensors with dynamic shapes (e.g. '{dynamic[0]}'): the Edge TPU "
            "needs static shapes"
        )
    return {
        "compatible": not problems,
        "ops_total": len(ops),
        "ops_supported": sum(op in SUPPORTED_OPS for op in ops),
        "unsupported_ops": unsupported,
        "split_at_op": first_bad,
        "float_tensors": len(float_tensors),
        "float_ops": float_ops,
        "dynamic_tensors": len(dynamic),
        "problems": problems,
    }


# ---- the compiler ---------------------------------------------------------------------------------
_NUMBER_LINES = {
    "edgetpu_ops": re.compile(r"Number of operations that will run on Edge TPU:\s*(\d+)"),
    "cpu_ops": re.compile(r"Number of operations that will run on CPU:\s*(\d+)"),
    "total_ops": re.compile(r"Total number of operations:\s*(\d+)"),
    "subgraphs": re.compile(r"Number of Edge TPU subgraphs:\s*(\d+)"),
}
_TEXT_LINES = {
    "compiler_version": re.compile(r"Edge TPU Compiler version\s+(\S+)"),
    "on_chip_memory_used": re.compile(r"On-chip memory used for caching model parameters:\s*(\S+)"),
    "on_chip_memory_remaining": re.compile(r"On-chip memory remaining for caching model parameters:\s*(\S+)"),
    "off_chip_memory_used": re.compile(
        r"Off-chip memory used for streaming uncached model parameters:\s*(\S+)"
    ),
}
# "CONV_2D                        52         Mapped to Edge TPU"
_OP_ROW = re.compile(r"^([A-Z][A-Z0-9_]+)\s+(\d+)\s+(\S.*?)\s*$")
_ERROR = re.compile(r"^(ERROR:.*|Internal compiler error.*|Model not quantized.*|.*[Ff]ailed.*)$")


def parse_compiler_log(text: str) -> dict[str, Any]:
    """Parse `edgetpu_compiler -s` output and/or its `*_edgetpu.log`: counts, memory, the per-op table
    (operator, count, status) and errors. `all_mapped` is True only when every op runs on the Edge TPU."""
    report: dict[str, Any] = {"compiled": "Model compiled successfully" in text}
    for key, pattern in _NUMBER_LINES.items():
        match = pattern.search(text)
        if match:
            report[key] = int(match.group(1))
    for key, pattern in _TEXT_LINES.items():
        match = pattern.search(text)
        if match:
            report[key] = match.group(1)
    operators: dict[tuple[str, str], int] = {}
    in_table = False
    errors = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Operator") and "Status" in stripped:
            in_table = True  # the table appears in both stdout and the .log: keep one copy of each row
            continue
        row = _OP_ROW.match(stripped) if in_table else None
        if row:
            operators[(row.group(1), row.group(3))] = int(row.group(2))
        elif _ERROR.match(stripped):
            errors.append(stripped)
    report["operators"] = [{"op": op, "count": n, "status": status} for (op, status), n in operators.items()]
    report["not_mapped"] = [r for r in report["operators"] if r["status"] != "Mapped to Edge TPU"]
    report["errors"] = errors
    if "cpu_ops" not in report and report["operators"]:
        report["cpu_ops"] = sum(r["count"] for r in report["not_mapped"])
        report["edgetpu_ops"] = sum(r["count"] for r in report["operators"]) - report["cpu_ops"]
    report["all_mapped"] = bool(report["compiled"] and report.get("cpu_ops", 1) == 0 and not errors)
    return report


def compile_model(
    model: bytes, compiler: str | None = None, timeout: float = 300
) -> tuple[bytes | None, dict]:
    """Run edgetpu_compiler on `model`. Returns (compiled model or None, parsed report). Raises
    FileNotFoundError when the compiler is not on PATH."""
    exe = shutil.which(compiler or COMPILER)
    if exe is None:
        raise FileNotFoundError(f"{compiler or COMPILER} is not on PATH")
    with tempfile.TemporaryDirectory(prefix="taxonedge-edgetpu-") as tmp:
        source = Path(tmp) / "model.tflite"
        source.write_bytes(model)
        try:
            proc = subprocess.run(
                [exe, "-s", "-o", tmp, str(source)], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return None, {
                "compiled": False,
                "all_mapped": False,
                "errors": [f"timed out after {timeout:.0f} s"],
            }
        log_file = Path(tmp) / "model_edgetpu.log"
        text = proc.stdout + "\n" + proc.stderr
        if log_file.exists():
            text += "\n" + log_file.read_text(errors="replace")
        report = parse_compiler_log(text)
        report["exit_code"] = proc.returncode
        compiled = Path(tmp) / "model_edgetpu.tflite"
        if proc.returncode != 0 or not compiled.exists():
            report["compiled"] = report["all_mapped"] = False
            if not report["errors"]:
                report["errors"] = [
                    f"exit code {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
                ]
            return None, report
        return compiled.read_bytes(), report


def edgetpu_report(
    model: bytes, mode: str, backbone: str, policy: str = "auto", compiler: str | None = None
) -> tuple[dict[str, Any], bytes | None]:
    """The manifest's `edgetpu` section and the compiled model (or None).

    policy: "auto" compiles when the compiler is on PATH; "require" fails (EdgeTpuError) unless the model is
    full int8 and compiles with every op mapped; "skip" only makes the static report.
    """
    if mode != "int8":
        if policy == "require":
            raise EdgeTpuError(
                f"--mode {mode} cannot run on the Edge TPU (it needs full int8): use --mode int8 "
                "or --edgetpu skip"
            )
        return {
            "status": "not applicable",
            "summary": f"{mode} model: CPU only (the Edge TPU needs full int8)",
            "warnings": backbone_warnings(backbone, len(model)),
        }, None
    static = check_model(model)
    report: dict[str, Any] = {"static": static, "warnings": backbone_warnings(backbone, len(model))}
    if policy == "skip":
        report["status"] = "skipped"
        report["summary"] = "compiler not run (--edgetpu skip); static check: " + _static_words(static)
        return report, None
    try:
        compiled, log = compile_model(model, compiler)
    except FileNotFoundError:
        if policy == "require":
            raise EdgeTpuError(
                f"{compiler or COMPILER} is not on PATH; it is needed for --edgetpu require "
                "(install it on an x86-64 Debian host from Coral's apt repository)"
            ) from None
        report["status"] = "compiler not found"
        report["summary"] = (
            f"{compiler or COMPILER} not on PATH: shipping the CPU model only; static check: "
            + _static_words(static)
        )
        return report, None
    report["compiler"] = log
    if compiled is None:
        report["status"] = "compile failed"
        report["summary"] = "edgetpu_compiler failed: " + "; ".join(log.get("errors", []))[:300]
    elif log["all_mapped"]:
        report["status"] = "compiled"
        report["summary"] = (
            f"compiled, all {log.get('edgetpu_ops', '?')} ops on the Edge TPU "
            f"(on-chip memory {log.get('on_chip_memory_used', '?')})"
        )
    else:
        names = ", ".join(sorted({r["op"] for r in log["not_mapped"]})) or "unknown"
        report["status"] = "partially mapped"
        report["summary"] = (
            f"compiled, but {log.get('cpu_ops', '?')} ops run on the CPU ({names}); "
            f"{log.get('edgetpu_ops', '?')} on the Edge TPU"
        )
    if policy == "require" and (compiled is None or not log["all_mapped"]):
        raise EdgeTpuError(f"--edgetpu require: {report['summary']}")
    return report, compiled


def _static_words(static: dict[str, Any]) -> str:
    if static["compatible"]:
        return f"all {static['ops_total']} ops supported, fully int8, static shapes"
    return "; ".join(static["problems"])
