"""The benchmarks live outside the installed package and use its public names only."""

import ast
import importlib.util
import subprocess
import sys

import pytest
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


@pytest.mark.parametrize("name", ["extract", "conversions", "heads", "ray", "cache"])
def test_each_benchmark_script_answers_help(name):
    script = REPO / "benchmarks" / f"bench_{name}.py"
    assert subprocess.run([sys.executable, str(script), "--help"], capture_output=True).returncode == 0


def test_a_benchmark_refuses_bad_sizes_in_one_line():
    script = REPO / "benchmarks" / "bench_extract.py"
    proc = subprocess.run([sys.executable, str(script), "--sizes", "ten"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --sizes 'ten': write whole numbers, e.g. 2000,8000"
