"""The README's figures are the committed ones: its result tables equal reports/*/metrics.json, and its
parameter counts are those of the architectures as params.yaml builds them."""
import json
import re

import pytest

from pipeline.datasets import DATASETS
from pipeline.models import MODELS, create_model
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
TITLES = {"MNIST": "mnist", "Fashion-MNIST": "fashion-mnist"}


def rows(first_header: str) -> list[list[str]]:
    """The cells of each row of the README table whose header starts with `first_header`."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append([c.strip().strip("`*") .strip() for c in line.strip("|").split("|")])
    return table


def percent(cell: str) -> float:
    return float(re.fullmatch(r"\**([\d.]+) %\**", cell).group(1))


def metrics(dataset: str, arch: str) -> dict:
    return json.loads((ROOT / "reports" / dataset / arch / "metrics.json").read_text())


def test_tuned_table_is_the_committed_metrics():
    table = rows("model | data set")
    assert len(table) == len(DATASETS)
    for name, title, accuracy, _seeds, reference, parameters, *_ in table:  # seeds: benchmarks.seeds, not committed
        dataset, arch = TITLES[title], name.removeprefix("fashion-")
        assert percent(accuracy) == metrics(dataset, arch)["accuracy"], name
        assert percent(reference) == metrics(dataset, "cnn")["accuracy"], name
        assert int(parameters.replace(",", "")) == metrics(dataset, arch)["params"], name


def test_reference_table_is_the_committed_metrics():
    table = rows("model | MNIST")
    assert [r[0] for r in table] == [a for a, cls in MODELS.items() if not getattr(cls, "tuned", False)]
    for arch, mnist, fashion, parameters in table:
        assert percent(mnist) == metrics("mnist", arch)["accuracy"], arch
        assert percent(fashion) == metrics("fashion-mnist", arch)["accuracy"], arch
        assert int(parameters.replace(",", "")) == metrics("mnist", arch)["params"], arch


@pytest.mark.parametrize("arch", list(MODELS))
def test_readme_parameter_counts_are_the_architectures(arch, params):
    """Counted on the model itself, not read from a metrics file."""
    model = create_model(arch, num_classes=10, **params.recipes[arch].model_args)
    counts = {r[0]: r[-1] for r in rows("model | MNIST")} | {r[0]: r[5] for r in rows("model | data set")}
    assert int(counts[arch].replace(",", "")) == sum(p.numel() for p in model.parameters())
