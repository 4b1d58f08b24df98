import json

import pytest
import torch
from click.testing import CliRunner

from pipeline import bench
from pipeline.tensors import precision_label


@pytest.mark.slow
def test_benchmark_prints_and_writes_every_figure(data_root, tmp_path):
    out = tmp_path / "results.json"
    result = CliRunner().invoke(bench.main, ["--data", str(data_root / "mnist"), "--arch", "softmax", "--steps", "3",
                                             "--repeats", "1", "--out", str(out),
                                             "--infer-model", str(tmp_path / "absent.onnx")])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    [row] = results["training"]
    assert row["arch"] == "softmax" and row["batch_size"] == 100 and row["steps"] == 3
    assert row["pipeline_img_s"] > 0 and row["reference_loop_img_s"] > 0
    assert ("pipeline_fp32_img_s" in row) == (row["precision"] == precision_label(torch.bfloat16))
    assert [(r["arch"], r["batch"]) for r in results["inference"]] == [("softmax", 1), ("softmax", 256)]
    assert all(r[k] > 0 for r in results["inference"] for k in ("eager", "torchscript", "onnxruntime"))
    assert "cold `infer`: skipped" in result.output and "cold_infer" not in results
