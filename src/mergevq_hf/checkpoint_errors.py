"""Turn the low-level errors of a bad checkpoint into errors that say what is wrong and what was expected."""

from safetensors import SafetensorError


class ClearCheckpointErrorsMixin:
    """Put first in the bases of a `PreTrainedModel` subclass."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"{pretrained_model_name_or_path}: the weights file is not a valid safetensors file ({error}); "
                "re-download or re-save the checkpoint"
            ) from error
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"{pretrained_model_name_or_path}: tensor shapes in the checkpoint do not match the {cls.__name__} "
                "config (the load report above lists them); load it with the config it was saved with"
            ) from error
