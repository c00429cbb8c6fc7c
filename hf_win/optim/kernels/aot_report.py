"""The text of ``aot``'s report, and the rule it checks for the whole-block kernels (``full_width``)."""

from __future__ import annotations

from .triton import BLOCK, NUM_WARPS

THREAD_ELEMENTS = BLOCK // (32 * NUM_WARPS)  # elements of each array one thread handles in a block


def wide_bytes(facts: dict, op: str) -> int:
    """Bytes per thread moved by accesses of 128 bits or more."""
    return sum(int(bits) // 8 * n for bits, n in facts["loads" if op == "ld" else "stores"].items() if int(bits) >= 128)


def full_width(facts: dict) -> bool:
    """Whether a kernel moves every array byte in accesses as wide as its thread's share allows (the
    ``_full`` kernels' claim; the masked ones make none): nothing narrower than 64 bits, and every array
    whose share per thread is 16 bytes or more (float32, float64) in accesses of 128 bits or more
    (bfloat16 and float16 shares are 8 bytes: one 64-bit access)."""
    want = facts["array_bytes_per_thread"]
    narrow = any(int(bits) < 64 for op in ("loads", "stores") for bits in facts[op])
    return not narrow and wide_bytes(facts, "ld") == want["ld"] and wide_bytes(facts, "st") == want["st"]


def _widths(counts: dict) -> str:
    return " ".join(f"{n}x{bits}" for bits, n in counts.items()) or "-"


def markdown(report: dict) -> str:
    kernels = report["kernels"]
    rows = [(kid, arch, f) for kid, per in kernels.items() for arch, f in per.items()]
    full = [(kid, arch, f) for kid, arch, f in rows if "_full" in kid]
    narrow = [f"{kid} ({arch})" for kid, arch, f in full if not full_width(f)]
    worst = [bits for row in report["cases"] for bits in [row["bytes_per_element"] - row["floor"]]]
    md = [f"# Triton kernels compiled ahead of time: triton {report['triton']}, {', '.join(report['archs'])}", "",
          f"Command: `python -m hf_win.optim.kernels.aot --arch {','.join(report['archs'])} --out DIR` "
          f"(torch {report['torch']}, no GPU: `triton.compile` with `GPUTarget('cuda', NN, 32)`, PTX and a cubin "
          f"by the ptxas Triton ships; {report['seconds']:.0f} s wall clock on {report.get('machine', 'this machine')}, "
          f"{sum(f.get('cpu_seconds', 0) for _, _, f in rows):.0f} CPU seconds of compilation).", "",
          f"- {len(report['cases'])} cases (optimizer x mode x precision x flags x clipping), "
          f"{len(kernels)} distinct kernel functions, {len(rows)} compilations; "
          f"**{len(report['failures'])} failures**{': ' + '; '.join(report['failures']) if report['failures'] else ''}.",
          f"- Spills: {sum((f['spill_stores'] or 0) + (f['spill_loads'] or 0) for _, _, f in rows)} bytes in all; "
          f"registers at most {max((f['registers'] or 0) for _, _, f in rows) if rows else '-'}; shared memory "
          f"at most {max((f['shared'] or 0) for _, _, f in rows) if rows else '-'} bytes.",
          f"- FMA instructions: {sum(f['fma'] for _, _, f in rows)}; approximate divisions or roots: "
          f"{sum(f['approx'] for _, _, f in rows)}.",
          f"- Whole-block kernels (`*_full`, tensors whose arrays are 16-byte aligned): {len(full) - len(narrow)} of "
          f"{len(full)} move every float32/float64 array byte in accesses of 128 bits or more and nothing in "
          f"accesses under 64 bits (a thread's share of a bfloat16/float16 array, {THREAD_ELEMENTS} elements, is "
          "one 64-bit access)"
          f"{' (not: ' + ', '.join(narrow) + ')' if narrow else ''}. The masked kernels (tails, misaligned "
          "tensors) make no such claim.",
          f"- Bytes per element at the floor (each array read once, each written array written once) in "
          f"{sum(1 for w in worst if w == 0)} of {len(worst)} cases; the others are multi-stage steps "
          "(LAMB's norms: a second pass).", "",
          "## Cases", "", "| case | bytes / element | floor | kernels |", "|---|---:|---:|---|"]
    md += [f"| {c['case']} | {c['bytes_per_element']} | {c['floor']} | {', '.join(c['kernels'])} |"
           for c in report["cases"]]
    md += ["", "## Kernels", "", "Loads / stores: count x bits of global accesses per thread (64-bit scalars are "
           "the pointer, block and scalar tables). Array bytes: per thread, moved by 128-bit+ accesses / the "
           "float32 and float64 arrays' bytes.", "",
           "| kernel | arch | dtypes | registers | spills (st/ld B) | shared B | loads | stores | fma | div.rn | "
           "sqrt.rn | approx | array bytes ld | array bytes st |", "|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for kid, arch, f in rows:
        want = f["array_bytes_per_thread"]
        md.append(f"| {kid} | {arch} | {','.join(f['dtypes'])} | {f['registers']} | {f['spill_stores']}/{f['spill_loads']} "
                  f"| {f['shared']} | {_widths(f['loads'])} | {_widths(f['stores'])} | {f['fma']} | {f['div_rn']} | "
                  f"{f['sqrt_rn']} | {f['approx']} | {wide_bytes(f, 'ld')}/{want['ld']} | {wide_bytes(f, 'st')}/{want['st']} |")
    return "\n".join(md) + "\n"


