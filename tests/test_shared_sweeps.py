"""One sweep on two machines, DVC's own way (docs/scale.md): each clone of the team's Git repository runs its part
of a queued grid and shares it with `dvc exp push` (Git refs to the Git remote, outputs to the DVC remote); a third
clone pulls them all, compares their validation accuracy in one `dvc exp show`, takes the winner, pulls its trained
model without training, and scores it on the test set once."""
import json

import pytest

from digitlens import Classifier
from tests.conftest import dvc, experiments, git, project_copy, run_queue

pytestmark = pytest.mark.slow

QUICK = ["-S", "train.epochs=1", "-S", "data.train_limit=2000", "-S", "device=cpu"]
GRID = {"a": "0.05,0.1", "b": "0.2"}  # machine -> its share of recipes.softmax.lr


@pytest.fixture(scope="module")
def team(tmp_path_factory, mirror):
    """A bare Git repository and a local-folder DVC remote standing for the team's, the project pushed to both."""
    base = tmp_path_factory.mktemp("team")
    origin, storage, seed = base / "origin.git", base / "dvc-remote", base / "seed"
    seed.mkdir()
    env = project_copy(seed, mirror)
    git("init", "-q", "--bare", "-b", "main", str(origin), cwd=base, env=env)
    assert dvc("remote", "add", "-d", "team", str(storage), cwd=seed, env=env).returncode == 0
    git("commit", "-q", "-am", "the team's DVC remote", cwd=seed, env=env)
    git("remote", "add", "origin", str(origin), cwd=seed, env=env)
    git("push", "-q", "origin", "main", cwd=seed, env=env)
    return base, origin, env


def machine(team, name: str):
    base, origin, env = team
    folder = base / name
    git("clone", "-q", str(origin), str(folder), cwd=base, env=env)
    return folder, env


def test_a_sweep_run_on_two_machines_is_compared_and_applied_on_a_third(team):
    for name, lrs in GRID.items():
        folder, env = machine(team, name)
        queued = dvc("exp", "run", "--queue", *QUICK, "-S", f"recipes.softmax.lr={lrs}", "train@softmax",
                     cwd=folder, env=env)
        assert queued.returncode == 0, queued.stderr
        status = run_queue(folder, env)
        assert "Success" in status and "Failed" not in status, status
        pushed = dvc("exp", "push", "origin", cwd=folder, env=env)  # every experiment of this commit, and its outputs
        assert pushed.returncode == 0, pushed.stderr

    folder, env = machine(team, "c")
    pulled = dvc("exp", "pull", "origin", cwd=folder, env=env)
    assert pulled.returncode == 0, pulled.stderr
    shown = dvc("exp", "show", "--json", cwd=folder, env=env)
    assert shown.returncode == 0, shown.stderr
    live = "reports/mnist/softmax/train/metrics.json"  # DVCLive's latest epoch: validation figures, no test ones
    rows = [r for r in experiments(json.loads(shown.stdout))  # the experiments, not the commit (no outputs)
            if "val" in r["metrics"].get(live, {})]
    assert sorted(r["params"]["recipes"]["softmax"]["lr"] for r in rows) == [0.05, 0.1, 0.2]
    scored = "reports/mnist/softmax/metrics.json"  # the test figures: the commit's, the same in every experiment
    assert len({json.dumps(r["metrics"][scored], sort_keys=True) for r in rows}) == 1
    assert len({r["metrics"][live]["val"]["accuracy"] for r in rows}) == 3
    best = max(rows, key=lambda r: r["metrics"][live]["val"]["accuracy"])

    # the winner's commit (params.yaml, dvc.lock, metrics) as a branch, then its trained model from the DVC remote;
    # `dvc exp apply` would check out every output of dvc.lock, which a sweep over one model does not have here
    assert dvc("exp", "branch", best["name"], "winner", cwd=folder, env=env).returncode == 0
    git("checkout", "-q", "winner", cwd=folder, env=env)
    fetched = dvc("pull", "--with-deps", "train@softmax", cwd=folder, env=env)  # its model, data included
    assert fetched.returncode == 0, fetched.stderr
    # export and the one scoring on the test set; the model is the winner's, not trained again
    repro = dvc("repro", "evaluate@softmax", cwd=folder, env=env)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert "Running stage 'evaluate@softmax'" in repro.stdout and "Running stage 'train@softmax'" not in repro.stdout
    exported = Classifier(folder / "artifacts" / "softmax.onnx").info
    assert exported.params["recipe"]["lr"] == best["params"]["recipes"]["softmax"]["lr"]
    assert 10 < json.loads((folder / "reports" / "mnist" / "softmax" / "metrics.json").read_text())["accuracy"] <= 100
