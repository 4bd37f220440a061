"""
The layout of the package (docs/architecture.md): floors that import downwards only, no import cycle (imports
inside functions counted), nobody importing the command line, the two loops side by side, no private name crossing
a module boundary, and the files shipped with a checkpoint importing only each other.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import msn_hf

PACKAGE = Path(msn_hf.__file__).parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))
# Copied next to every saved checkpoint by `save_pretrained` (Transformers follows their relative imports).
SHIPPED = {"configuration_msn", "modeling_msn", "loss_msn", "image_processing_msn", "views_msn"}


def _is_main_block(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _walk_without_main_blocks(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if _is_main_block(child):
            continue
        yield child
        yield from _walk_without_main_blocks(child)


def package_imports(module: str) -> list[tuple[str, list[str], int]]:
    """`(sibling module, imported names, relative level)` of every import of a sibling, at any depth, except in
    `if __name__ == "__main__":` blocks."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = []
    for node in _walk_without_main_blocks(tree):
        if isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == "msn_hf"):
                target = (node.module or "").removeprefix("msn_hf").lstrip(".") if node.level == 0 else node.module
                if target:
                    found.append((target.split(".")[0], names, node.level))
                else:  # `from . import x` / `from msn_hf import x`: each name that is a module is one
                    found.extend((name, [], node.level) for name in names if name in MODULES)
            elif node.level > 1:
                found.append(("..", names, node.level))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "msn_hf" and len(parts) > 1:
                    found.append((parts[1], [], 0))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _ in package_imports(module) if target in MODULES} for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return stack[stack.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # an import inside a function counts like one at the top; the `__main__` block's does not
    assert any(target == "evaluation" and "evaluate_lowshot" in names for target, names, _ in package_imports("pretraining"))
    assert "cli" not in {target for target, _, _ in package_imports("pretraining")}
    assert "cli" in ast.dump(ast.parse((PACKAGE / "pretraining.py").read_text()))


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_nothing_imports_the_command_line_and_the_two_loops_stand_side_by_side():
    graph = import_graph()
    assert [module for module, targets in graph.items() if "cli" in targets] == []
    assert "pretraining" not in graph["trainer_msn"] and "trainer_msn" not in graph["pretraining"]
    # the recipe both loops share
    assert "training" in graph["trainer_msn"] and "training" in graph["pretraining"]


def test_no_private_name_is_imported_from_another_module():
    crossings = [
        f"{module} imports {name} from {target}"
        for module in MODULES
        for target, names, _ in package_imports(module)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert crossings == []


def test_shipped_modules_import_only_each_other_with_single_dots():
    for module in SHIPPED:
        for target, _, level in package_imports(module):
            assert level == 1, f"{module} imports {target} with level {level}: shipped code needs `from .x import`"
            assert target in SHIPPED, f"{module} imports {target}, which is not shipped with a checkpoint"


def test_import_is_light_and_the_trainer_is_exported_lazily():
    script = textwrap.dedent(
        """
        import sys
        import msn_hf
        assert "transformers.trainer" not in sys.modules, "import msn_hf loaded transformers.trainer"
        assert "MSNTrainer" in dir(msn_hf)
        from msn_hf import MSNTrainer, MSNTrainingArguments
        from msn_hf.trainer_msn import MSNTrainer as Direct
        assert MSNTrainer is Direct and MSNTrainingArguments.__name__ == "MSNTrainingArguments"
        try:
            msn_hf.NoSuchThing
        except AttributeError as error:
            assert "NoSuchThing" in str(error)
        else:
            raise AssertionError("an unknown attribute must raise AttributeError")
        print("LIGHT_OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "LIGHT_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_saved_processor_draws_views_without_msn_hf(tmp_path):
    from msn_hf import MSNImageProcessor

    processor = MSNImageProcessor(crop_size=32, focal_crop_size=16, num_focal_views=2, size={"shortest_edge": 36})
    processor.save_pretrained(tmp_path / "model")
    assert {"image_processing_msn.py", "views_msn.py"} <= {path.name for path in (tmp_path / "model").iterdir()}
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    torch.save(images, tmp_path / "images.pt")
    torch.save(processor(list(images), return_views=True, seed=3, return_tensors="pt")["focal_pixel_values"],
               tmp_path / "expected.pt")  # fmt: skip
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["msn_hf"] = None  # only the code shipped in the folder may be used
        import torch
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        images = list(torch.load({str(tmp_path / "images.pt")!r}))
        views = processor(images, return_views=True, seed=3, return_tensors="pt")["focal_pixel_values"]
        torch.testing.assert_close(views, torch.load({str(tmp_path / "expected.pt")!r}))
        print("REMOTE_OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]
