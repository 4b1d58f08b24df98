"""The shape of the project: stages import only library modules, dvc.yaml's deps are exactly their imports, and
the installed package cannot reach torch."""
import ast
from pathlib import Path

import pytest
import yaml

from pipeline.datasets import DATASETS
from pipeline.models import list_models
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("digitlens", "pipeline")  # the project's own import roots; benchmarks/ is no library
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
TORCH_SIDE = {"torch", "torchvision", "onnxscript", "pipeline"}


def stage_module(stage: dict) -> str:
    """The module a stage runs: `python -m pipeline.stages.X ...` -> 'pipeline.stages.X'."""
    cmd = (stage.get("do") or stage)["cmd"].split()
    return cmd[cmd.index("-m") + 1]


def module_file(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(module: str) -> set[str]:
    """Every module `module` imports anywhere in its file (function bodies included), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def project_closure(module: str) -> set[str]:
    """`module` and every project module it reaches through imports."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [i for i in imports(m) if i.split(".")[0] in PACKAGES and module_file(i).exists()]
    return seen


STAGES = {name: stage_module(stage) for name, stage in DVC["stages"].items()}


def test_every_stage_lives_in_the_stages_package():
    assert set(STAGES.values()) == {f"pipeline.stages.{p.stem}" for p in (ROOT / "pipeline" / "stages").glob("[!_]*.py")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_no_stage_imports_another_stage(stage):
    others = set(STAGES.values()) - {STAGES[stage]}
    assert not project_closure(STAGES[stage]) & others


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_are_exactly_the_modules_it_imports(stage):
    definition = DVC["stages"][stage].get("do") or DVC["stages"][stage]
    listed = {d for d in definition["deps"] if d.startswith(PACKAGES)}
    expected = {str(module_file(m).relative_to(ROOT)) for m in project_closure(STAGES[stage])}
    assert listed == expected - {"pipeline/__init__.py", "pipeline/stages/__init__.py", "digitlens/__init__.py"}


def test_the_installed_package_reaches_no_torch_side_module():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "digitlens").glob("*.py")]
    for module in modules:
        reached = {i.split(".")[0] for m in project_closure(module) for i in imports(m)}
        assert not reached & TORCH_SIDE, module


def test_one_data_stage_per_data_set_and_one_chain_of_stages_per_model_named_after_its_files():
    """The pipeline as params.yaml declares it: the built-in data sets train every architecture, MNIST's models
    without a prefix (a data set of your own may add models); params.py checks every name."""
    params = load_params(ROOT / "params.yaml")
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    assert {("" if d == "mnist" else "fashion-") + a for d in DATASETS for a in list_models()} <= set(models)
    assert all(name == params.model_name(item["dataset"], item["arch"]) for name, item in models.items())
    assert DVC["stages"]["data"]["foreach"] == "${datasets}" and "${item.path}" in DVC["stages"]["data"]["do"]["deps"]
    for kind in ("train", "export", "evaluate"):
        assert DVC["stages"][kind]["foreach"] == "${models}"
    assert "artifacts/${key}.onnx" in DVC["stages"]["export"]["do"]["outs"]


def test_evaluate_reaches_no_torch():
    """The metrics users read come from the exported file through the torch-free core, in a process without torch."""
    reached = {i.split(".")[0] for m in project_closure(STAGES["evaluate"]) for i in imports(m)}
    assert not reached & (TORCH_SIDE - {"pipeline"})


def test_top_level_loss_plots_cover_every_trained_model():
    plots = {name: spec for entry in DVC["plots"] for name, spec in entry.items()}
    for dataset in DATASETS:
        files = plots[f"{dataset}-loss"]["y"]
        assert sorted(files) == sorted(f"reports/{dataset}/{a}/train/plots/metrics/{part}/loss.tsv"
                                       for a in list_models() for part in ("train", "val"))
