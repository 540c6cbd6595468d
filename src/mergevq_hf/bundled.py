"""The small model that ships inside the package (Fashion-MNIST 32x32, trained by this project's own scripts).

It is the default of the README's main command, the examples and the Space, so they work offline.
"""

from pathlib import Path

BUNDLED_MODEL_NAME = "mergevq-fashion-mnist-tiny"


def bundled_model_path() -> Path | None:
    """Folder of the bundled pipeline (`MergeVQPipeline.from_pretrained(path)`), or None when it is not installed."""
    path = Path(__file__).parent / "pretrained" / BUNDLED_MODEL_NAME
    return path if (path / "model_index.json").is_file() else None
