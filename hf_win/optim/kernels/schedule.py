"""From a traced ``Program`` to what the emitters print: ``schedule`` splits the step into stages (loops
over the elements) at its per-tensor reductions, and ``render``/``spelling`` write an element expression
in a back end's syntax. ``c.py`` and ``triton.py`` print the stages in their own language.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from .ir import Program, Unsupported

__all__ = ["Stage", "schedule", "render", "spelling"]

class Stage:
    """One loop over the elements: ``loads`` (array, value id), ``lets`` (value id, expression),
    ``reductions`` (r, value id: sum of squares), ``stores`` (array, value id), and the per-tensor
    scalars it needs (computed at the start of the stage from the reductions of earlier stages)."""

    def __init__(self):
        self.loads: List[Tuple[int, int]] = []
        self.lets: List[Tuple[int, tuple]] = []
        self.reductions: List[Tuple[int, int]] = []
        self.stores: List[Tuple[int, int]] = []
        self.tscalars: List[int] = []


def render(expr: tuple, spell: Dict[str, Any]) -> str:
    """An element expression in a back end's syntax. ``spell[kind]``: for the leaves (``v``, ``k``, ``t``,
    ``c``) a function of the leaf's payload; for operations a format string over the rendered operands
    ``a`` and ``b``. An operation the back end does not spell raises ``Unsupported``."""
    kind = expr[0]
    if kind not in spell:
        raise Unsupported(f"element operation {kind!r}")
    if kind in ("v", "k", "t", "c"):
        return spell[kind](expr[1])
    args = [render(a, spell) for a in expr[1:]]
    return spell[kind].format(a=args[0], b=args[1] if len(args) > 1 else "")


_ARITHMETIC = {op: f"({{a}} {op} {{b}})" for op in "+-*/"}


def spelling(**kinds) -> Dict[str, Any]:
    """A back end's spelling for ``render``: infix arithmetic, value names ``v<id>``, ``k<i>``, plus
    ``kinds`` (the rest, and any override)."""
    return {**_ARITHMETIC, "v": lambda x: f"v{x}", "k": lambda x: f"k{x}", **kinds}


def _refs(expr, out: set) -> set:
    """The value ids an expression reads directly."""
    if expr[0] == "v":
        out.add(expr[1])
    elif expr[0] not in ("k", "c", "t"):
        for a in expr[1:]:
            _refs(a, out)
    return out


def schedule(prog: Program, exact: Sequence[int] = ()) -> List[Stage]:
    """Split the program at its reductions. A stage computes what its roots need (its reductions; the
    stored values): a value is loaded when memory holds it, else recomputed from its definition.

    Stores happen in the last stage, except for an array in ``exact`` (stored in the compute dtype, so a
    reload gives the value back exactly) whose final value is complete before a reduction and whose old
    content no later stage needs: that one is stored in the stage that completes it, and later stages load
    it instead of recomputing it (LAMB: the moments are written by the stage that computes the norms, and
    the last stage reads them rather than the gradient)."""
    defs = {vid: expr for kind, vid, expr in (s for s in prog.stmts if s[0] == "let")}
    load_of = {vid: a for a, vid in prog.loads.items()}
    # stages: a new one starts at the first statement after a reduction
    red_groups: List[List[Tuple[int, int]]] = [[]]
    stage_of: Dict[int, int] = {}
    direct: List[set] = [set()]  # value ids each stage's statements and reductions read directly
    for s in prog.stmts:
        if s[0] == "reduce":
            red_groups[-1].append((s[1], s[2]))
            direct[-1].add(s[2])
            continue
        if red_groups[-1]:
            red_groups.append([])
            direct.append(set())
        stage_of[s[1]] = len(red_groups) - 1
        _refs(s[2], direct[-1])
    if red_groups[-1]:
        red_groups.append([])
        direct.append(set())
    last = len(red_groups) - 1
    direct[last] |= set(prog.final.values())

    early: Dict[int, Tuple[int, int]] = {}  # array -> (stage, value) stored early
    for a, vid in prog.final.items():
        s0 = stage_of.get(vid)
        if a not in exact or s0 is None or s0 == last:
            continue
        # what later stages read, recomputed down to what memory holds: must not need a's old content
        todo = [v for t in range(s0 + 1, last + 1) for v in direct[t] if v != vid]
        closure: set = set()
        while todo:
            v = todo.pop()
            if v in closure or v == vid:
                continue
            closure.add(v)
            if v in defs and stage_of.get(v, last) <= s0:
                todo.extend(_refs(defs[v], set()))
        if prog.loads[a] not in closure:
            early[a] = (s0, vid)

    stages = []
    done_reductions: set = set()
    held: Dict[int, int] = {}  # value id -> array that holds it in memory (stored early)
    for si, reductions in enumerate(red_groups):
        st = Stage()
        seen: set = set()
        tseen: set = set()

        def need_t(j):
            if j in tseen:
                return
            e = prog.tscalars[j]
            if e[0] == "norm" and e[1] not in done_reductions:
                raise Unsupported("a per-tensor scalar used in the loop that computes it")
            if e[0] == "ratio":
                need_t(e[1])
                need_t(e[2])
            tseen.add(j)
            st.tscalars.append(j)

        def need(expr):
            kind = expr[0]
            if kind == "v":
                vid = expr[1]
                if vid in seen:
                    return
                seen.add(vid)
                if vid in held:
                    st.loads.append((held[vid], vid))
                elif vid in load_of:
                    st.loads.append((load_of[vid], vid))
                else:
                    e = defs[vid]
                    need(e)
                    st.lets.append((vid, e))
            elif kind == "t":
                need_t(expr[1])
            elif kind not in ("k", "c"):
                for a in expr[1:]:
                    need(a)

        for r, vid in reductions:
            need(("v", vid))
            st.reductions.append((r, vid))
        for a, (s0, vid) in sorted(early.items()):
            if s0 == si:
                need(("v", vid))
                st.stores.append((a, vid))
        if si == last:
            for a, vid in sorted(prog.final.items()):
                if a not in early:
                    need(("v", vid))
                    st.stores.append((a, vid))
        st.loads.sort()
        st.lets.sort()
        st.tscalars.sort()
        stages.append(st)
        done_reductions.update(r for r, _ in reductions)
        held.update({vid: a for a, (s0, vid) in early.items() if s0 == si})
    return stages
