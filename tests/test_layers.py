"""The package's import graph, read with `ast` (every import, lazy ones inside functions included): data flows down
one way (ARCHITECTURE.md), train and eval never import each other, and no recipe imports another recipe."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tagi_ds"

# Lower number = lower floor. A module may import its own floor and the floors below it, nothing above.
LAYERS = {
    "errors": 0, "io_utils": 0, "config": 0, "metrics": 0,
    "kernels": 1,
    "modeling": 2, "distill": 2, "data": 2,
    "run": 3,
    "adapters": 4,
    "train": 5, "eval": 5,
    "plan": 6, "pipeline": 6,
    "cli": 7,
}
PEERS_FORBIDDEN = {("train", "eval"), ("eval", "train")}
# One module per stage with `run(cfg, sub, *, progress, log)` and `identity(cfg, sub)`.
RECIPES = {"tagi_ds.train.backbone_stage", "tagi_ds.train.teacher", "tagi_ds.train.cache_logits",
           "tagi_ds.train.pretrain", "tagi_ds.train.finetune", "tagi_ds.train.baselines", "tagi_ds.eval.evaluate"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> str:
    """tagi_ds.<floor>... → <floor> (a top-level module is its own floor)."""
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    """Absolute names of the tagi_ds modules `path` imports (relative imports resolved)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tagi_ds")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tagi_ds"):
                continue
            # `from .x import y` may import a submodule y: count it when it is one
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                        or (PKG.parent / Path(*sub.split("."))).is_dir() else target)
    return {m for m in out if m != "tagi_ds"}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_floor_is_known():
    floors = {floor_of(m) for m in graph() if m != "tagi_ds"}
    assert floors <= set(LAYERS), f"add these to LAYERS (and ARCHITECTURE.md): {sorted(floors - set(LAYERS))}"


def test_no_import_climbs_a_floor():
    bad = []
    for mod, deps in graph().items():
        if mod == "tagi_ds":
            continue
        here = floor_of(mod)
        for dep in deps:
            there = floor_of(dep)
            if LAYERS[there] > LAYERS[here]:
                bad.append(f"{mod} (floor {here}) imports {dep} (floor {there}, above)")
    assert not bad, "\n".join(bad)


def test_train_and_eval_never_import_each_other():
    bad = [f"{m} imports {d}" for m, deps in graph().items() if m != "tagi_ds" for d in deps
           if (floor_of(m), floor_of(d)) in PEERS_FORBIDDEN]
    assert not bad, "\n".join(bad)


def test_no_recipe_imports_another_recipe():
    g = graph()
    assert RECIPES <= set(g), f"recipes not found: {sorted(RECIPES - set(g))}"
    bad = [f"{r} imports {d}" for r in RECIPES for d in g[r] if d in RECIPES and d != r]
    assert not bad, "\n".join(bad)


def test_every_recipe_has_the_stage_signature():
    """run(cfg, sub, *, progress, log) and identity(cfg, sub): what the pipeline's table calls."""
    import importlib
    import inspect

    for name in sorted(RECIPES):
        mod = importlib.import_module(name)
        run = inspect.signature(mod.run).parameters
        assert list(run)[:2] == ["cfg", "sub"], (name, list(run))
        assert {"progress", "log"} <= set(run) and run["progress"].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert list(inspect.signature(mod.identity).parameters)[:2] == ["cfg", "sub"], name


def test_the_checker_sees_a_climbing_import(tmp_path, monkeypatch):
    """The walk resolves relative imports: `from ..train import x` in a data module is caught."""
    fake = PKG / "data" / "_probe_for_layers_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: (
        "from ..train import engine\n" if self == fake else Path.read_bytes(self).decode("utf-8")))
    assert "tagi_ds.train.engine" in imports_of(fake)


def test_no_file_over_600_lines():
    long = [f"{p.relative_to(PKG.parent)}: {n}" for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600]
    assert not long, long
