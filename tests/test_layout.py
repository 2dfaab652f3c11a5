"""The one-way flow the README draws: data_prep -> sparqle.data -> module <- sparqle.models."""

import ast
from pathlib import Path

from tests.conftest import ROOT

# package -> what it must never import
FORBIDDEN = {
    "data_prep": ("sparqle.models", "sparqle.lit_module", "demo"),
    "sparqle/data": ("sparqle.models", "sparqle.lit_module", "sparqle.evaluation", "demo"),
    "sparqle/models": ("sparqle.data", "sparqle.lit_module", "demo"),
    "sparqle": ("demo", "data_prep"),
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


# the one data-prep step whose transformation is a model: the frozen encoder's features
RUNS_A_MODEL = {"data_prep/extract_features.py": ("sparqle.models",)}


def test_imports_flow_one_way():
    broken = []
    for package, banned in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            allowed = RUNS_A_MODEL.get(str(path.relative_to(ROOT)), ())
            banned = tuple(b for b in FORBIDDEN[package] if b not in allowed)
            for name in imports(path):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    broken.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not broken, broken
