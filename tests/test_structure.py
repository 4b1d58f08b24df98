"""The shape of the project: stages import only library modules, and dvc.yaml's deps are exactly their imports."""
import ast

import pytest
import yaml

from pipeline.datasets import DATASETS
from pipeline.models import list_models
from tests.conftest import ROOT

PACKAGE = ROOT / "pipeline"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def stage_module(stage: dict) -> str:
    """The module a stage runs: `python -m pipeline.X ...` -> X."""
    cmd = (stage.get("do") or stage)["cmd"].split()
    return cmd[cmd.index("-m") + 1].removeprefix("pipeline.")


STAGES = {name: stage_module(stage) for name, stage in DVC["stages"].items()}


def project_imports(module: str) -> set[str]:
    """Project modules `module` imports anywhere in its file (function bodies included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found |= {n.split(".")[1] for n in names if n.startswith("pipeline.")}
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += project_imports(m)
    return seen


@pytest.mark.parametrize("stage", list(STAGES))
def test_no_stage_imports_another_stage(stage):
    others = set(STAGES.values()) - {STAGES[stage]}
    assert not closure(STAGES[stage]) & others


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_are_exactly_the_modules_it_imports(stage):
    definition = DVC["stages"][stage].get("do") or DVC["stages"][stage]
    listed = {d.removeprefix("pipeline/").removesuffix(".py") for d in definition["deps"] if d.startswith("pipeline/")}
    assert listed == closure(STAGES[stage])


def test_one_export_stage_per_model_named_after_its_files():
    export = DVC["stages"]["export"]
    assert sorted(export["foreach"]) == sorted(
        ("" if d == "mnist" else "fashion-") + a for d in DATASETS for a in list_models())
    for name, item in export["foreach"].items():
        assert name == ("" if item["dataset"] == "mnist" else "fashion-") + item["arch"]
    assert "artifacts/${key}.onnx" in export["do"]["outs"]


def test_top_level_loss_plots_cover_every_trained_model():
    plots = {name: spec for entry in DVC["plots"] for name, spec in entry.items()}
    for dataset in DATASETS:
        files = plots[f"{dataset}-loss"]["y"]
        assert sorted(files) == sorted(f"reports/{dataset}/{a}/history.csv" for a in list_models())


def test_inference_path_imports_no_torch_module():
    torch_modules = {"models", "tensors", "training", "augment", "conversion", "params", "train", "evaluate", "export",
                     "bench"}
    for module in ("classifier", "infer", "images", "metadata", "runtime", "serve", "robustness", "handwriting"):
        assert not closure(module) & torch_modules, module
