"""Configuration of MergeRandAR, the random-order generator of MergeVQ's K merged tokens (docs/design.md §3.4)."""

from .config_checks import check_field_ranges
from .configuration_mergear import MergeARConfig


class MergeRandARConfig(MergeARConfig):
    r"""
    Configuration of [`MergeRandARForCausalLM`]. Every [`MergeARConfig`] field keeps its meaning (the two models
    share their blocks and presets: ``MergeRandARConfig.from_preset("tiny", ...)``), except ``repeat_window``, which
    is unused: this model sees each merged token once, so there are no repeats to evict, and
    ``tokens_left_embedding`` and ``repeat_gate``, which must stay off: every token it generates is a new one.

    Args:
        position_loss_weight: weight of the position head's loss (which grid position the next token takes)
            relative to the code loss.
    """

    model_type = "mergevq_randar"

    position_loss_weight: float = 1.0

    def validate_architecture(self):
        super().validate_architecture()
        check_field_ranges(self, non_negative=("position_loss_weight",))
        for name in ("tokens_left_embedding", "repeat_gate"):
            if getattr(self, name):
                raise ValueError(f"MergeRandARConfig.{name} must be False: random order generates exactly K new tokens.")


__all__ = ["MergeRandARConfig"]
