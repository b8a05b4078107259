"""The package is layered: a module imports only its own layer and the layers below it, so
model math never reaches up into training code and nothing loops. README "Layout" lists them."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llama_rlhf"

# Lowest first; a name is a top-level module or subpackage of llama_rlhf.
LAYERS = [
    ("errors",), ("parallel",), ("log",), ("config",), ("losses",), ("metrics",), ("models",), ("lora",),
    ("scoring",), ("gguf",), ("tokenizers",), ("records",), ("tasks",), ("data",), ("checkpoint",),
    ("generation",), ("trainers",), ("evaluation",), ("ppo",), ("cli",), ("demo",),
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """llama_rlhf.trainers.sft -> trainers."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    """Every llama_rlhf module `path` imports, at any depth (function-level imports included)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            out += [n for n in names if n.startswith("llama_rlhf.")]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("llama_rlhf.")]
    return out


def test_every_unit_has_a_layer():
    units = {p.stem if p.parent == SRC else p.relative_to(SRC).parts[0] for p in SRC.rglob("*.py")}
    assert units - {"__init__"} <= set(LEVEL), sorted(units - {"__init__"} - set(LEVEL))


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        me = _unit(".".join(rel.parts))
        if me == "__init__":
            continue
        for target in _imports(path):
            other = _unit(target)
            if other != "__init__" and LEVEL[other] > LEVEL[me]:
                bad.append(f"{'/'.join(rel.parts)} ({me}) imports {target} ({other})")
    assert not bad, "\n".join(bad)
