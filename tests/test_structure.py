"""The package's shape, as docs/DESIGN.md states it: which part may import which (so `operators/`
stays pure tensor maths), no import cycle, no CLI subprocess in training, small files, no reference
outside the repository, and a README layout that matches the tree."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scalegrow"

# part -> the parts it may import (every part may import itself, `errors`, `deps` and the model config:
# core.config, core.features, core.rope_config, core.typed). The core's modules are parts of their own.
CORE = {"core.arch", "core.sharding", "core.layout", "core.model", "core.layers", "core.rope", "core.counts", "core.device"}
ALLOWED = {
    "core.arch": set(),
    "core.sharding": {"core.arch"},
    "core.layout": set(),
    "core.model": {"core.rope", "core.layers"},
    "core.layers": {"core.rope"},
    "core.rope": set(),
    "core.counts": {"core.arch"},
    "core.device": set(),
    "corpus": set(),
    "data": {"corpus"},
    "operators": {"core.arch"},
    "formats": {"core.arch", "core.sharding", "core.layout", "core.model"},
    "write": CORE | {"formats", "operators"},
    "methods": CORE | {"data", "formats", "operators"},
    "train": CORE | {"data", "formats", "operators", "write", "methods"},
    "commands": CORE | {"data", "formats", "operators", "write", "methods"},
    "cli": CORE | {"commands", "formats", "methods", "write"},
}
BASE = {"errors", "deps", "__init__", "core", "core.config", "core.features", "core.rope_config", "core.mla_config",
        "core.typed"}
ROOT_MODULES = 7  # at most, __init__ included: the root shows the parts, not their pieces


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every scalegrow module `path` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("scalegrow")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scalegrow"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


def part(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "core":
        return f"core.{parts[2]}"
    return parts[1] if len(parts) > 1 else "__init__"


def test_parts_import_only_what_the_design_allows():
    mods = modules()
    wrong = []
    for name, path in mods.items():
        mine = part(name)
        for target in imports(path, set(mods)):
            theirs = part(target)
            if theirs != mine and theirs not in BASE and theirs not in ALLOWED[mine]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycle():
    mods = modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for target in imports(path, set(mods)):
            pieces = target.split(".")
            graph[name] |= {".".join(pieces[:i]) for i in range(2, len(pieces) + 1)} & set(mods)
            graph[name].discard(name)
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_package_root_shows_its_parts():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= ROOT_MODULES, modules
    assert set(ALLOWED) - CORE <= {p.stem for p in PACKAGE.iterdir() if p.name != "__pycache__"}


def test_formats_dispatch_on_model_type_in_few_places():
    """A Hugging Face family is a record; only the lookup of a record compares `model_type`."""
    comparisons = []
    for path in (PACKAGE / "formats").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and "model_type" in ast.unparse(node):
                comparisons.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(comparisons) <= 3, comparisons


def test_the_cli_names_no_method_or_method_option():
    """Method flags derive from the methods' options dataclasses; the CLI spells none itself."""
    from scalegrow.methods import registry as methods
    from scalegrow.methods.options import flags

    text = (PACKAGE / "cli.py").read_text()
    spelled = {f.name for m in methods.METHODS.values() if m.options for f in flags(m.options)}
    found = [word for word in spelled | set(methods.METHODS) if f'"{word}"' in text or f"'{word}'" in text]
    assert not found, found


def test_training_starts_no_cli_subprocess():
    for path in (PACKAGE / "train").rglob("*.py"):
        text = path.read_text()
        assert "subprocess" not in text and "scalegrow.cli" not in text, path


def tracked(*patterns: str) -> list[Path]:
    files = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / f for f in files if (ROOT / f).is_file()]


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in tracked("*.py", "*.sh")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_nothing_points_outside_the_repository():
    shared, section = "../" + "shared", "DESIGN " + "§"
    found = [str(p.relative_to(ROOT)) for p in tracked("*.py", "*.md", "*.sh", "*.yaml", "*.toml", "*.sbatch")
             if shared in p.read_text() or section in p.read_text()]
    assert not found, found


def test_readme_layout_matches_the_tree():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Layout\n+```\n(.*?)```", text, re.S).group(1)
    listed = set(re.findall(r"^(\S+)", block, re.M))
    for entry in listed:
        assert (ROOT / entry.rstrip("/")).exists(), f"README lists {entry}, which does not exist"
    top = {f"scalegrow/{p.name}" + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
           if p.name != "__pycache__" and p.name != "__init__.py"}
    missing = top - listed
    assert not missing, f"README's layout leaves out {sorted(missing)}"
