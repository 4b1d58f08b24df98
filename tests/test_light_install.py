"""The base install (`pip install .`, no extra) classifies images with an exported model: no torch, no DVC."""
import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, site_packages_mb

pytestmark = pytest.mark.slow


def test_light_install_has_no_torch_and_stays_small(light_venv):
    env = {k: v for k, v in os.environ.items() if k != "PIP_QUIET"}  # a quiet pip lists nothing
    pip_list = subprocess.run([light_venv / "bin" / "pip", "list", "--format", "json"], capture_output=True, text=True,
                              env=env)
    installed = {p["name"].lower() for p in json.loads(pip_list.stdout)}
    assert {"onnxruntime", "numpy", "pillow", "click", "digitlens"} <= installed
    assert not installed & {"torch", "torchvision", "dvc", "matplotlib", "pydantic"}
    size = site_packages_mb(light_venv)
    print(f"\nlight install: site-packages {size:.0f} MB; this run's own environment: "
          f"{site_packages_mb(ROOT / '.venv') if (ROOT / '.venv').is_dir() else float('nan'):.0f} MB")
    assert size < 300


def test_the_base_install_ships_digitlens_alone_and_imports_no_torch(light_venv):
    (site,) = (light_venv / "lib").glob("python3*/site-packages")
    (record,) = site.glob("digitlens-*.dist-info/RECORD")
    tops = {line.split("/", 1)[0] for line in record.read_text().splitlines() if "/" in line}
    assert {t for t in tops if not t.endswith(".dist-info") and t != ".."} == {"digitlens"}  # no pipeline/, benchmarks/
    assert (site / "digitlens" / "static" / "index.html").is_file()
    for code in ("import digitlens, sys; print('torch' in sys.modules)",
                 "import digitlens.infer, digitlens.serve, sys; print('torch' in sys.modules)"):
        r = subprocess.run([light_venv / "bin" / "python", "-c", code], cwd=light_venv, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == "False\n", r.stderr
    r = subprocess.run([light_venv / "bin" / "python", "-c", "import pipeline"], cwd=light_venv, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "No module named 'pipeline'" in r.stderr


def test_infer_and_the_api_run_in_the_light_install(light_venv, exported, tmp_path, data_root):
    from PIL import Image

    from pipeline.datasets import load_split

    onnx_path = exported("mnist", "cnn")[0]
    images, labels = load_split(data_root / "mnist", "test")
    for i in range(3):
        Image.fromarray(255 - images[i]).resize((140, 140)).save(tmp_path / f"{i}.png")
    python, infer = light_venv / "bin" / "python", light_venv / "bin" / "infer"
    cli = subprocess.run([infer, *(tmp_path / f"{i}.png" for i in range(3)), "--model", onnx_path, "--format", "json"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    from_cli = [r["predictions"][0]["index"] for r in json.loads(cli.stdout)]
    script = f"""
import sys
from digitlens import Classifier
clf = Classifier({str(onnx_path)!r})
print([r.top.index for r in clf.predict([{', '.join(repr(str(tmp_path / f'{i}.png')) for i in range(3))}])])
print('torch' in sys.modules)
"""
    api = subprocess.run([python, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert api.returncode == 0, api.stderr
    assert api.stdout.splitlines() == [str(from_cli), "False"]
    assert sum(p == t for p, t in zip(from_cli, labels[:3])) >= 2  # a briefly trained model, still mostly right
