"""The model card: a short Markdown page the evaluate stage writes beside each exported model, from its metadata."""
from __future__ import annotations

from digitlens.metadata import ModelInfo

DATASET_TITLES = {"mnist": "MNIST (handwritten digits)", "fashion-mnist": "Fashion-MNIST (clothing photos)"}
USES = {
    "digit": ("one handwritten digit per image, dark on light or light on dark, any size: it is cropped, "
              "scaled to fit 20x20 and centred by mass in 28x28, as MNIST was made",
              "several digits in one image, letters or symbols (it always answers with one of the 10 digits), "
              "photos of printed or displayed numbers with clutter around them"),
    "fashion": ("one clothing item or shoe per image, on a plain background: it is trimmed to the item, "
                "scaled to 28 pixels on its longer side and centred, as Fashion-MNIST was made",
                "several items in one picture, people wearing the clothes, busy backgrounds, anything "
                "outside its 10 classes (it always answers with one of them)"),
    "plain": ("one image like those it was trained on: it is converted to {colour} and resized to {size}x{size} "
              "pixels as it is (not cropped, and its aspect ratio not kept), as the training images were",
              "images unlike its training images, or of anything outside its {classes} classes (it always answers "
              "with one of them)"),
}


def recipe_text(params: dict) -> str:
    """The training recipe in one line, from the params recorded in the model's metadata."""
    recipe, augment = params.get("recipe", {}), params.get("augment") or {}
    schedule = recipe.get("scheduler") or {}
    parts = [f"{recipe.get('optimizer', '?')}{' (Nesterov)' if recipe.get('nesterov') else ''} lr {recipe.get('lr', '?')}"
             + (" peak of a one-cycle schedule" if schedule.get("kind") == "onecycle" else "")
             + (" reduced on plateau" if schedule and schedule.get("kind") != "onecycle" else ""),
             f"batch {recipe.get('batch_size', '?')}", f"{recipe.get('epochs', '?')} epochs",
             f"seed {params.get('seed', '?')}"]
    if recipe.get("weight_decay"):
        parts.append(f"weight decay {recipe['weight_decay']:g}")
    if recipe.get("label_smoothing"):
        parts.append(f"label smoothing {recipe['label_smoothing']:g}")
    if recipe.get("normalize"):
        parts.append("standardised inputs")
    if params.get("hflip"):
        parts.append("random horizontal flips")
    warps = [f"{label} {augment[key]:g}{unit}" for key, label, unit in (
        ("rotate", "rotation ±", "°"), ("shear", "shear ±", "°"), ("scale", "scale ±", ""),
        ("translate", "shift ±", " px")) if augment.get(key)]
    if warps:
        parts.append("random " + ", ".join(warps))
    if augment.get("erase"):
        parts.append(f"random erasing (p {augment['erase']:g})")
    return ", ".join(parts)


def views_text(info: ModelInfo) -> str:
    """What the graph averages per image (the test-time views), for the card's input line."""
    if info.forward_passes == 1:
        return ""
    warps = [f"zoomed in and out by {info.test_zoom:.0%}" if info.test_zoom else "",
             f"rotated by +-{info.test_rotate:g} degrees" if info.test_rotate else ""]
    warps = " or ".join(w for w in warps if w)
    what = f"the image and the same {warps}" if warps else "the image"
    if info.test_flip:
        what += ", and the mirror images of these" if warps else " and its mirror image"
    return (f", the mean of the logits of {what} (test-time views, in the graph: {info.forward_passes} forward passes "
            "per image)")


def model_card(name: str, info: ModelInfo, per_class: dict[str, float], parity: dict, sha256: dict[str, str]) -> str:
    """Markdown for the model `name` (its file stem), from its metadata, per-class accuracy, parity report and
    the SHA-256 of each of its files (file name -> hex digest)."""
    facts = {"colour": "grey" if info.channels == 1 else "RGB", "size": info.size, "classes": len(info.class_names)}
    use, not_for = (text.format(**facts) for text in USES[info.preprocess])
    lines = [
        f"# `{name}`: {info.architecture} on {DATASET_TITLES.get(info.dataset, info.dataset)}",
        "",
        f"- Files: `{name}.onnx` (onnxruntime, opset and metadata inside), `{name}.pt` (TorchScript)",
        f"- Export id: `{info.export_id}` (the same in both files)",
        *(f"- SHA-256 of `{file}`: `{digest}`" for file, digest in sha256.items()),
        f"- Test accuracy: **{info.test_accuracy:.2f} %** on the {parity['images']:,} test images",
        f"- Recipe: {recipe_text(info.params)}",
        f"- Input: float32 `({', '.join(map(str, info.input['shape']))})`, pixels in [0, 1]"
        f"{' light on dark' if info.input.get('polarity') == 'light-on-dark' else ''}, "
        f"then `(x - {info.mean:g}) / {info.std:g}`;"
        f" output `{info.output}`: logits over {len(info.class_names)} classes"
        + views_text(info),
        f"- Preprocessing of users' images: `{info.preprocess}`",
        f"- Parity with PyTorch on the test set: ONNX max |logit diff| {parity['onnx']['max_abs_diff']:.1e}, "
        f"TorchScript {parity['torchscript']['max_abs_diff']:.1e}, "
        f"{parity['onnx']['argmax_mismatches'] + parity['torchscript']['argmax_mismatches']} predictions differ",
        "",
        "## Intended use",
        "",
        f"Classifying {use}.",
        "",
        f"Not for: {not_for}. It reports a probability for every class; a low top probability means the image "
        "looks like none of them.",
        "",
        "## Accuracy per class (test set)",
        "",
        "| class | accuracy |",
        "|---|---|",
        *(f"| {c} | {a:.2f} % |" for c, a in per_class.items()),
        "",
        "## Use",
        "",
        "```python",
        "from digitlens import Classifier",
        f'clf = Classifier("artifacts/{name}.onnx")',
        'print(clf.predict("image.png").top)',
        "```",
        "",
        f"or `infer image.png --model artifacts/{name}.onnx`.",
    ]
    return "\n".join(lines) + "\n"
