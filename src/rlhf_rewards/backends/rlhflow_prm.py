"""RLHFlow's Llama-3.1-8B PRMs: causal LMs that answer each step of a solution, posed as a user turn, with an
assistant turn "+" or "-". A step's reward is ``softmax(logit("+"), logit("-"))[0]`` at the position that predicts the
assistant's answer (see docs/presets/rlhflow-prm.md for the card's procedure).

The card runs one growing conversation per step and reads position -3 of each. Every such conversation is, token for
token, a prefix of the whole one (each turn ends at the special token ``<|eot_id|>``, so no merge crosses a turn), and
causal attention makes a position's hidden state depend on the tokens before it only: one forward over the whole
conversation gives every step's reward, read two tokens before the ``<|eot_id|>`` that closes each assistant turn.
Only the LM-head rows of "+" and "-" are multiplied, at those positions.
"""

from __future__ import annotations

from typing import Any

from ..conversation import Message
from ..rendering import template_kwargs
from .label_token_prm import LabelTokenProcessRewardModel, load_label_token_prm


class StepLabelProcessRewardModel(LabelTokenProcessRewardModel):
    """RLHFlow's PRM as a process reward model (see :class:`ProcessRewardModel` for the API): ``label_ids`` are the
    card's candidate tokens ``(id of "+", id of "-")``, read where each assistant answer is predicted."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        convert = self.tokenizer.convert_tokens_to_ids
        self._assistant_header = [convert("<|start_header_id|>"), self._one_id("assistant"),
                                  convert("<|end_header_id|>")]
        self._end_of_turn = convert("<|eot_id|>")

    def _render_steps(self, messages: list[Message], steps: list[str]) -> str:
        *head, question = messages
        roles = [m["role"] for m in messages]
        if question["role"] != "user" or len(head) > 1 or (head and head[0]["role"] != "system"):
            raise ValueError(f"its steps answer one question: the prompt must be one user message, optionally after "
                             f"one system message; got the roles {roles} (earlier assistant turns would sit where "
                             "the model reads its '+'/'-' labels)")
        turns: list[Message] = list(head)
        for k, step in enumerate(steps):
            text = step.strip()  # the card strips every step, then prefixes the first with the question
            turns.append({"role": "user", "content": f"{question['content']} {text}" if k == 0 else text})
            turns.append({"role": "assistant", "content": self.preset.extra["good_token"]})
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False,
                                                  **template_kwargs(self.tokenizer))

    def _read_positions(self, ids: list[int]) -> list[int]:
        """Per assistant turn, two tokens before the ``<|eot_id|>`` closing it: the card's ``-3`` of the conversation
        ending with that turn (the ``\\n\\n`` that predicts its "+")."""
        header, out, j = self._assistant_header, [], 0
        while j <= len(ids) - len(header):
            if ids[j:j + len(header)] != header:
                j += 1
                continue
            end = next((e for e in range(j + len(header), len(ids)) if ids[e] == self._end_of_turn), None)
            if end is None:
                break
            out.append(end - 2)
            j = end + 1
        return out


def load_step_label_prm(name_or_path: str, **options: Any) -> StepLabelProcessRewardModel:
    """The ``"llama-step-label-prm"`` backend's loader, as the card loads (bf16 on GPU); see
    :func:`~.label_token_prm.load_label_token_prm` for ``options``."""
    return load_label_token_prm(StepLabelProcessRewardModel, name_or_path, **options)  # type: ignore[return-value]
