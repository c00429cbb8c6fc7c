"""The documentation's generated tables: each is produced here from the registry and lives between
``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in README.md or one of docs/*.md.

    python scripts/doc_tables.py           rewrite every table in the file that holds it
    python scripts/doc_tables.py --check   exit 1 (and say which) if a file's table is not what is generated

tests/test_doc_tables.py runs the check.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.optim.optimizer import required  # noqa: E402

from hf_win.optim_args import n_betas, optim_args_keys  # noqa: E402
from hf_win.registry import OPTIMIZERS  # noqa: E402

# The same for every optimizer, so described in the text around the optimizers table instead.
_COMMON_KEYS = ("reckless_steps", "acceleration_mode", "foreach", "fused", "maximize", "capturable", "differentiable",
                "state_dtype", "bf16_stochastic_round", "rounding_seed")
_FIELD_OF = {"lr": "`--learning_rate`", "eps": "`--adam_epsilon`", "weight_decay": "`--weight_decay`"}
_MODES = ("none", "win", "win2")


def optimizers_table() -> str:
    """Per registry optimizer: class, constructor defaults, state buffers and bytes per parameter."""
    rows = [
        "| `--optim` name | class (alias) | defaults | state buffers per parameter: none / win / win2 | "
        "bytes per parameter, fp32 state: none / win / win2 | bytes per parameter, `state_dtype=bfloat16`: none / win / win2 |",
        "|---|---|---|---|---|---|",
    ]
    for spec in OPTIMIZERS.values():
        hp = spec.hyperparameters
        shown = {k: v for k, v in hp.items() if k not in _COMMON_KEYS}
        defaults = ", ".join(
            f"{k}={'required' if v is inspect.Parameter.empty or v is None or v is required else v}"
            for k, v in shown.items()
        )
        hyper = {k: v for k, v in hp.items() if v is not inspect.Parameter.empty}
        buffers = [spec.cls.buffers_per_parameter(m, **hyper) for m in _MODES]
        if spec.wraps_base:  # Win(base): the base's state in the parameter's dtype (for a matrix parameter)
            nbytes = {"float32": [spec.cls.state_bytes_per_parameter(m, torch.float32) for m in _MODES],
                      "bfloat16": ["-"] * len(_MODES)}
            name = f"`{spec.cls.__name__}` (`Win({spec.cls.base_name})`)"
        else:
            nbytes = {d: [spec.cls.state_bytes_per_parameter(m, torch.float32, **dict(hyper, state_dtype=d))
                          for m in _MODES] for d in ("float32", "bfloat16")}
            name = f"`{spec.cls.__name__}` (`{spec.cls.__name__}_Win`)"
        rows.append(
            f"| `{spec.name}` | {name} | {defaults} | "
            f"{' / '.join(map(str, buffers))} | {' / '.join(map(str, nbytes['float32']))} | "
            f"{' / '.join(map(str, nbytes['bfloat16']))} |"
        )
    return "\n".join(rows)


def optim_args_table() -> str:
    """Per registry optimizer: its ``--optim_args`` keys with their defaults, and which standard
    TrainingArguments fields it takes."""
    rows = [
        "| `--optim` | `--optim_args` keys (default) | from the standard fields |",
        "|---|---|---|",
    ]
    for name, spec in OPTIMIZERS.items():
        hyper = spec.hyperparameters
        keys = [f"`{key}` ({hyper['betas'][2] if key == 'beta3' else hyper[key]})" for key in optim_args_keys(name)]
        fields = []
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key not in hyper:
                continue
            if key == "betas":
                third = ", `beta3`" if n_betas(spec) == 3 else ""
                fields.append(f"betas = (`--adam_beta1`, `--adam_beta2`{third})")
            else:
                fields.append(f"{key} = {_FIELD_OF[key]}")
        rows.append(f"| `{name}` | {', '.join(keys) or '-'} | {', '.join(fields)} |")
    return "\n".join(rows)


TABLES: Dict[str, Callable[[], str]] = {"optimizers": optimizers_table, "optim_args": optim_args_table}


def _pattern(name: str) -> "re.Pattern":
    return re.compile(rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(\n<!-- /generated:{re.escape(name)} -->)", re.S)


def documents(root: Path = ROOT) -> List[Path]:
    """The files that may hold a generated table: README.md and docs/*.md."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def locate(name: str, root: Path = ROOT) -> Tuple[Path, str]:
    """``(file, text between the markers)`` of table ``name``; ``LookupError`` unless exactly one place
    among :func:`documents` holds it."""
    found = [(path, m.group(2)) for path in documents(root) for m in _pattern(name).finditer(path.read_text())]
    if len(found) != 1:
        where = ", ".join(str(p.relative_to(root)) for p, _ in found) or "no file"
        raise LookupError(f"table {name!r}: expected one <!-- generated:{name} --> block in README.md or docs/*.md, "
                          f"found {len(found)} ({where})")
    return found[0]


def stale(root: Path = ROOT) -> List[str]:
    """One line per table that is missing or differs from what is generated (empty: all up to date)."""
    problems = []
    for name, make in TABLES.items():
        try:
            path, text = locate(name, root)
        except LookupError as err:
            problems.append(str(err))
            continue
        if text != make():
            problems.append(f"table {name!r} in {path.relative_to(root)} differs from the generated one "
                            f"(run: python scripts/doc_tables.py)")
    return problems


def write(root: Path = ROOT) -> List[Path]:
    """Rewrite every table in place; returns the files changed. Every table is located first, so a missing
    or doubled one changes nothing."""
    changed = []
    for name, (path, text) in [(name, locate(name, root)) for name in TABLES]:
        make = TABLES[name]
        if text != make():
            body = path.read_text()
            path.write_text(_pattern(name).sub(lambda m: m.group(1) + make() + m.group(3), body, count=1))
            changed.append(path)
    return changed


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        problems = stale()
        print("\n".join(problems) or "every generated table is up to date")
        sys.exit(1 if problems else 0)
    if sys.argv[1:]:
        sys.exit(__doc__)
    for path in write():
        print(f"rewrote {path.relative_to(ROOT)}")
