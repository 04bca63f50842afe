"""The house rules of docs/architecture.md that a reader can check mechanically: small files and functions,
few positional parameters, kinds that answer for themselves, one way per job. The rules about the tree itself (no
import circle, the import table, the names the page uses, tests mirroring src) are in tests/test_architecture.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorablend"
SOURCES = sorted(SRC.rglob("*.py"))
KIND_NAMES = ("LowRankDelta", "LoHaDelta", "LoKrDelta", "FullDelta", "DoRADelta")


def _functions():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(SRC), node


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SOURCES if (n := p.read_text().count("\n")) > 600}
    assert not long, long


def test_no_function_over_80_lines_or_6_positional_parameters():
    long, wide = [], []
    for path, fn in _functions():
        if fn.end_lineno - fn.lineno + 1 > 80:
            long.append(f"{path}:{fn.lineno} {fn.name}")
        positional = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args) if a.arg not in ("self", "cls")]
        if len(positional) > 6:
            wide.append(f"{path}:{fn.lineno} {fn.name} ({len(positional)})")
    assert not long and not wide, (long, wide)


def test_at_most_five_kind_checks_outside_the_kinds():
    pattern = re.compile(r"isinstance\([^)]*\b(%s)\b|type\([^)]*\)\s+is\s+(not\s+)?(%s)\b|\.kind\s*[!=]=\s*\"(lora|loha|lokr|full|dora)\""
                         % ("|".join(KIND_NAMES), "|".join(KIND_NAMES)))
    hits = [f"{p.relative_to(SRC)}:{i}" for p in SOURCES if "kinds" not in p.relative_to(SRC).parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert len(hits) <= 5, hits


def test_one_way_per_job():
    text = {str(p.relative_to(SRC)): p.read_text() for p in SOURCES}
    def defining(name):
        return sorted(f for f, t in text.items() if re.search(rf"^def {name}\(", t, re.M))
    assert defining("read_header") == ["io/safetensors.py"]
    assert defining("detect_family") == ["naming/family.py"]
    assert defining("pick_weight_file") == ["io/files.py"]
    assert defining("build_meta_components") == ["naming/meta.py"]
    # the component list is spelled once (naming.COMPONENTS); everything else imports it
    spelled = r'"text_encoder",\s*"text_encoder_2"'
    assert sorted(f for f, t in text.items() if re.search(spelled, t)) == ["naming/index.py"]


def test_one_spelling_for_settings_and_exceptions_in_their_modules():
    """Settings classes end in ...Settings (never Config / Options / Spec); a library exception is defined in
    errors.py, or in the one errors module its package may keep (kinds/base.py, serve/errors.py, cli.py's usage)."""
    allowed = {"errors.py", "kinds/base.py", "serve/errors.py", "cli.py"}
    odd_names, stray_errors = [], []
    for path in SOURCES:
        rel = str(path.relative_to(SRC))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            if re.search(r"(Config|Options|Spec)$", node.name):
                odd_names.append(f"{rel}:{node.name}")
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if any(b.endswith(("Error", "Exception")) for b in bases) and rel not in allowed:
                stray_errors.append(f"{rel}:{node.name}")
    assert not odd_names and not stray_errors, (odd_names, stray_errors)
