"""The `infer-ray` command (the [ray] extra): score large image sets with Ray Data, the same Classifier in
`map_batches` actors (one onnxruntime session each, one thread), on a local Ray instance or a cluster, writing
`infer --format json`'s records as JSON lines or Parquet.

    infer-ray photos/ --model artifacts/tuned_cnn.onnx --out results.jsonl
    infer-ray --files-from list.txt --model artifacts/tuned_cnn.onnx --out results.parquet --address auto
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from digitlens.classifier import BATCH_SIZE, Classifier
from digitlens.errors import ModelError
from digitlens.files import atomic_path
from digitlens.infer import FAILED, STDIN, expand
from digitlens.text import DISTRIBUTION, BadUsage, first_line, one_line, shown

OUT_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
ACTOR_THREADS = 1  # onnxruntime threads per actor: Ray gives each actor one CPU


class Scorer:
    """One Ray actor: a Classifier loaded once, classifying each batch of file names it is given."""

    def __init__(self, model: str, top_k: int, raw: bool):
        self.clf = Classifier(model, threads=ACTOR_THREADS)
        self.top_k, self.raw = top_k, raw

    def __call__(self, batch: dict) -> dict:
        """file (the name as given, valid UTF-8), path (where this worker reads it, the file system's bytes) ->
        infer's record, as JSON and as columns."""
        paths, names = [os.fsdecode(bytes(f)) for f in batch["path"]], [str(f) for f in batch["file"]]
        results = list(self.clf.classify(paths, self.top_k, self.raw, batch_size=max(len(paths), 1), names=names))
        return {"file": [shown(r.source) for r in results],
                "predictions": [[p.to_dict() for p in r.predictions] if r.ok else None for r in results],
                "error": [r.error for r in results],
                "record": [json.dumps(r.to_dict()) for r in results]}


def score(files: list[str] | None, model: str, *, files_from: str | None = None, top_k: int = 1, raw: bool = False,
          batch_size: int = BATCH_SIZE, actors: int | None = None) -> Iterator:
    """The result batches (pyarrow tables: file, predictions, error) of classifying `files` (or the names listed
    one per line in `files_from`, read by Ray, never held here) with `model` on the Ray instance `ray.init` joined,
    `actors` Scorer actors (default: one per CPU Ray has), as they finish."""
    import ray

    base = os.getcwd()  # relative names are relative to where the command runs, as infer's
    if files_from is not None:
        # no CPU for reading names: the actors hold one each, and a read waiting for a CPU would wait forever
        ds = ray.data.read_text(str(Path(files_from).resolve()), drop_empty_lines=True, ray_remote_args={"num_cpus": 0})
        ds = ds.map(lambda r: {"file": r["text"].rstrip("\r"),
                               "path": os.fsencode(os.path.join(base, r["text"].rstrip("\r")))}, num_cpus=0)
    else:  # Arrow strings are UTF-8: a name that is not travels as bytes, and is shown escaped as infer shows it
        ds = ray.data.from_items([{"file": shown(f), "path": os.fsencode(os.path.join(base, f))} for f in files])
    actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    scored = ds.map_batches(Scorer, fn_constructor_kwargs={"model": model, "top_k": top_k, "raw": raw},
                            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
    yield from scored.iter_batches(batch_format="pyarrow", batch_size=None)


def lists_a_file(listing: str) -> bool:
    """Whether the list names at least one file (read up to its first non-blank line only)."""
    try:
        with open(listing, "rb") as f:
            return any(line.strip() for line in f)
    except OSError as e:
        raise BadUsage(f"{listing}: cannot read it ({e.strerror or e})") from None


def result_schema():
    """The Parquet columns: file, predictions (class, index, probability per rank; null for a failed file), error."""
    import pyarrow as pa

    prediction = pa.struct([("class", pa.string()), ("index", pa.int64()), ("probability", pa.float64())])
    return pa.schema([("file", pa.string()), ("predictions", pa.list_(prediction)), ("error", pa.string())])


def write(batches: Iterator, out: Path, fmt: str) -> tuple[int, int]:
    """Stream result batches into `out` (written whole or not at all); returns (records, failed)."""
    import pyarrow.parquet as pq

    count = failed = 0
    schema = result_schema()
    with atomic_path(out) as tmp, contextlib.ExitStack() as stack:
        if fmt == "jsonl":
            text = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        else:
            parquet = stack.enter_context(pq.ParquetWriter(tmp, schema))
        for table in batches:
            count += table.num_rows
            failed += table.num_rows - table.column("error").null_count
            if fmt == "jsonl":
                text.writelines(line + "\n" for line in table.column("record").to_pylist())
            else:  # a batch of failures only has null-typed predictions: cast to the one schema
                parquet.write_table(table.select(schema.names).cast(schema))
    return count, failed


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               help="Classify a large set of images on Ray Data (a local instance, or a cluster with --address): "
                    "files, folders of images and glob patterns, or a list of file names with --files-from, each "
                    "Ray worker running the same onnxruntime Classifier as `infer`. Writes infer's JSON records "
                    "(--format json) as JSON lines (.jsonl) or a Parquet file (.parquet); a file that cannot be "
                    "classified gets a record with its error.",
               epilog="Exit status: 0 all classified; 1 some files could not be classified (their records say why); "
                      "2 usage error: a bad option or model, a path that names no image, or Ray missing or "
                      "unreachable.")
@click.argument("images", nargs=-1)
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="An exported .onnx file.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Results file: .jsonl (one JSON record per line) or .parquet (columns file, predictions, error).")
@click.option("--files-from", type=click.Path(dir_okay=False), help="A text file of image paths, one per line "
              "(read by Ray in parallel; on a cluster every worker must see the paths, e.g. a shared file system).")
@click.option("--address", help="A Ray cluster to join ('auto', or host:port of its head); default: start a local "
                                "Ray instance for this run.")
@click.option("--actors", type=click.IntRange(min=1), help="Scoring actors (each one CPU, one onnxruntime session); "
                                                             "default: one per CPU of the Ray instance.")
@click.option("--batch-size", default=BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
              help="Images per batch that an actor decodes and classifies at once.")
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(min=1), help="Classes to report per image.")
@click.option("--raw", is_flag=True, help="The images are already in the model's form (the MNIST models': 28x28, light on dark).")
@click.version_option(package_name=DISTRIBUTION, prog_name="infer-ray")
def main(images, model_path, out, files_from, address, actors, batch_size, top_k, raw) -> None:
    fmt = OUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise BadUsage(f"{out}: the results file must end in {' or '.join(OUT_FORMATS)}")
    if bool(images) == bool(files_from):
        raise BadUsage("give either image paths or --files-from, not both or neither")
    try:
        import ray
    except ImportError:
        raise BadUsage("infer-ray needs Ray: pip install 'digitlens[ray]'") from None
    try:
        Classifier(model_path)  # refused here in one line, not in every actor
    except ModelError as e:
        raise BadUsage(f"{model_path}: {e}") from None
    files = None
    if images:
        if STDIN in images:
            raise BadUsage("'-' (standard input) is not read by infer-ray; use infer")
        files, problems = expand(images)
        if problems:
            raise BadUsage("; ".join(f"{arg}: {problem}" for arg, problem in problems))
    elif not os.path.isfile(files_from):
        raise BadUsage(f"{files_from}: no such file")
    elif not lists_a_file(files_from):
        raise BadUsage(f"{files_from}: lists no files")
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False, include_dashboard=False)
    except Exception as e:  # noqa: BLE001 - Ray's own errors for an unreachable or refused cluster
        raise BadUsage(f"cannot start or join Ray{f' at {address}' if address else ''} ({first_line(e)})") from None
    context = ray.data.DataContext.get_current()  # importing ray.data sets up its logging: quieten it after
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not its plan and timings on every run
    context.enable_progress_bars = sys.stderr.isatty()
    context.execution_options.preserve_order = True  # the records in the order of the files, as infer's
    try:
        count, failed = write(score(files, str(model_path.resolve()), files_from=files_from, top_k=top_k, raw=raw,
                                    batch_size=batch_size, actors=actors), out, fmt)
    except OSError as e:
        raise click.ClickException(f"cannot write {out} ({e.strerror or e}); nothing written") from None
    except Exception as e:  # noqa: BLE001 - Ray's errors from its workers (a lost node, a worker that died)
        raise click.ClickException(one_line(f"scoring failed on Ray ({type(e).__name__}: {first_line(e)}); "
                                            "nothing written")) from None
    finally:
        ray.shutdown()
    click.echo(one_line(f"{count} files scored, {failed} could not be classified: {out}"), err=True)
    sys.exit(FAILED if failed else 0)


if __name__ == "__main__":
    main()
