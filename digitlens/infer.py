"""The `infer` command: classify image files with an exported ONNX model (a thin layer over Classifier)."""
from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import sys
from pathlib import Path

import click

from digitlens.classifier import BATCH_SIZE, Classifier, Result
from digitlens.errors import ImageError, ModelError
from digitlens.images import PREPROCESSORS, image_extensions
from digitlens.limits import read_encoded
from digitlens.runtime import DEVICES
from digitlens.text import DISTRIBUTION, USAGE, BadUsage, one_line, shown

OUTPUT_FORMATS = ("text", "json", "csv")
PROGRESS_MIN = 20  # files; fewer finish before a progress bar would tell anything
FAILED = 1  # exit status when some files could not be classified (a bad command line or model: USAGE)
STDIN = "-"


def expand(args: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """(inputs, (argument, problem) pairs): a folder gives the images in it, a pattern its matches, '-' stdin."""
    files, problems = [], []
    for arg in args:
        path = Path(arg)
        if arg == STDIN:
            found, problem = [STDIN], ""
        elif path.is_dir():
            extensions = image_extensions()
            found = sorted(str(p) for p in path.iterdir()
                           if p.suffix.lower() in extensions and not p.name.startswith(".") and p.is_file())
            problem = "folder holds no images"
        elif path.exists():
            found, problem = [arg], ""
        elif glob.has_magic(arg):
            found = sorted(p for p in glob.glob(arg) if Path(p).is_file())
            problem = "no file matches this pattern"
        else:
            found, problem = [], "no such file or directory"
        files += found
        if not found:
            problems.append((arg, problem))
    if files.count(STDIN) > 1:
        raise BadUsage("'-' (standard input) can be given once only")
    return files, problems


class Report:
    """One record per classified image on `out`: text lines, a JSON array, or CSV rows (one per rank).
    The document is complete whenever `close` has run, however few records it holds."""

    def __init__(self, fmt: str, out):
        self.fmt, self.out, self.count = fmt, out, 0
        if fmt == "csv":
            self.csv = csv.writer(self.out, lineterminator="\r\n")  # RFC 4180: quotes any name with \r or \n
            self.csv.writerow(["file", "rank", "index", "class", "probability"])
        elif fmt == "json":
            self.out.write("[")

    def add(self, result: Result) -> None:
        name = shown(result.source)
        if self.fmt == "text":
            self.out.write(one_line(f"{name}: " + ", ".join(f"{p.label} ({p.probability:.3f})" for p in result.predictions))
                           + "\n")
        elif self.fmt == "json":
            self.out.write(("," if self.count else "") + "\n  " + json.dumps(result.to_dict()))
        else:
            for rank, p in enumerate(result.predictions, 1):
                self.csv.writerow([name, rank, p.index, p.label, round(p.probability, 6)])
        self.count += 1
        self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.count else "]\n")
        self.out.flush()


def error(name: str, problem: str) -> None:
    click.echo("Error: " + one_line(shown(f"{name}: {problem}")), err=True)


def progress(total: int):
    """A progress bar on stderr when there are many files and stderr is a terminal, else nothing."""
    if total < PROGRESS_MIN or not sys.stderr.isatty():
        return contextlib.nullcontext()
    return click.progressbar(length=total, label="classifying", file=sys.stderr, show_pos=True)


def read_stdin() -> bytes:
    """The encoded image on standard input; ImageError when there is none or it cannot be read."""
    if sys.stdin is None:
        raise ImageError("no standard input (it is closed)")
    return read_encoded(sys.stdin.buffer)


def run(clf: Classifier, files: list[str], report: Report, top_k: int, raw: bool, batch_size: int) -> int:
    """Classify and report; returns the number of inputs that could not be classified."""
    failed, stdin = 0, None
    if STDIN in files:
        try:
            stdin = read_stdin()
        except ImageError as e:
            error("<stdin>", str(e))
            files, failed = [f for f in files if f != STDIN], 1
    sources = [stdin if f == STDIN else f for f in files]
    names = ["<stdin>" if f == STDIN else f for f in files]
    with progress(len(files)) as bar:
        for result in clf.classify(sources, top_k, raw, batch_size, names=names):
            if bar:
                click.echo("\r\033[K", err=True, nl=False)  # clear the bar's line before writing under it
                bar.update(1)
            if result.ok:
                report.add(result)
            else:
                error(result.source, result.error)
                failed += 1
    return failed


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               help="Classify images (files, folders of images, glob patterns, or '-' for one image on standard "
                    "input) with an exported ONNX model. Everything about the model (class names, normalisation, "
                    "preprocessing) comes from its metadata.",
               epilog="Exit status: 0 all classified; 1 some inputs could not be classified (the others are "
                      "reported), or the output could not be written; 2 usage error: a bad option or model, or a "
                      "path that names no image.")
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="An exported .onnx file.")
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(min=1), help="Classes to report per image.")
@click.option("--format", "fmt", default="text", show_default=True, type=click.Choice(OUTPUT_FORMATS),
              help="text: 'file: class (probability)'; json: an array of records; csv: one row per file and rank.")
@click.option("--batch-size", default=BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
              help="Images per onnxruntime call.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(DEVICES),
              help="cuda needs onnxruntime-gpu; refused, not silently run on the CPU, when it is missing.")
@click.option("--raw", is_flag=True, help="The images are already in the model's form (the MNIST models': 28x28, light on dark): "
                                          "only convert them to grey (or RGB), no inversion, cropping or centring.")
@click.option("--assume", type=click.Choice(list(PREPROCESSORS)),
              help="For a model without this project's metadata: use this preprocessing, pixels in [0, 1] "
                   "without standardisation, and the output indices as class names.")
@click.version_option(package_name=DISTRIBUTION, prog_name="infer")
def main(images, model_path, top_k, fmt, batch_size, device, raw, assume) -> None:
    try:
        clf = Classifier(model_path, device, assume)
    except ModelError as e:
        raise BadUsage(f"{model_path}: {e}") from None
    files, problems = expand(images)
    for arg, problem in problems:
        error(arg, problem)
    if isinstance(sys.stdout, io.TextIOWrapper):  # a stdout that cannot encode a name escapes it
        sys.stdout.reconfigure(errors="backslashreplace")
    report = Report(fmt, sys.stdout)
    try:
        failed = run(clf, files, report, top_k, raw, batch_size)
    except ModelError as e:
        raise BadUsage(f"{model_path}: {e}") from None
    finally:  # the records so far, as a complete document, whatever stopped the run
        report.close()
    sys.exit(USAGE if problems else FAILED if failed else 0)


def cli() -> None:
    """The console script: `main`, ending quietly on a closed pipe and in one line on a failed write."""
    try:
        main()  # click ends a closed pipe (EPIPE) quietly itself, with exit status 1
    except OSError as e:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        click.echo(f"Error: cannot write the output ({e.strerror or e})", err=True)
        sys.exit(FAILED)


if __name__ == "__main__":
    cli()
