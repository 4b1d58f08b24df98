"""The training side (torch): data sets, architectures, the training loop, conversion to TorchScript and ONNX,
model cards, typed params; the DVC stages in pipeline/stages/. Models are used through `digitlens`."""
