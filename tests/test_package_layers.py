"""The package's house: folders that are layers, every import pointing down, no circle; and every documented
import path working (the public API, the integrations, the conversion functions, the format module)."""
import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowbit_adamw"
LAYERS = {  # bottom-up: a module may import its own layer's modules (without a circle) and those below
    "format": 0, "kernels": 1, "step": 1, "offload": 2, "optim": 3, "migrate": 4, "optimizer": 5,
    "memory": 6, "integrations": 6, "cli": 6, "tinylm": 6, "__main__": 6,
}


def module_name(path: Path) -> str:
    parts = ("lowbit_adamw",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports, at module level or inside functions (lazy imports count)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "lowbit_adamw":
                continue
            for alias in node.names:  # `from pkg import module` imports the module; `from module import name` the module
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in MODULES else source)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lowbit_adamw"}
    return found - {name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")} | {"lowbit_adamw.kernels": None}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 99  # the package itself re-exports lazily, by name


def edges() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        if path is not None and name != "lowbit_adamw":
            graph[name] = {m for m in imports_of(path) if m != "lowbit_adamw" and not name.startswith(m + ".")}
    return graph


def test_every_module_belongs_to_a_layer():
    unknown = [m for m in MODULES if m != "lowbit_adamw" and m.split(".")[1] not in LAYERS]
    assert not unknown, f"modules outside the layers (add their folder to LAYERS and the package docstring): {unknown}"


def test_every_import_points_down_or_sideways():
    upward = [(a, b) for a, bs in edges().items() for b in bs if layer(b) > layer(a)]
    assert not upward, f"imports that point up a layer: {upward}"


def test_no_circle():
    graph = edges()
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_the_import_graph_is_read_from_the_source():
    """The checks above are only as good as the graph: it must see the known arrows."""
    graph = edges()
    assert "lowbit_adamw.step.ops" in graph["lowbit_adamw.optimizer"]
    assert "lowbit_adamw.format" in graph["lowbit_adamw.step.functional"]
    assert "lowbit_adamw.format.layout" in graph["lowbit_adamw.migrate"]
    assert "lowbit_adamw.step.kernel_launch" in graph["lowbit_adamw.step.functional"]  # a lazy import counts


DOCUMENTED = [
    ("lowbit_adamw", ["AdamW8bit", "adamw8bit_step", "StepScalars", "quantize_blockwise", "dequantize_blockwise",
                      "FORMAT_VERSION", "to_torch_adamw_state_dict", "load_torch_adamw_state_dict", "optimizer_state_bytes"]),
    ("lowbit_adamw.format", ["FORMAT_VERSION", "quantize_blockwise", "dequantize_blockwise", "encode_values", "decode_values"]),
    ("lowbit_adamw.migrate", ["lowbit_to_torch", "lowbit_to_bnb", "identify", "to_torch_form"]),
    ("lowbit_adamw.integrations.transformers", ["install", "optimizer_cls_and_kwargs", "memory_report_callback",
                                                "parse_optim_args"]),
    ("lowbit_adamw.memory", ["estimate", "measure", "MemoryMonitor", "MemoryReport", "load_model", "optimizer_state_bytes"]),
    ("lowbit_adamw.tinylm", ["TinyLM", "batches", "token_splits", "held_out_loss"]),
    ("lowbit_adamw.kernels", ["adamw8bit_kernel", "launch_adamw8bit"]),
    ("lowbit_adamw.cli", ["main"]),
]


@pytest.mark.parametrize("module,names", DOCUMENTED, ids=[m for m, _ in DOCUMENTED])
def test_every_documented_name_imports(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"
