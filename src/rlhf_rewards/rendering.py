"""Rendering conversations into the exact text each reward model reads.

The scalar models' formats are one renderer each, registered per ``Preset.text_format``: a renderer takes the
prompt's messages (validated by :mod:`rlhf_rewards.conversation`), the completion text and the model's tokenizer, and
returns the string the model card's own code would build before tokenizing. The RLHFlow pair-PM's context and pair
templates are here too; PairRM's source and candidate texts are built in :mod:`rlhf_rewards.backends.pairrm`, since
its card tokenizes the parts separately rather than one rendered string.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Callable

from .conversation import Message

Renderer = Callable[[list[Message], str, object], str]


def split_system(messages: list[Message]) -> tuple[list[str], list[Message]]:
    """Split leading system messages from the rest; a system message after the first user turn is an error
    (formats without a system role have nowhere faithful to put it)."""
    n_system = next((j for j, m in enumerate(messages) if m["role"] != "system"), len(messages))
    rest = [dict(m) for m in messages[n_system:]]
    if any(m["role"] == "system" for m in rest):
        raise ValueError("a system message after the first user turn has no place in this model's format")
    return [m["content"] for m in messages[:n_system]], rest


def fold_system(messages: list[Message]) -> list[Message]:
    """Merge leading system messages into the first user message as ``"{system}\n\n{user}"``.

    Used for models whose format has no system role, so the instruction still reaches the model and the
    user/assistant alternation (which some formats infer from position) is kept.
    """
    system, rest = split_system(messages)
    if system:
        rest[0]["content"] = "\n\n".join(system + [rest[0]["content"]])
    return rest


def check_alternation(messages: list[Message]) -> None:
    """Raise unless the roles alternate user, assistant, user, ... (formats that infer roles from position)."""
    for j, m in enumerate(messages):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {j} has role {m['role']!r} where this model's format needs {expected!r} "
                             "(its turns must alternate user/assistant, starting with user)")


def render_chat_template(messages: list[Message], completion: str, tokenizer) -> str:
    """The reward model's own tokenizer chat template over the conversation plus the completion as the last
    assistant turn, as text (``tokenize=False``), like Ray2333's model card does.

    Templates that reject a system role (Mistral v0.2's raises) get the system prompt folded into the first user
    turn instead (:func:`fold_system`).
    """
    from jinja2.exceptions import TemplateError

    conversation = messages + [{"role": "assistant", "content": completion}]
    pinned = template_kwargs(tokenizer)
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, **pinned)
    except TemplateError as err:
        if not any(m["role"] == "system" for m in messages):
            raise ValueError(f"the reward model's chat template rejects this conversation: {err}") from None
    try:
        return tokenizer.apply_chat_template(fold_system(conversation), tokenize=False, **pinned)
    except TemplateError as err:
        raise ValueError(f"the reward model's chat template rejects this conversation: {err}") from None


def render_chat_template_without_bos(messages: list[Message], completion: str, tokenizer) -> str:
    """Skywork-Reward-V2's model card: :func:`render_chat_template`'s text with one leading BOS string removed,
    because the card then tokenizes it with the tokenizer's own BOS added (one BOS either way; a template that
    writes no BOS, such as Qwen3's, is left as it is)."""
    text = render_chat_template(messages, completion, tokenizer)
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


TEMPLATE_DAY = datetime.now()
"""When this process imported this module (at its first model load). A chat template that writes today's date
(Llama-3.2's and 3.3's set ``date_string`` from ``strftime_now``) writes this day's, as the model card's own call made that day does, and keeps
writing it: a model's input text, and so its rewards, do not change at midnight while it runs."""

_DATE_FROM_CLOCK = re.compile(r"""set\s+date_string\s*=\s*strftime_now\(\s*(['"])(.*?)\1\s*\)""")


def template_kwargs(tokenizer: Any) -> dict[str, str]:
    """Variables to render ``tokenizer``'s chat template with: ``date_string`` pinned to :data:`TEMPLATE_DAY` (in
    the template's own format) when the template takes it from the clock, nothing otherwise (a template with a fixed
    default, such as Llama-3.1's "26 Jul 2024", keeps it)."""
    template = getattr(tokenizer, "chat_template", None)
    found = _DATE_FROM_CLOCK.search(template) if isinstance(template, str) else None
    return {"date_string": TEMPLATE_DAY.strftime(found.group(2))} if found else {}


def render_yi_chatml(messages: list[Message], completion: str, tokenizer=None) -> str:
    """Starling-RM-34B's model card: ``<|im_start|>{role}\\n{content}<|im_end|>`` turns joined by ``\\n``, the
    completion as the last assistant turn, nothing after its ``<|im_end|>`` (as in the card's test sample)."""
    turns = messages + [{"role": "assistant", "content": completion}]
    return "\n".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" for m in turns)


def render_starling_llama2(messages: list[Message], completion: str, tokenizer=None) -> str:
    """Starling-RM-7B-alpha: ``<s>[INST] {prompt} </s> [/INST] {response}</s>`` per exchange, concatenated for
    multi-turn. A system prompt goes inside the first ``[INST]`` as Llama-2-chat's ``<<SYS>>`` block."""
    system_parts, turns = split_system(messages)
    system = "\n\n".join(system_parts)
    turns.append({"role": "assistant", "content": completion})
    check_alternation(turns)
    parts = []
    for j in range(0, len(turns), 2):
        user = turns[j]["content"]
        if j == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        parts.append(f"<s>[INST] {user} </s> [/INST] {turns[j + 1]['content']}</s>")
    return "".join(parts)


# The context template of RLHFlow's model card. It picks the role by position (even = user), so prompts reach it
# with leading system messages folded into the first user turn and strictly alternating turns. Rendered through
# transformers' own chat template machinery (trim_blocks on), exactly like the card's
# ``tokenizer_plain.apply_chat_template`` call, which does not give the same text as reading the template literally.
RLHFLOW_CONTEXT_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
    "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n"
)
RLHFLOW_PAIR_PROMPT = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"


def render_rlhflow_context(messages: list[Message], tokenizer) -> str:
    """RLHFlow's model card: the plain-text context for a prompt (system folded into the first user turn)."""
    turns = fold_system(messages)
    check_alternation(turns)
    return tokenizer.apply_chat_template(turns, chat_template=RLHFLOW_CONTEXT_TEMPLATE, tokenize=False)


def render_rlhflow_pair(context: str, response_a: str, response_b: str, tokenizer) -> str:
    """RLHFlow's model input for one order, as its model card builds it: the pair prompt as a single user message
    in the model's own (Llama-3) chat template, with every occurrence of the BOS string removed as the card's
    ``.replace`` does."""
    prompt = RLHFLOW_PAIR_PROMPT.format(context=context, response_A=response_a, response_B=response_b)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
    return text.replace(tokenizer.bos_token, "") if tokenizer.bos_token else text


RENDERERS: dict[str, Renderer] = {
    "chat-template": render_chat_template,
    "chat-template-without-bos": render_chat_template_without_bos,
    "yi-chatml": render_yi_chatml,
    "starling-llama2": render_starling_llama2,
}


def get_renderer(text_format: str) -> Renderer:
    """Return the renderer registered for ``text_format``."""
    try:
        return RENDERERS[text_format]
    except KeyError:
        raise ValueError(f"unknown text format {text_format!r}; known: {', '.join(RENDERERS)}") from None
