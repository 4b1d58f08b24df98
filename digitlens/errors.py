"""The two errors users of the API catch: a bad image (the others in a batch go on) and an unusable model."""


class ImageError(ValueError):
    """An input that cannot be turned into a model input; the message says why, in a few words."""


class ModelError(ValueError):
    """A model file that cannot be used: nothing can be classified with it. The message is one line."""
