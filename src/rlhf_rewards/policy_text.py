"""What a policy or its trainer hands over, read as the reward model's inputs, by one rule for every caller: a
prompt as messages (parsed back when it was rendered with a policy chat template), a completion as text (without
the policy's end-of-turn markers), and a decoded prompt+response split into both (OpenRLHF's queries, PPO rows).
The chat formats themselves are :mod:`rlhf_rewards.chat_parsing`'s.
"""

from __future__ import annotations

from typing import Any

from .chat_parsing import detect_chat_format, parse_chat, strip_completion, strip_tokens
from .conversation import Message, normalize_completion, normalize_prompt

PAD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]")
"""Padding tokens a policy's decode can leave around a query (left padding before the prompt, right padding after
the response), beyond the EOS/end-of-turn markers of each chat format."""


def prompt_messages(prompt: object, where: str, parse: bool = True) -> tuple[list[Message], str]:
    """A prompt as validated messages plus the chat format it was written in (``"plain"`` for untemplated text or
    message lists). With ``parse``, text rendered with a policy chat template is parsed back into its turns."""
    if parse and isinstance(prompt, str):
        messages, fmt = parse_chat(prompt, where=where)
        return normalize_prompt(messages, where), fmt
    return normalize_prompt(prompt, where), "plain"


def completion_text(completion: object, fmt: str, where: str) -> str:
    """A completion as text; after a templated prompt (``fmt`` not ``"plain"``), without the end-of-turn markers
    the policy may have left at its end (TRL decodes with special tokens skipped, but not every pipeline does)."""
    text = normalize_completion(completion, where)
    return strip_completion(text, fmt) if fmt != "plain" else text


def split_policy_text(text: str, where: str, prompt: Any = None, prompt_field: str = "prompt"
                       ) -> tuple[list[Message], str]:
    """A policy's prompt+response rendered with its chat template (and decoded with its special tokens, as OpenRLHF
    sends queries and PPO trainers hold them) as ``(messages, response)``: the one rule every caller uses.

    The response is the last assistant turn, without the EOS/end-of-turn markers and the pad tokens
    (:data:`PAD_TOKENS`, also stripped from the text's start) the decode left. A text ending with the assistant's
    generation prompt, or an empty assistant turn, has the empty response ``""``; one ending with a user turn has
    none (``ValueError``). The messages before the response must end with a user turn. Untemplated text is split at
    ``prompt`` when the text starts with it (OpenRLHF's ``prompts[i]``, named ``prompt_field`` in errors)."""
    text = strip_tokens(text, PAD_TOKENS, leading=True)
    fmt = detect_chat_format(text)
    if fmt == "plain":
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{prompt_field}: expected the prompt as text (a string), got {type(prompt).__name__}; "
                             f"{where} is not rendered with a chat template, so it is split at its prompt")
        if isinstance(prompt, str) and prompt and text.startswith(prompt):
            return normalize_prompt(prompt, where), text[len(prompt):]
        raise ValueError(f"{where}: not rendered with a chat template rlhf_rewards can parse (ChatML, Llama-3, "
                         "Mistral/Llama-2, Gemma, Zephyr, Phi-3), and does not start with its prompt, so the "
                         "response cannot be told from the prompt")
    messages, fmt = parse_chat(text, where=where)
    if messages[-1]["role"] != "assistant":
        if _ends_with_generation_prompt(text):
            return normalize_prompt(messages, where), ""
        raise ValueError(f"{where}: the text ends with a closed {messages[-1]['role']} turn; expected the "
                         "policy's response as the last (assistant) turn")
    response = strip_tokens(strip_completion(messages[-1]["content"], fmt), PAD_TOKENS, leading=True)
    return normalize_prompt(messages[:-1], where), response


def _ends_with_generation_prompt(text: str) -> bool:
    """Whether ``text`` ends with an open assistant turn, which parsing drops: then text written after it is that
    turn's content."""
    try:
        return parse_chat(text + "x")[0][-1] == {"role": "assistant", "content": "x"}
    except ValueError:
        return False
