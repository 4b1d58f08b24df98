"""How far seeds spread: the test accuracy of models trained with several seeds, as mean and standard deviation,
from the DVC experiments of the current commit (a queued sweep over `seed`, docs/recipes.md) and the workspace.

    dvc exp run --queue -S 'seed=1,2' evaluate@tuned_cnn evaluate@fashion-tuned_cnn
    dvc queue start -j 1
    python -m benchmarks.seeds                                    # the tuned models: seed 0 is the commit's
    python -m benchmarks.seeds --model cnn --model fashion-cnn    # any models of dvc.yaml's table

Each seed is counted once (an experiment repeating a seed already seen is left out, and said so); experiments that
changed other params, or did not evaluate the model, are not counted. The committed model is the default seed's;
the spread says how much of a difference between recipes is only the seed.
"""
from __future__ import annotations

import statistics

import click
import yaml

METRIC_KEYS = ("accuracy", "train_time_s")
ROW_FACTS = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}  # dvc.api.exp_show's own columns


def model_table() -> dict[str, dict]:
    """params.yaml's name -> {dataset, arch} table of the models dvc.yaml trains."""
    with open("params.yaml") as f:
        return yaml.safe_load(f)["models"]


def column(row: dict, path: str, key: str):
    """A metric of `row` (a dvc.api.exp_show row), whose columns are named `path:key`."""
    return row.get(f"{path}:{key}")


def params_of(row: dict) -> dict:
    """The params of a dvc.api.exp_show row: its columns without a folder in their name (metrics are
    `reports/...:key`, dependencies paths); DVC writes `params.yaml:seed` where a metrics file has a `seed` too."""
    return {k.removeprefix("params.yaml:"): v for k, v in row.items() if "/" not in k and k not in ROW_FACTS}


def seed_runs(rows: list[dict], path: str) -> tuple[dict[int, dict], list[str]]:
    """{seed: {accuracy, train_time_s, experiment}} from dvc.api.exp_show rows: the commit's own row and those of
    its finished experiments whose params differ from the commit's in `seed` alone and whose metrics were written
    by a model of that seed (an experiment that did not run this model's evaluation shows the commit's figures),
    the first row of each seed; and the names of the finished experiments left out as repeats of a seed."""
    runs, repeats = {}, []
    commit = next((params_of(r) for r in rows if r.get("typ") == "baseline" and r.get("rev") != "workspace"), {})
    commit.pop("seed", None)
    for row in rows:
        if row.get("rev") == "workspace" or row.get("State") not in (None, "Success"):
            continue
        params = params_of(row)
        seed = params.pop("seed", None)  # DVC gives numbers as floats
        if params != commit:
            continue
        values = {k: column(row, path, k) for k in METRIC_KEYS}
        if not isinstance(seed, (int, float)) or seed != int(seed) or column(row, path, "seed") != seed or \
                not all(isinstance(v, (int, float)) for v in values.values()):
            continue
        name = row.get("Experiment") or row.get("rev")
        if int(seed) in runs:
            repeats.append(f"{name} (seed {int(seed)})")
            continue
        runs[int(seed)] = {**values, "experiment": name}
    return runs, repeats


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


@click.command(help="Mean ± standard deviation of test accuracy over seeds, from `dvc exp show` of this commit.")
@click.option("--model", "models", multiple=True, default=("tuned_cnn", "fashion-tuned_cnn"), show_default=True,
              help="A model name of dvc.yaml's table (repeat for several).")
def main(models: tuple[str, ...]) -> None:
    import dvc.api

    table = model_table()
    unknown = [m for m in models if m not in table]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}; choose from {', '.join(table)}", param_hint="--model")
    rows = dvc.api.exp_show()
    click.echo("| model | seeds | test accuracy per seed (%) | mean ± sd (%) | training time per seed (s) |")
    click.echo("|---|---|---|---|---|")
    for name in models:
        path = f"reports/{table[name]['dataset']}/{table[name]['arch']}/metrics.json"
        runs, repeats = seed_runs(rows, path)
        if not runs:
            raise click.ClickException(f"no experiment of this commit has {path}: run the sweep first (see --help)")
        seeds = sorted(runs)
        acc = [runs[s]["accuracy"] for s in seeds]
        times = " / ".join(f"{runs[s]['train_time_s']:.0f}" for s in seeds)
        click.echo(f"| `{name}` | {', '.join(map(str, seeds))} | {' / '.join(f'{a:.2f}' for a in acc)} | "
                   f"{spread(acc)} | {times} |")
        if repeats:
            click.echo(f"  ({name}: left out as repeats: {', '.join(repeats)})", err=True)


if __name__ == "__main__":
    main()
