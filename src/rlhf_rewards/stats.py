"""Counters a reward model keeps about its work, exposed as ``rm.stats``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Union


@dataclass
class RewardStats:
    """Running totals since the model was loaded (or since :meth:`reset`). Every counter is an ``int`` (a JSON
    integer in the server's answers) except ``seconds``, a ``float``.

    Attributes:
        samples: model inputs scored (a pairwise comparison in both orders counts two).
        truncated: inputs longer than the model's limit that lost tokens (see ``truncated_tokens``).
        truncated_tokens: tokens removed by truncation, summed over inputs.
        batches: forward passes run.
        real_tokens: tokens of the inputs themselves.
        computed_tokens: tokens the model computed, padding included; ``computed_tokens / real_tokens`` is the
            padding overhead.
        oom_splits: batches split in two after an out-of-memory error and retried.
        comparisons: pairwise comparisons made (each in both orders).
        order_disagreements: comparisons whose two orders preferred different responses (position inconsistency).
        ties: comparisons whose probability was exactly 0.5.
        templated_prompts: text prompts that arrived already rendered in a chat template and were parsed back into
            messages (``parse_templates``).
        nonfinite: model outputs that were NaN or infinite (a scalar reward, or a comparison's logits or
            probability); each such sample or comparison gets a
            :class:`~rlhf_rewards.errors.NonFiniteRewardError` instead of a number.
        control_text: strings inside messages (prompt contents, completions) that spell one of the model's control
            tokens (``<|im_end|>``, ``<unk>``, ``[SEP]``, ...), counted once per sample or comparison they occur in;
            read as ordinary text unless the model was loaded with ``control_text="tokens"``.
        seconds: wall time spent in scoring calls.
    """

    samples: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    batches: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    oom_splits: int = 0
    comparisons: int = 0
    order_disagreements: int = 0
    ties: int = 0
    templated_prompts: int = 0
    nonfinite: int = 0
    control_text: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        """Set every counter back to zero."""
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())

    def as_dict(self) -> dict[str, Union[int, float]]:
        """The counters as a plain dict: ``int`` values, but ``seconds`` a ``float``."""
        return asdict(self)

    def summary(self) -> str:
        """The counters as readable lines, saying what each means (for logs and the demo)."""
        lines = [f"{self.samples} model inputs scored in {self.batches} forward passes, {self.seconds:.2f} s"
                 + (f" ({self.oom_splits} batches split in two after running out of memory)"
                    if self.oom_splits else "")]
        tokens = f"tokens: {self.real_tokens} in the inputs, {self.computed_tokens} computed"
        if self.computed_tokens >= self.real_tokens:
            lines.append(f"{tokens} ({self.padding_share:.0%} of them padding)")
        else:
            lines.append(f"{tokens}\n  (fewer computed than in the inputs: a prefix shared by several inputs, such as "
                         "one prompt with several responses, ran once)")
        if self.truncated:
            lines.append(f"truncated: {self.truncated} of {self.samples} inputs were longer than the model's limit "
                         f"and lost {self.truncated_tokens} tokens in all")
        else:
            lines.append("truncated: none")
        if self.control_text:
            lines.append(f"control text: {self.control_text} strings inside messages spelled a control token of the "
                         "model's tokenizer")
        if self.comparisons:
            lines.append(f"pairwise: {self.comparisons} comparisons, each run in both orders; in "
                         f"{self.order_disagreements} ({self.order_disagreement_rate:.0%}) the two orders preferred "
                         f"different responses; {self.ties} exact ties (P = 0.5)")
        if self.nonfinite:
            lines.append(f"non-finite: {self.nonfinite} model outputs were NaN or infinite and gave no reward")
        return "\n".join(lines)

    @property
    def truncation_rate(self) -> float:
        """Share of scored inputs that were truncated (0 when nothing was scored)."""
        return self.truncated / self.samples if self.samples else 0.0

    @property
    def padding_share(self) -> float:
        """Share of computed tokens that were padding (0 when nothing was computed)."""
        return 1 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0

    @property
    def order_disagreement_rate(self) -> float:
        """Share of pairwise comparisons whose two orders disagreed."""
        return self.order_disagreements / self.comparisons if self.comparisons else 0.0
