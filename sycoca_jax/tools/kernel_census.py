r"""The kernels a compiled step launches, and the bytes each moves, read from its optimised HLO.

  python -m sycoca_jax.tools.kernel_census STEP.hlo [--top=20] [--bandwidth_gb_s=4050] [--json]

Why: on one H200 the CoCa-B/32 step spent 70 % of its kernel time outside matrix products, and a
profile names fusions, not the model code behind them. The optimised program says it all before
any accelerator time is spent: every fusion, library call and copy is one kernel launch; a
``while`` loop (a scanned layer stack, the chunked loss) runs its body ``known_trip_count``
times; and a kernel's traffic is what it reads and writes. So a change to the model or to XLA's
flags can be judged by the traffic it removes, on a CPU host (``tools.compile_for_gpu`` compiles
for a GPU without one).

Bytes are counted per launch, as the kernel sees them: each operand once and each result once,
except that an operand read only through ``slice`` or ``dynamic-slice`` counts the slices it reads
(a layer's weights cut from a stacked array), and the buffer a ``dynamic-update-slice`` updates in
place counts only the update written (XLA updates it in place). What a kernel re-reads from cache
or recomputes is not seen, so the traffic is a lower bound; on the H200 the B/32 step's
non-matmul kernels took 0.95× the time this traffic takes at the measured copy bandwidth, the
B/16 steps' 1.3-1.65×.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import sys
from collections.abc import Iterable, Iterator

_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# The scratch buffer cuBLAS and cuDNN calls return last, e.g. ``s8[33554432]{0}``.
_WORKSPACE = re.compile(r"\b[su]8\[\d*\](\{0\})?(?=\s*\)\s*$)")

# Instructions that launch nothing: bookkeeping, aliasing views, and the second half of async
# pairs (the start is the launch).
_FREE = frozenset(
    "parameter constant get-tuple-element tuple bitcast after-all partition-id replica-id "
    "opt-barrier add-dependency copy-done all-reduce-done all-gather-done "
    "collective-permute-done send-done recv-done async-done async-update domain".split()
)
_SLICES = ("slice", "dynamic-slice")
_MATMUL_CALLS = ("cublas", "gemm", "matmul", "onednn")
_ATTENTION_CALLS = ("cudnn$fmha", "flash", "splash", "attention")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type: str  # the result type: an array, or a tuple of arrays
    op: str
    rest: str  # operands and attributes, as printed

    @property
    def operands(self) -> list[str]:
        """Names of the operands (inside the call's own parentheses)."""
        depth = 1
        for i, char in enumerate(self.rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                return _OPERAND.findall(self.rest[:i])
        return _OPERAND.findall(self.rest)

    def attribute(self, pattern: str) -> str | None:
        match = re.search(pattern, self.rest)
        return match.group(1) if match else None


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of the program; ``launches`` counts it once per loop trip."""

    kind: str  # matmul | attention | copy | dynamic-update-slice | fusion | collective | other
    phase: str  # forward | backward | update (optimiser, metrics...) | unattributed (no op_name)
    source: str  # the model code it comes from (jax's op_name, loop and layer numbers dropped)
    launches: int
    bytes_per_launch: int

    @property
    def bytes(self) -> int:
        return self.launches * self.bytes_per_launch


def array_bytes(type_text: str) -> int:
    """Bytes of an HLO type: an array (``bf16[256,49,768]{2,1,0}``) or a tuple of arrays."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * _DTYPE_BYTES[dtype]
    return total


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """The program's computations (name -> instructions in order) and the entry's name."""
    computations: dict[str, list[Instruction]] = {}
    current, entry = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            match = _INSTRUCTION.match(line)
            if match:
                computations[current].append(Instruction(*match.groups()))
    if entry is None:
        raise ValueError("no ENTRY computation: is this the text of a compiled HLO module?")
    return computations, entry


def _fusion_bytes(body: list[Instruction]) -> int:
    """Bytes a fusion moves: its outputs (an in-place dynamic-update-slice writes its update
    only) and its parameters (one read only through slices reads the slices)."""
    by_name = {i.name: i for i in body}
    users: dict[str, list[Instruction]] = collections.defaultdict(list)
    for instruction in body:
        for operand in instruction.operands:
            users[operand].append(instruction)
    root = body[-1]
    outputs = [by_name[n] for n in root.operands] if root.op == "tuple" else [root]
    updated_in_place = set()
    total = 0
    for out in outputs:
        if out.op == "dynamic-update-slice":
            buffer, update = out.operands[:2]
            updated_in_place.add(buffer)
            total += array_bytes(by_name[update].type if update in by_name else "")
        else:
            total += array_bytes(out.type)
    for param in (i for i in body if i.op == "parameter"):
        readers = [u for u in users[param.name] if u.op != "bitcast"]
        if param.name in updated_in_place and all(u.op == "dynamic-update-slice" for u in readers):
            continue
        if readers and all(u.op in _SLICES for u in readers):
            total += sum(array_bytes(u.type) for u in readers)
        else:
            total += array_bytes(param.type)
    return total


def _kind(instruction: Instruction, body: list[Instruction] | None) -> str:
    op = instruction.op
    if op == "custom-call":
        target = (instruction.attribute(r'custom_call_target="([^"]+)"') or "").lower()
        if any(t in target for t in _ATTENTION_CALLS):
            return "attention"
        return "matmul" if any(t in target for t in _MATMUL_CALLS) else "other"
    if op in ("dot", "convolution"):
        return "matmul"
    if op in ("copy", "copy-start"):
        return "copy"
    if op.startswith(("all-", "reduce-scatter", "collective-", "send", "recv")):
        return "collective"
    if op == "dynamic-update-slice":
        return "dynamic-update-slice"
    if op == "fusion" and body is not None:
        ops = {i.op for i in body}
        if "dot" in ops or "convolution" in ops or "__triton_gemm" in instruction.rest:
            return "matmul"
        if body[-1].op == "dynamic-update-slice" or (
            body[-1].op == "tuple"
            and all(i.op == "dynamic-update-slice" for i in body if i.name in body[-1].operands)
        ):
            return "dynamic-update-slice"
        return "fusion"
    return "other"


def _phase(op_name: str) -> str:
    if not op_name:
        return "unattributed"
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "update"


def _source(op_name: str) -> str:
    """The model code behind a kernel, the same for every layer and loop trip."""
    text = re.sub(r"^jit\([^)]*\)/", "", op_name)
    text = re.sub(r"(transpose\()?jvp\(([^)]*)\)\)?/?", "", text)
    text = re.sub(
        r"/(while/body|while/cond|closed_call|rematted_computation|remat|checkpoint)(?=/|$)",
        "",
        text,
    )
    text = re.sub(r"block_\d+", "block_*", text)
    return text.strip("/") or "(no source)"


def kernels(hlo_text: str) -> list[Kernel]:
    """Every kernel launch of one run of the program, loops unrolled by their trip counts."""
    computations, entry = parse(hlo_text)
    return list(_walk(computations, entry, 1))


def _walk(computations: dict[str, list[Instruction]], name: str, trips: int) -> Iterator[Kernel]:
    body = computations[name]
    types = {i.name: i.type for i in body}
    for instruction in body:
        op = instruction.op
        if op == "while":
            count = instruction.attribute(_TRIP_COUNT.pattern)
            n = int(count) if count else 1
            yield from _walk(computations, instruction.attribute(r"body=%?([\w.\-]+)"), trips * n)
            condition = instruction.attribute(r"condition=%?([\w.\-]+)")
            yield from _walk(computations, condition, trips * (n + 1))
            continue
        if op in ("call", "conditional"):
            for callee in re.findall(
                r"(?:to_apply|true_computation|false_computation)=%?([\w.\-]+)", instruction.rest
            ) + re.findall(
                r"%([\w.\-]+)", instruction.attribute(r"branch_computations=\{([^}]*)\}") or ""
            ):
                if callee in computations:
                    yield from _walk(computations, callee, trips)
            continue
        if op in _FREE:
            continue
        fused = None
        if op == "fusion":
            fused = computations.get(instruction.attribute(r"calls=%?([\w.\-]+)") or "")
        if fused:
            moved = _fusion_bytes(fused)
        elif op == "dynamic-update-slice":
            moved = 2 * array_bytes(types.get(instruction.operands[1], ""))
        elif op in _SLICES:
            moved = 2 * array_bytes(instruction.type)
        else:
            result = instruction.type
            if op == "custom-call":  # a library call's scratch space is not traffic
                result = _WORKSPACE.sub("", result)
            moved = array_bytes(result) + sum(
                array_bytes(types.get(o, "")) for o in instruction.operands
            )
        op_name = instruction.attribute(_OP_NAME.pattern) or ""
        yield Kernel(_kind(instruction, fused), _phase(op_name), _source(op_name), trips, moved)


def summarise(
    launched: Iterable[Kernel], bandwidth_bytes_per_s: float | None = None, top: int = 15
) -> dict:
    """Launches and GB per step, by kind and phase; the ``top`` sources by bytes; and, given a
    bandwidth, the milliseconds the non-matmul traffic takes at it (a lower bound on their
    time when memory-bound)."""
    launched = list(launched)
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    by_phase: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    by_source: dict[tuple[str, str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for k in launched:
        for table, key in (
            (by_kind, k.kind),
            (by_phase, k.phase),
            (by_source, (k.kind, k.phase, k.source)),
        ):
            table[key][0] += k.launches
            table[key][1] += k.bytes / 1e9
    total_gb = sum(k.bytes for k in launched) / 1e9
    matmul_gb = sum(k.bytes for k in launched if k.kind in ("matmul", "attention")) / 1e9

    def rows(table):
        ordered = sorted(table.items(), key=lambda item: -item[1][1])
        return {str(key): {"launches": int(n), "gb": round(gb, 3)} for key, (n, gb) in ordered}

    report = {
        "kernels_per_step": sum(k.launches for k in launched),
        "gb_per_step": round(total_gb, 2),
        "non_matmul_gb_per_step": round(total_gb - matmul_gb, 2),
        "by_kind": rows(by_kind),
        "by_phase": rows(by_phase),
        "top_sources": [
            {"kind": kind, "phase": phase, "source": source, "launches": int(n), "gb": round(gb, 3)}
            for (kind, phase, source), (n, gb) in sorted(
                by_source.items(), key=lambda item: -item[1][1]
            )[:top]
        ],
    }
    if bandwidth_bytes_per_s:
        report["non_matmul_ms_at_bandwidth"] = round(
            (total_gb - matmul_gb) * 1e9 / bandwidth_bytes_per_s * 1e3, 1
        )
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hlo", help="text of a compiled HLO module (compiled.as_text())")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--bandwidth_gb_s", type=float, default=0.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        with open(args.hlo) as f:
            text = f.read()
        report = summarise(kernels(text), args.bandwidth_gb_s * 1e9 or None, args.top)
    except (OSError, ValueError) as e:
        print(f"kernel_census: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def format_report(report: dict) -> str:
    lines = [
        f"kernels per step        {report['kernels_per_step']}",
        f"GB moved per step       {report['gb_per_step']} "
        f"(outside matmuls/attention: {report['non_matmul_gb_per_step']})",
    ]
    if "non_matmul_ms_at_bandwidth" in report:
        lines.append(f"non-matmul ms at bw     {report['non_matmul_ms_at_bandwidth']}")
    for title in ("by_kind", "by_phase"):
        lines.append(title.replace("_", " ") + ":")
        for key, row in report[title].items():
            lines.append(f"  {key:<24}{row['launches']:>8} launches {row['gb']:>10.2f} GB")
    lines.append("top sources by bytes:")
    for row in report["top_sources"]:
        lines.append(
            f"  {row['gb']:>9.2f} GB {row['launches']:>6}x  {row['kind']:<20} {row['phase']:<9}"
            f"{row['source'][-90:]}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
