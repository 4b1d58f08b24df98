import copy

import pytest
import torch
from click.testing import CliRunner

from digitlens.metadata import ModelInfo
from pipeline import datasets
from pipeline import training as tr
from pipeline.common import PipelineError
from pipeline.datasets import load_split, pixel_stats, split_validation
from pipeline.models import create_model, inference_model, list_models, load_checkpoint, save_checkpoint
from pipeline.params import OneCycle
from pipeline.reference import reference_dataset, reference_train_steps, reference_transform
from pipeline.stages import train as train_stage
from pipeline.tensors import amp_dtype, pick_device, precision_label, to_inputs
from tests.conftest import MONITOR, quick_params


def test_epoch_batches_cover_a_permutation():
    g = torch.Generator().manual_seed(0)
    batches = tr.epoch_batches(10, 4, drop_last=False, generator=g)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in tr.epoch_batches(10, 4, drop_last=True, generator=g)] == [4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlp", "cnn", "simple_cnn"])
def test_fast_loop_matches_reference_loop(arch, params, data_root):
    """Same model, same permutation: the tensor loop and the reference DataLoader loop take the same steps."""
    recipe = params.recipe(arch)
    stats = pixel_stats(data_root / "mnist")
    mean, std = params.normalization(arch, stats)
    images, labels = load_split(data_root / "mnist", "train")
    x, y = to_inputs(images, mean, std, torch.device("cpu")), torch.from_numpy(labels)
    steps = 5
    batches = tr.epoch_batches(len(x), recipe.batch_size, recipe.drop_last, torch.Generator().manual_seed(1))[:steps]

    torch.manual_seed(0)
    ours = create_model(arch, **recipe.model_args)
    theirs = copy.deepcopy(ours)
    dataset = reference_dataset("mnist", data_root / "mnist", True, reference_transform(params, "mnist", arch, stats))
    loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.batch_size, sampler=torch.cat(batches).tolist(),
                                         generator=torch.Generator())  # keeps the global RNG for dropout

    torch.manual_seed(5)  # dropout draws the same masks in both loops
    mean_loss, last_loss = tr.train_epoch(ours, tr.make_optimizer(ours, recipe), x, y, batches)
    torch.manual_seed(5)
    reference_losses = reference_train_steps(theirs, tr.make_optimizer(theirs, recipe), loader, torch.device("cpu"))
    assert len(reference_losses) == steps
    assert last_loss == pytest.approx(reference_losses[-1], abs=1e-5)
    assert mean_loss == pytest.approx(sum(reference_losses) / steps, abs=1e-5)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_amp_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert amp_dtype("off", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert amp_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert amp_dtype("auto", cpu) is None


@pytest.mark.slow
@pytest.mark.parametrize("arch", list_models())
def test_bf16_autocast_trains_like_fp32(arch, params, data_root):
    """Under bf16 autocast the forward pass is bf16, the weights stay float32 and learn the same steps."""
    recipe = params.recipe(arch)
    if isinstance(recipe.scheduler, OneCycle):  # its first epoch starts at lr / div_factor, not at the peak
        recipe = recipe.model_copy(update={"lr": recipe.lr / recipe.scheduler.div_factor})
    images, labels = load_split(data_root / "mnist", "train")
    x, y = to_inputs(images[:1000], *params.normalization(arch, pixel_stats(data_root / "mnist")), torch.device("cpu")), \
        torch.from_numpy(labels[:1000])
    torch.manual_seed(0)
    fp32 = create_model(arch, **recipe.model_args)
    bf16 = copy.deepcopy(fp32)
    seen = []
    bf16.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    losses = {}
    for name, model, amp in (("fp32", fp32, None), ("bf16", bf16, torch.bfloat16)):
        batches = tr.epoch_batches(len(x), recipe.batch_size, recipe.drop_last, torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        losses[name] = tr.train_epoch(model, tr.make_optimizer(model, recipe), x, y, batches, amp=amp)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.01)  # (mean, last) loss of the epoch


def test_same_seed_same_metrics(params, data_root):
    quick = quick_params(params, epochs=2, train_limit=1000)
    runs = [tr.train(quick, "fashion-mnist", "simple_cnn", data_root / "fashion-mnist", log=lambda m: None, monitor=MONITOR)
            for _ in range(2)]
    strip = lambda h: [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in h]  # noqa: E731
    assert strip(runs[0].history) == strip(runs[1].history)
    for a, b in zip(runs[0].state_dict.values(), runs[1].state_dict.values()):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list_models())
def test_checkpoint_rebuilds_the_model(arch, params, data_root, tmp_path):
    ckpt = tr.train(quick_params(params, train_limit=500), "mnist", arch, data_root / "mnist", log=lambda m: None,
                    monitor=MONITOR)
    save_checkpoint(ckpt, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # plain data: no class of this project's needed
    assert set(raw) == {"info", "state_dict", "history", "run"}
    info = raw["info"]
    assert info["architecture"] == arch and info["class_names"][7] == "7 - seven"
    assert info["params"]["data"]["train_limit"] == 500 and info["model_args"] == params.recipes[arch].model_args
    assert info["params"]["hflip"] is False and info["params"]["device"] == "cpu"  # digits are never mirrored
    model, _ = load_checkpoint(tmp_path / "m.pt")
    assert not model.training
    x = torch.rand(3, 1, 28, 28)
    fresh = create_model(arch, **info["model_args"]).eval()
    fresh.load_state_dict(raw["state_dict"])
    # as it classifies: with the recipe's test-time views (the tuned one's zooms and rotations on digits)
    views = ModelInfo(**info)
    assert {k: getattr(views, k) for k in ("test_flip", "test_zoom", "test_rotate")} == params.test_views("mnist", arch)
    assert (views.forward_passes > 1) == (arch == "tuned_cnn")
    torch.testing.assert_close(model(x), inference_model(fresh, views)(x))


@pytest.mark.slow
def test_tuned_recipe_trains_with_its_schedule_and_the_data_sets_augmentation(params, data_root):
    quick = quick_params(params, epochs=3, train_limit=1000)
    for dataset, flips in (("mnist", False), ("fashion-mnist", True)):
        ckpt = tr.train(quick, dataset, "tuned_cnn", data_root / dataset, log=lambda m: None, monitor=MONITOR)
        lrs = [row["lr"] for row in ckpt.history]
        assert lrs[0] < lrs[1] > lrs[2]  # one cycle: warm-up past the peak within epoch 1 of 3, then down
        assert lrs[0] == pytest.approx(params.recipes["tuned_cnn"].lr / 25)
        assert ckpt.info.params["augment"] == params.augment(dataset, "tuned_cnn").model_dump()
        assert ckpt.info.params["hflip"] is flips


@pytest.mark.slow
def test_threads_come_from_the_environment_not_from_params(params, data_root, tmp_path):
    """OMP_NUM_THREADS sets torch's threads (queued experiments set it per worker); no train param does."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    assert "threads" not in type(params.train).model_fields
    code = ("import torch; from pipeline.training import train; from pipeline.params import load_params; "
            "from tests.conftest import quick_params; "
            f"ckpt = train(quick_params(load_params({str(ROOT / 'params.yaml')!r}), 1, 200), 'mnist', 'softmax', "
            f"{str(data_root / 'mnist')!r}); print('threads', ckpt.run.threads)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}).stdout
    assert f"({precision_label(amp_dtype('auto', torch.device('cpu')))}, 1 threads)" in out
    assert out.strip().endswith("threads 1")


def test_training_never_reads_the_test_set_and_scores_the_held_out_images(params, data_root, monkeypatch):
    read, lines = [], []
    monkeypatch.setattr(datasets, "load_split", lambda folder, split: read.append(split) or load_split(folder, split))
    ckpt = tr.train(quick_params(params, epochs=1, train_limit=None), "mnist", "softmax", data_root / "mnist",
                    log=lines.append)
    assert read == ["train"] and "(54000 images, 6000 for validation)" in lines[0]
    _, (val_x, val_y) = split_validation(*load_split(data_root / "mnist", "train"), params.data.val_fraction)
    with torch.inference_mode():
        pred = ckpt.model()(torch.from_numpy(val_x).float().div(255).unsqueeze(1)).argmax(1).numpy()
    assert ckpt.history[-1]["val/accuracy"] == pytest.approx(100 * (pred == val_y).mean(), abs=0.02)  # one image


def test_history_has_one_row_per_epoch(params, data_root):
    rows = []
    ckpt = tr.train(quick_params(params, epochs=3, train_limit=500), "mnist", "softmax", data_root / "mnist",
                    log=lambda m: None, on_epoch=rows.append, monitor=MONITOR)
    assert rows == ckpt.history and [row["epoch"] for row in rows] == [1, 2, 3]
    assert all(set(row) == {"epoch", *tr.EPOCH_METRICS} for row in rows)
    assert ckpt.run.epochs == 3 and ckpt.run.parameters == 7850


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(PipelineError, match="device: 'cuda' asked for"):
        pick_device("cuda", "params.yaml")
    assert pick_device("auto", "params.yaml").type == "cpu"


def test_bad_params_stop_the_stage_before_work(tmp_path, data_root):
    (tmp_path / "params.yaml").write_text("seed: 0\ndevice: auto\n")
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(train_stage.main, ["--dataset", "mnist", "--arch", "cnn", "--data", str(data_root / "mnist"),
                                          "--out", str(out), "--live", str(tmp_path / "live"),
                                          "--run-json", str(tmp_path / "run.json"), "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {tmp_path / 'params.yaml'}: data: Field required")
    assert "Traceback" not in result.output and not out.exists()


def test_corrupt_checkpoint_is_refused(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="bad.pt: not a valid checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(PipelineError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_one_cycle_schedule_on_a_few_batches(params):
    """A quick run on a small data set leaves the tuned recipe a handful of steps: the one-cycle schedule still
    runs (torch divides by zero when its warm-up spans under 2 steps)."""
    recipe = params.recipe("tuned_cnn").model_copy(update={"epochs": 1})
    x, y = torch.rand(520, 1, 16, 16), torch.arange(520) % 3  # 4 batches of 128: a warm-up of 1 step
    model = create_model("tuned_cnn", num_classes=3, size=16, **recipe.model_args)
    history = tr.fit(model, recipe, x, y, x[:50], y[:50], seed=0, eval_batch_size=50, log=lambda msg: None)
    assert len(history) == 1 and history[0]["lr"] > 0
