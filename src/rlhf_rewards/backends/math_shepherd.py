"""Math-Shepherd's process reward model (peiyi9979/math-shepherd-mistral-7b-prm): a Mistral causal LM that, at the
tag ``ки`` ending every step, gives the probability of "+" against "-".

The card runs the whole LM and takes ``logits[:, :, [id("+"), id("-")]].softmax(-1)[:, :, 0]`` at the positions of the
tag; here only the two LM-head rows are multiplied, at the tag positions (see :mod:`.label_token_prm`).
See docs/presets/math-shepherd.md for the card's procedure.
"""

from __future__ import annotations

from typing import Any

from ..conversation import Message, is_step_list
from .label_token_prm import LabelTokenProcessRewardModel, load_label_token_prm


class MathShepherdRewardModel(LabelTokenProcessRewardModel):
    """Math-Shepherd as a process reward model (see :class:`ProcessRewardModel` for the API).

    Attributes:
        step_tag: the tag written after every step (``"ки"``, plain vocabulary text), read as token
            ``step_tag_id`` (the piece ``"▁ки"``, 12902 in Mistral's vocabulary).
        label_ids: the ids of the card's good and bad tokens (``"+"``, ``"-"``: 648, 387); a step's reward is the
            softmax probability of the first against the second at the step's tag.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        extra = self.preset.extra
        self.step_tag: str = extra["step_tag"]
        # the card's tokenizer.encode("ки")[-1] and tokenizer.encode("+ -")[1:] (its [0] is the BOS)
        self.step_tag_id: int = self._one_id(self.step_tag)
        together = self.tokenizer.encode(f"{extra['good_token']} {extra['bad_token']}", add_special_tokens=False)
        if tuple(together) != self.label_ids:
            raise ValueError(f"the tokenizer encodes {extra['good_token'] + ' ' + extra['bad_token']!r} as "
                             f"{together}, not the good and bad tokens {list(self.label_ids)} the card reads")

    def _tag_refusal(self, text: str, where: str) -> None:
        """Raise ``ValueError`` when ``text`` holds the step tag: the model would read one more step there and every
        later reward would belong to another step (a policy could forge step boundaries). Refused on the characters
        whatever the tokenization around them (see docs/presets/math-shepherd.md)."""
        if self.step_tag in text:
            raise ValueError(f"{where} contains {self.step_tag!r}, {self.preset.name}'s step tag (plain text to its "
                             "tokenizer, so it would mark a step of its own there and shift the rewards of the "
                             f"steps after it); remove or replace {self.step_tag!r} to score this sample")

    def _steps(self, completion: object, fmt: str, where: str) -> tuple[str, ...]:
        steps = super()._steps(completion, fmt, where)
        listed = is_step_list(completion)
        for j, step in enumerate(steps):
            self._tag_refusal(step, f"{where}[{j}]" if listed else
                              f"{where} (its step {j + 1}, split at {self.step_separator!r})")
        return steps

    def _render_steps(self, messages: list[Message], steps: list[str]) -> str:
        if len(messages) != 1 or messages[0]["role"] != "user":
            roles = ", ".join(m["role"] for m in messages)
            raise ValueError(f"it reads one question (a single user turn), and this prompt holds {len(messages)} "
                             f"messages ({roles}); pass the question alone")
        question = messages[0]["content"]
        self._tag_refusal(question, "the question")
        # samples built by callers other than prepare (e.g. Bradley-Terry comparisons) reach here unchecked
        for j, step in enumerate(steps):
            self._tag_refusal(step, f"step {j + 1}")
        return f"{question} " + "\n".join(f"{step} {self.step_tag}" for step in steps)

    def _read_positions(self, ids: list[int]) -> list[int]:
        """The card's ``input_id == step_tag_id``: every position of the tag."""
        return [j for j, t in enumerate(ids) if t == self.step_tag_id]


def load_math_shepherd(name_or_path: str, **options: Any) -> MathShepherdRewardModel:
    """The ``"math-shepherd"`` backend's loader (see :func:`~.label_token_prm.load_label_token_prm` for
    ``options``): the tokenizer is also compared with sentencepiece and rebuilt from ``tokenizer.model`` if
    transformers loads it differently (``Preset.sentencepiece_truth``)."""
    return load_label_token_prm(MathShepherdRewardModel, name_or_path, **options)  # type: ignore[return-value]
