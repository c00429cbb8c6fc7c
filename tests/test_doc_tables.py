"""The documentation's generated tables (README.md or docs/*.md, between ``<!-- generated:NAME -->`` markers)
are exactly what scripts/doc_tables.py generates from the registry, wherever a page holds them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _doc_tables():
    spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "scripts" / "doc_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


doc_tables = _doc_tables()


def test_every_generated_table_is_up_to_date():
    assert doc_tables.stale() == [], "regenerate with: python scripts/doc_tables.py"


def test_the_tables_describe_the_registry():
    from hf_win import OPTIMIZERS

    optimizers, optim_args = doc_tables.optimizers_table(), doc_tables.optim_args_table()
    for name in OPTIMIZERS:
        assert f"| `{name}` |" in optimizers and f"| `{name}` |" in optim_args
    assert "| `sgd_win` | `SGD` (`SGD_Win`) | lr=required," in optimizers and "| 1 / 2 / 3 | 4 / 8 / 12 | 2 / 4 / 6 |" in optimizers
    assert "| `adan_win` | `beta3` (0.99)," in optim_args


def test_a_table_is_found_in_a_docs_page_and_rewritten_there(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# front page\n\nSee docs/trainer.md.\n")
    page = tmp_path / "docs" / "trainer.md"
    page.write_text("text\n<!-- generated:optim_args -->\n| stale |\n<!-- /generated:optim_args -->\nmore text\n"
                    "<!-- generated:optimizers -->\n" + doc_tables.optimizers_table() + "\n<!-- /generated:optimizers -->\n")
    assert doc_tables.stale(tmp_path) == [
        "table 'optim_args' in docs/trainer.md differs from the generated one (run: python scripts/doc_tables.py)"]
    assert doc_tables.write(tmp_path) == [page]
    assert doc_tables.stale(tmp_path) == []
    text = page.read_text()
    assert text.startswith("text\n<!-- generated:optim_args -->\n" + doc_tables.optim_args_table() + "\n")
    assert "more text\n" in text and "| stale |" not in text


def test_a_table_missing_or_held_twice_is_an_error_and_nothing_is_written(tmp_path):
    (tmp_path / "docs").mkdir()
    block = "<!-- generated:optimizers -->\n" + doc_tables.optimizers_table() + "\n<!-- /generated:optimizers -->\n"
    (tmp_path / "README.md").write_text(block)
    (tmp_path / "docs" / "memory.md").write_text(block)
    problems = doc_tables.stale(tmp_path)
    assert any("'optimizers'" in p and "found 2 (README.md, docs/memory.md)" in p for p in problems)
    assert any("'optim_args'" in p and "found 0 (no file)" in p for p in problems)

    # one stale table, one missing: the stale one is not rewritten either
    (tmp_path / "docs" / "memory.md").unlink()
    stale = "<!-- generated:optimizers -->\n| stale |\n<!-- /generated:optimizers -->\n"
    (tmp_path / "README.md").write_text(stale)
    with pytest.raises(LookupError, match="'optim_args'.*found 0"):
        doc_tables.write(tmp_path)
    assert (tmp_path / "README.md").read_text() == stale
