"""The benchmarks live outside the installed package and use its public names only."""

import ast
import importlib.util
import subprocess
import sys

from conftest import REPO


def test_the_package_ships_no_benchmark_and_no_path_outside_itself():
    assert importlib.util.find_spec("pipeline.bench") is None
    for path in (REPO / "pipeline").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert "../shared" not in node.value and node.value != "..", (path.name, node.value)


def test_benchmark_scripts_import_only_public_names_of_the_package():
    private = []
    for path in (REPO / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                private += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and isinstance(node.value, ast.Name) and node.value.id in (
                        "runtimes", "extract", "datasets", "store", "heads", "bb", "backbones"):
                private.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert private == []


def test_the_benchmark_command_answers_and_refuses_bad_sizes_in_one_line():
    bench = [sys.executable, str(REPO / "benchmarks" / "bench.py")]
    assert subprocess.run([*bench, "--help"], capture_output=True).returncode == 0
    proc = subprocess.run([*bench, "extract", "--sizes", "ten"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "--sizes 'ten': write whole numbers, e.g. 2000,8000")
