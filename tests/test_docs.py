"""The README and docs/ against the files and code they describe: the two commands, the
headline numbers (from the model card), the report schema, the links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CARD = ROOT / "exported" / "MODEL_CARD.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)


def test_readme_is_short_and_starts_with_the_two_commands():
    assert len(README.splitlines()) <= 200
    first, second = _bash_blocks(README)[:2]
    assert README.index(first) < README.index("## Layout") < README.index("## The release")
    assert first.endswith("pip install . && pneumo-edge predict examples/xrays --report --out out/")
    extras = re.search(r'pip install -e "(\.\[[a-z,]+\])" && python -m pytest$', second).group(1)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")  # CI runs the second command
    assert f'pip install --quiet -e "{extras}"' in ci and "python -m pytest" in ci


def _table(text: str, first_cells: tuple[str, ...]) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        name = cells[0].split()[0] if cells and cells[0] else ""
        if name in first_cells:
            rows[name] = cells
    return rows


@pytest.mark.skipif(not CARD.is_file(), reason="no model card")
def test_readme_headline_numbers_are_the_model_cards():
    card = CARD.read_text(encoding="utf-8")
    tables = card[card.index("<!-- tables:start -->"):]
    card_rows = _table(tables[:tables.index("## Robustness")], ("fp32", "fp16", "int8"))
    readme_rows = _table(README[README.index("## The release model"):README.index("## CLI")],
                         ("fp32", "fp16", "int8"))
    assert set(readme_rows) == set(card_rows) == {"fp32", "fp16", "int8"}
    for precision, c in card_rows.items():
        # card: precision | accuracy | AUC | sens | spec | counts | MB | p50 b1 | p50 b32
        r = readme_rows[precision]  # README: precision | size | acc | AUC | sens | spec | p50 b1
        assert r[1] == f"{c[6]} MB" and r[2:6] == c[1:5], (r, c)
        assert r[6] == f"{float(c[7]):.1f}", (r, c)
    threshold = re.search(r"stored threshold \*\*([0-9.]+)\*\*", README).group(1)
    assert f"threshold {threshold})" in tables
    assert "**int8 (default)**" in README
    assert (ROOT / "exported" / "default.txt").read_text().strip().endswith("_int8.onnx")


def test_release_threshold_is_the_models():
    from pneumo_edge.runtime import read_metadata

    threshold = float(re.search(r"stored threshold \*\*([0-9.]+)\*\*", README).group(1))
    for model in sorted((ROOT / "exported").glob("*.onnx")):
        assert round(read_metadata(model)[0]["threshold"], 4) == threshold


def test_report_schema_in_the_docs_is_report_keys():
    from pneumo_edge.report import REPORT_KEYS

    text = (ROOT / "docs" / "model-contract.md").read_text(encoding="utf-8")
    block = text[text.index("**report.json**"):]
    block = block[block.index("```"):block.index("```", block.index("```") + 3)]
    for key, subkeys in REPORT_KEYS.items():
        assert f'"{key}"' in block, key
        for sub in subkeys:
            assert f'"{sub}"' in block, (key, sub)


def test_lock_wait_in_the_docs_is_the_codes():
    from pneumo_edge.io import LOCK_WAIT_SECONDS

    assert f"waits up to {LOCK_WAIT_SECONDS:g} seconds" in (ROOT / "docs" / "cli.md").read_text()


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: {target}"
