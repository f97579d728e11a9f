"""Tests for rlhf_rewards.chat_parsing: text rendered with a policy's chat template, parsed back into messages.

Round trips render messages with small Jinja copies of the published chat templates (the non-tool paths, rendered
in a Jinja environment set up like transformers' own: trim_blocks, lstrip_blocks, raise_exception), then parse the
text and compare with the messages the template was given.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Callable

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rlhf_rewards.chat_parsing import detect_chat_format, parse_chat, strip_completion

from serving_helpers import REPO

Messages = list[dict[str, str]]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_ENV.globals["raise_exception"] = _raise_exception

# Templates are raw strings: as in a tokenizer_config.json, Jinja itself turns the "\n" in its literals into newlines.
TEMPLATES_SRC: dict[str, str] = {
    # Generic ChatML (OpenHermes-2.5, Yi, transformers' ChatML default).
    "chatml": r"""{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}""",
    # Qwen2.5-Instruct, branch without tools.
    "qwen2.5": r"""
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""",
    # Qwen3, branch without tools or reasoning_content.
    "qwen3": r"""
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""",
    # Phi-4: ChatML with <|im_sep|> after the role and no newline between turns.
    "phi4": r"""{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}""",
    # Llama-3-Instruct.
    "llama3": r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}""",
    # Llama-3.1 / 3.2-Instruct, branch without tools.
    "llama3.1": r"""
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
""",
    # Llama-2-chat.
    "llama2": r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}""",
    # Mistral-7B-Instruct-v0.1.
    "mistral-v0.1": r"""{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}""",
    # Mistral-7B-Instruct-v0.2 (later revision): system folded into the first user turn, spaces around [INST].
    "mistral-v0.2": r"""
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
""",
    # Mistral-7B-Instruct-v0.3, branch without tools: system folded into the last user turn.
    "mistral-v0.3": r"""
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
""",
    # Mistral's v7 template (Mistral-Small-24B-Instruct-2501).
    "mistral-v7": r"""
{{- bos_token }}

{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST]' + message['content'] + '[/INST]' }}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
""",
    # Gemma / Gemma-2 -it.
    "gemma": r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}""",
    # Gemma-3 -it, string contents: system folded into the first user turn.
    "gemma3": r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
""",
    # zephyr-7b-beta / TinyLlama-Chat.
    "zephyr": r"""{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}""",
    # Phi-3.5-mini-instruct (Phi-3-mini's differs only in not skipping an empty system message).
    "phi3": r"""{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}""",
    # Phi-4-mini-instruct, branch without tools: Phi-3's tags without the newlines.
    "phi4-mini": r"""{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}""",
}
TEMPLATES = {name: _ENV.from_string(src) for name, src in TEMPLATES_SRC.items()}

SPECIAL_TOKENS = {
    "chatml": {"bos_token": "", "eos_token": "<|im_end|>"},
    "qwen2.5": {"bos_token": "", "eos_token": "<|im_end|>"},
    "qwen3": {"bos_token": "", "eos_token": "<|im_end|>"},
    "phi4": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama3.1": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-v0.1": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-v0.2": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-v0.3": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-v7": {"bos_token": "<s>", "eos_token": "</s>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "gemma3": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "zephyr": {"bos_token": "<s>", "eos_token": "</s>"},
    "phi3": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "phi4-mini": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
}


def render(template: str, messages: Messages, add_generation_prompt: bool, **extra: object) -> str:
    return TEMPLATES[template].render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      **SPECIAL_TOKENS[template], **extra)


# Contents hold other families' markup, so a parser that splits on foreign markers fails these round trips.
SYSTEM = "You are a terse assistant.\nAnswer in English; quote `<start_of_turn>` or `[INST]` verbatim."
USER_1 = "What do `<|im_start|>` and <|eot_id|> mean? Étude № 5 — ✓"
ASSISTANT_1 = "They are special tokens:\n- one opens a ChatML turn\n- the other ends a Llama-3 turn [/INST]"
USER_2 = "And <|user|> or <start_of_turn>model?\n\nThanks!"

# Each family's content must not hold that family's own markup; swap in neutral text where it would.
_OWN_MARKUP = {
    "chatml": ("<|im_start|>",),
    "llama3": ("<|eot_id|>",),
    "mistral": ("[INST]", "[/INST]"),
    "gemma": ("<start_of_turn>",),
    "zephyr": (),
    "phi3": ("<|user|>",),
}


def _neutral(text: str, family: str) -> str:
    for marker in _OWN_MARKUP[family]:
        text = text.replace(marker, "MARKER")
    return text


def conversations(family: str) -> dict[str, Messages]:
    s, u1, a1, u2 = (_neutral(t, family) for t in (SYSTEM, USER_1, ASSISTANT_1, USER_2))
    return {
        "single": [{"role": "user", "content": u1}],
        "multi": [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                  {"role": "user", "content": u2}],
        "system": [{"role": "system", "content": s}, {"role": "user", "content": u1}],
        "system-multi": [{"role": "system", "content": s}, {"role": "user", "content": u1},
                         {"role": "assistant", "content": a1}, {"role": "user", "content": u2}],
        "ends-with-assistant": [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}],
    }


def _identity(messages: Messages) -> Messages:
    return messages


def _qwen25(messages: Messages) -> Messages:
    if messages[0]["role"] == "system":
        return messages
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    return [{"role": "system", "content": default}, *messages]


def _qwen3(messages: Messages) -> Messages:
    # Qwen3 writes an empty think block into an assistant turn that follows the last user message.
    if messages[-1]["role"] != "assistant":
        return messages
    return [*messages[:-1], {"role": "assistant", "content": "<think>\n\n</think>\n\n" + messages[-1]["content"]}]


def _llama31(date: str) -> Callable[[Messages], Messages]:
    """Llama-3.1's template writes its knowledge cutoff and the date (``date``) into a system turn of every
    conversation: template text, not the conversation's, so parsing leaves it out (a system turn holding only it
    is no system prompt)."""
    def expected(messages: Messages) -> Messages:
        return messages
    return expected


def _fold_system(into: str) -> Callable[[Messages], Messages]:
    """Mistral v0.2/v0.3 and Gemma-3 write the system text in front of the first/last user turn."""
    def expected(messages: Messages) -> Messages:
        if messages[0]["role"] != "system":
            return messages
        rest = [dict(m) for m in messages[1:]]
        users = [m for m in rest if m["role"] == "user"]
        target = users[0] if into == "first" else users[-1]
        target["content"] = messages[0]["content"] + "\n\n" + target["content"]
        return rest
    return expected


# (template, family: the format name without a system message, the name with one or None when the template takes
#  no system message, what parsing must return for the messages rendered, extra template variables)
ROUND_TRIP_CASES = [
    ("chatml", "chatml", "chatml", _identity, {}),
    ("qwen2.5", "chatml", "chatml", _qwen25, {}),
    ("qwen3", "chatml", "chatml", _qwen3, {}),
    ("qwen3", "chatml", "chatml", _qwen3, {"enable_thinking": False}),
    ("phi4", "chatml", "chatml", _identity, {}),
    ("llama3", "llama3", "llama3", _identity, {}),
    ("llama3.1", "llama3", "llama3", _llama31("26 Jul 2024"), {}),
    ("llama3.1", "llama3", "llama3", _llama31("02 Mar 2025"), {"date_string": "02 Mar 2025"}),  # as 3.2 renders
    ("llama2", "mistral", "llama2", _identity, {}),
    ("mistral-v0.1", "mistral", None, _identity, {}),
    ("mistral-v0.2", "mistral", "mistral", _fold_system("first"), {}),
    ("mistral-v0.3", "mistral", "mistral", _fold_system("last"), {}),
    ("mistral-v7", "mistral", "mistral", _identity, {}),
    ("gemma", "gemma", None, _identity, {}),
    ("gemma3", "gemma", "gemma", _fold_system("first"), {}),
    ("zephyr", "zephyr", "zephyr", _identity, {}),
    ("phi3", "phi3", "phi3", _identity, {}),
    ("phi4-mini", "phi3", "phi3", _identity, {}),
]


def _round_trip_params() -> list:
    params = []
    for template, family, system_name, expected, extra in ROUND_TRIP_CASES:
        for conv_name, messages in conversations(family).items():
            has_system = messages[0]["role"] == "system"
            if has_system and system_name is None:
                continue
            for add_generation_prompt in (False, True):
                if add_generation_prompt and messages[-1]["role"] == "assistant":
                    continue
                case_id = "-".join([template, *(f"{k}={v}" for k, v in extra.items()), conv_name,
                                    *(["genprompt"] if add_generation_prompt else [])])
                params.append(pytest.param(template, messages, add_generation_prompt, extra,
                                           system_name if has_system else family, expected, id=case_id))
    return params


@pytest.mark.parametrize("template, messages, add_generation_prompt, extra, name, expected", _round_trip_params())
def test_round_trip(template, messages, add_generation_prompt, extra, name, expected):
    text = render(template, messages, add_generation_prompt, **extra)
    parsed, fmt = parse_chat(text)
    assert fmt == name
    assert detect_chat_format(text) == name
    assert parsed == expected(messages)
    assert_nothing_dropped(text, parsed, fmt)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_generation_prompt_is_dropped(template):
    messages = [{"role": "user", "content": "Hi"}]
    with_prompt, fmt = parse_chat(render(template, messages, True))
    without_prompt, _ = parse_chat(render(template, messages, False))
    assert with_prompt == without_prompt
    assert with_prompt[-1] == {"role": "user", "content": "Hi"}
    assert fmt != "plain"


def test_qwen3_empty_think_block_of_generation_prompt_is_template_markup():
    text = render("qwen3", [{"role": "user", "content": "Hi"}], True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert parse_chat(text) == ([{"role": "user", "content": "Hi"}], "chatml")


def test_hand_written_renderings():
    # The example prompt of Mistral-7B-Instruct-v0.1's model card: no space after [/INST], "</s> " between turns.
    card = ("<s>[INST] What is your favourite condiment? [/INST]"
            "Well, I'm quite partial to a good squeeze of fresh lemon juice.</s> "
            "[INST] Do you have mayonnaise recipes? [/INST]")
    assert parse_chat(card) == ([
        {"role": "user", "content": "What is your favourite condiment?"},
        {"role": "assistant", "content": "Well, I'm quite partial to a good squeeze of fresh lemon juice."},
        {"role": "user", "content": "Do you have mayonnaise recipes?"},
    ], "mistral")
    # A user turn ends at [/INST], so "</s>" inside it is text.
    assert parse_chat("<s>[INST] Why <s>strike</s> this? [/INST]") == (
        [{"role": "user", "content": "Why <s>strike</s> this?"}], "mistral")
    # A BOS the tokenizer added on top of the template's, decoded back to text.
    assert parse_chat("<s><s>[INST] hi [/INST]") == ([{"role": "user", "content": "hi"}], "mistral")
    assert parse_chat("<|begin_of_text|><|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>") \
        == ([{"role": "user", "content": "hi"}], "llama3")
    # Phi-3 without a generation prompt ends with its EOS; Phi-3-small starts with <|endoftext|> as BOS.
    assert parse_chat("<|endoftext|><|user|>\nhi<|end|>\n<|endoftext|>") == (
        [{"role": "user", "content": "hi"}], "phi3")
    # Hermes-2-Pro-Mistral puts the Mistral BOS before ChatML.
    assert parse_chat("<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n") \
        == ([{"role": "user", "content": "hi"}], "chatml")


def test_whitespace_inside_content_is_kept():
    messages = [{"role": "system", "content": "  indented system\n\n"},
                {"role": "user", "content": "\n\nleading newlines,  double  spaces,\ttabs \n"}]
    for template in ("chatml", "phi3", "zephyr", "phi4", "mistral-v7"):
        assert parse_chat(render(template, messages, True))[0] == messages, template
    # Mistral v0.1 writes one space on each side of a user turn and does not trim it: only those are removed.
    text = render("mistral-v0.1", [{"role": "user", "content": "  two spaces  "}], True)
    assert parse_chat(text)[0] == [{"role": "user", "content": "  two spaces  "}]
    # v0.3 writes no space before [/INST], so the message's own last space is taken for the template's.
    text = render("mistral-v0.3", [{"role": "user", "content": "two spaces  "}], True)
    assert parse_chat(text)[0] == [{"role": "user", "content": "two spaces "}]


def test_unclosed_final_assistant_turn_is_kept():
    # A prefill, or prompt + completion decoded together where the completion hit max length.
    assert parse_chat("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nOnce upon") == (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}], "chatml")
    assert parse_chat("<s>[INST] hi [/INST] Once upon") == (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}], "mistral")
    # A completion that ended with the EOS token instead of the end-of-turn marker.
    assert parse_chat("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nDone.<|endoftext|>")[0][-1] == \
        {"role": "assistant", "content": "Done."}
    assert parse_chat("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\nDone.<|end_of_text|>")[0][-1] == \
        {"role": "assistant", "content": "Done."}


def test_complete_final_assistant_turn_with_trailing_eos():
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nDone.<|im_end|><|endoftext|>"
    assert parse_chat(text)[0][-1] == {"role": "assistant", "content": "Done."}
    text = "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nDone.<end_of_turn>\n<eos>"
    assert parse_chat(text)[0][-1] == {"role": "assistant", "content": "Done."}


# --- plain text ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "",
    "What is 2 + 2?",
    "  leading and trailing whitespace is kept \n\n",
    "Explain what <|im_start|> and [INST] mean.",  # markup in the middle is not a template
    " <|im_start|>user\nhi<|im_end|>\n",  # does not start with the template
    "<s>strike this</s> please",
    "<|tool|>not a Phi-3 role tag",
    "USER: hi\nASSISTANT:",
])
def test_plain_text_is_one_unchanged_user_turn(text):
    assert detect_chat_format(text) == "plain"
    assert parse_chat(text) == ([{"role": "user", "content": text}], "plain")


# --- detection ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, name", [
    ("<|user|>\nhi</s>\n<|assistant|>\n", "zephyr"),
    ("<|user|>\nhi<|end|>\n<|assistant|>\n", "phi3"),
    ("<s><|system|>\nS</s>\n<|user|>\nhi</s>\n", "zephyr"),
    # The first message quotes the other family's end marker.
    ("<|user|>\nWhat does <|end|> do?</s>\n<|assistant|>\n", "zephyr"),
    ("<|user|>\nStrike <s>this</s> out.<|end|>\n<|assistant|>\n", "phi3"),
    ("<|system|>\nQuote: <|end|>\nok</s>\n<|user|>\nhi</s>\n", "zephyr"),
    # No <<SYS>> block: Llama-2 and Mistral are the same format, reported as "mistral".
    ("<s>[INST] hi [/INST] yo </s><s>[INST] again [/INST]", "mistral"),
    ("<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST]", "llama2"),
    ("<s>[INST] hi, what is <<SYS>>? [/INST]", "mistral"),
    ("<s> [INST] hi [/INST]", "mistral"),
    ("<s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][INST]hi[/INST]", "mistral"),
    ("<|im_start|>user\n[INST] hi [/INST]<|im_end|>\n", "chatml"),
    ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "llama3"),
    ("<bos><start_of_turn>user\nhi<end_of_turn>\n", "gemma"),
])
def test_detect_chat_format(text, name):
    assert detect_chat_format(text) == name
    assert parse_chat(text)[1] == name


def test_llama2_with_and_without_system_parse_the_same_turns():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "again"}]
    without, name = parse_chat(render("llama2", turns, False))
    assert (without, name) == (turns, "mistral")
    with_system, name = parse_chat(render("llama2", [{"role": "system", "content": "S"}, *turns], False))
    assert (with_system, name) == ([{"role": "system", "content": "S"}, *turns], "llama2")


# --- lookalike text -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, lookalike", [
    ("chatml", "Mistral wraps turns as [INST] like this [/INST] and ends with </s>"),
    ("chatml", "<start_of_turn>user\nnot Gemma<end_of_turn>\n<|user|>\nnot Phi-3<|end|>"),
    ("llama3", "<|im_start|>user\nnot ChatML<|im_end|>\n[INST] nor Mistral [/INST]"),
    ("gemma", "<|start_header_id|>user<|end_header_id|> and <|eot_id|> are Llama-3's"),
    ("mistral-v0.2", "<|im_start|>assistant\n and <s> and <<SYS>> are just text here"),
    ("llama2", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"),
    ("phi3", "Zephyr ends turns with </s>, Mistral uses [INST]"),
    ("zephyr", "Phi-3 ends turns with <|end|> and starts with <|user|>"),
])
def test_lookalike_text_is_not_split(template, lookalike):
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": f"sure: {lookalike}"},
                {"role": "user", "content": f"more: {lookalike}"}]
    if template == "llama2":
        messages = [{"role": "system", "content": f"sys: {lookalike}"}, *messages]
    parsed, _ = parse_chat(render(template, messages, True))
    assert parsed == messages


# --- malformed input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ("<|im_start|>tool\n{\"x\": 1}<|im_end|>\n", r"ChatML role 'tool' .*not supported"),
    ("<|im_start|>user\nhi", r"ChatML 'user' turn at offset 0 is not closed by '<\|im_end\|>'"),
    ("<|im_start|>user", r"ChatML turn header at offset 0 is malformed or not closed"),
    ("<|im_start|>user hi<|im_end|>", r"ChatML turn header at offset 0 is malformed or not closed"),
    ("<|im_start|>user\nhi<|im_start|>assistant\nyo<|im_end|>\n",
     r"not closed by '<\|im_end\|>' before '<\|im_start\|>'"),
    ("<|im_start|>user\nhi<|im_end|>\nstray<|im_start|>assistant\n", r"unexpected text 'stray"),
    ("<|im_start|>user\nhi<|im_end|>\n\n<|im_start|>assistant\n", r"unexpected text '\\n<\|im_start\|>"),
    ("<|im_start|>assistant\n", r"holds no message"),
    ("<|begin_of_text|><|start_header_id|>user\n\nhi<|eot_id|>", r"Llama-3 turn header at offset 17 is malformed"),
    ("<|start_header_id|>ipython<|end_header_id|>\n\n{}<|eot_id|>", r"Llama-3 role 'ipython' .*not supported"),
    ("<|start_header_id|>user<|end_header_id|>\n\nhi<|start_header_id|>assistant<|end_header_id|>\n\n",
     r"not closed by '<\|eot_id\|>' before '<\|start_header_id\|>'"),
    ("<s>[INST] hi", r"\[INST\] at offset 3 is never closed"),
    ("<s>[INST] hi [INST] there [/INST]", r"\[INST\] at offset 13 opens a turn before \[/INST\] closed"),
    ("<s>[INST] a [/INST] b</s>[/INST]", r"\[/INST\] at offset 25 has no \[INST\] before it"),
    ("<s>[INST] a [/INST] b[INST] c [/INST]", r"assistant reply at offset 19 is not closed by '</s>'"),
    ("<s>[INST] a [/INST] b</s>junk[INST] c [/INST]", r"unexpected text 'junk.* after '</s>'"),
    ("<s>[INST] a [/INST] b</s> trailing", r"unexpected text ' trailing' after '</s>'"),
    ("<s>[SYSTEM_PROMPT]S[/INST]", r"\[/INST\] at offset 19 cannot close the \[SYSTEM_PROMPT\]"),
    ("<s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT] [INST]hi[/INST]", r"unexpected text ' \[INST\]"),
    ("<s>[INST] <<SYS>>\nS\n[/INST]", r"<<SYS>> block .* is not closed"),
    ("<bos><start_of_turn>assistant\nhi<end_of_turn>\n", r"Gemma role 'assistant' .*expected one of user, model"),
    ("<bos><start_of_turn>user\nhi", r"Gemma 'user' turn at offset 5 is not closed by '<end_of_turn>'"),
    ("<|user|>\nhi</s>\n<|bot|>\nyo</s>\n", r"Zephyr role 'bot'"),
    ("<|user|>\nhi\n<|assistant|>\nyo</s>\n", r"Zephyr 'user' turn .* not closed by '</s>' before '\\n<\|assistant\|>"),
    ("<|user|>\nhi<|end|>\n<|tool|>\n[]<|end|>\n", r"Phi-3 role 'tool'"),
    ("<|user|>\nhi<|assistant|>\nyo<|end|>\n", r"Phi-3 'user' turn .* before '<\|assistant\|>'"),
    ("<|user|>\nhi<|end|>\n<|endoftext|><|user|>\nagain<|end|>\n", r"goes on after the end-of-text token at offset 19"),
])
def test_malformed_raises_naming_where(text, problem):
    with pytest.raises(ValueError, match=r"(?s)^prompts\[3\]: .*" + problem):
        parse_chat(text, where="prompts[3]")


def test_non_string_raises():
    with pytest.raises(ValueError, match=r"^prompts\[0\]: expected a string, got list"):
        parse_chat([{"role": "user", "content": "hi"}], where="prompts[0]")  # type: ignore[arg-type]


# --- nothing is dropped -------------------------------------------------------------------------------------------

# Everything each format may treat as markup; what is left once it and whitespace are removed is message text.
MARKUP = {
    "chatml": re.compile(r"<\|im_start\|>(?:system|user|assistant)|<\|im_end\|>|<\|im_sep\|>|<\|endoftext\|>"
                         r"|<\|startoftext\|>|<s>|</?think>"),
    "llama3": re.compile(r"<\|start_header_id\|>(?:system|user|assistant)<\|end_header_id\|>|<\|eot_id\|>"
                         r"|<\|begin_of_text\|>|<\|end_of_text\|>"
                         # Llama-3.1's own system preamble is template text too
                         r"|(?:Environment: ipython\n)?Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*\n\n"),
    "mistral": re.compile(r"</?s>|\[/?INST\]|\[/?SYSTEM_PROMPT\]|<</?SYS>>"),
    "gemma": re.compile(r"<start_of_turn>(?:user|model)|<end_of_turn>|<bos>|<eos>"),
    "zephyr": re.compile(r"<\|(?:system|user|assistant)\|>|</?s>"),
    "phi3": re.compile(r"<\|(?:system|user|assistant)\|>|<\|end\|>|<\|endoftext\|>|<s>"),
    "plain": re.compile(r"(?!)"),
}
MARKUP["llama2"] = MARKUP["mistral"]
_WHITESPACE = re.compile(r"\s+")


def _visible(text: str, fmt: str) -> str:
    return _WHITESPACE.sub("", MARKUP[fmt].sub("", text))


def assert_nothing_dropped(text: str, messages: Messages, fmt: str) -> None:
    """Every content is a slice of ``text``, in order, and together they hold all of its non-markup text."""
    assert all(m["role"] in ("system", "user", "assistant") for m in messages)
    cursor = 0
    for m in messages:
        found = text.find(m["content"], cursor)
        assert found >= 0, (text, m)
        cursor = found + len(m["content"])
    assert _visible(text, fmt) == _visible("".join(m["content"] for m in messages), fmt), (text, messages)


# Random texts are built turn by turn: each slot holds the template's own markup first, then variants of it that
# are loose, out of order or wrong; message bodies mix plain text with markup of every family.
_TEXT_PIECES = ["hello", " ", "  ", "\n", "\n\n", "x < y > z", "ünï ✓", "{}", "<b>", "[1]"] * 2 + [
    "[INST]", "[/INST]", "<s>", "</s>", "<|end|>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>",
    "<|eot_id|>", "<|user|>", "<<SYS>>\n", "\n<</SYS>>\n\n", "<think>\n\n</think>\n\n", "<|endoftext|>"]
_FUZZ = {
    "chatml": {
        "start": ["", "<s>", "<|endoftext|>", " "],
        "open": ["<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>system\n", "<|im_start|>user<|im_sep|>",
                 "<|im_start|>tool\n", "<|im_start|>user", "<|im_end|>"],
        "close": ["<|im_end|>\n", "<|im_end|>", "", "<|im_end|>\n\n", "<|im_start|>"],
        "end": ["", "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|endoftext|>",
                "<|im_start|>assistant"],
    },
    "llama3": {
        "start": ["<|begin_of_text|>", "", "<|begin_of_text|><|begin_of_text|>"],
        "open": ["<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 "<|start_header_id|>system<|end_header_id|>\n\n", "<|start_header_id|>user<|end_header_id|>",
                 "<|start_header_id|>tool<|end_header_id|>\n\n", "<|start_header_id|>user\n\n", "<|end_header_id|>"],
        "close": ["<|eot_id|>", "", "<|eot_id|>\n", "<|start_header_id|>"],
        "end": ["", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|end_of_text|>",
                "<|start_header_id|>assistant"],
    },
    "mistral": {
        "start": ["<s>", "", "<s> ", "<s><s>"],
        "open": ["[INST] ", "[INST]", " [INST] ", "[SYSTEM_PROMPT]", "[INST] <<SYS>>\nS\n<</SYS>>\n\n",
                 "[INST] <<SYS>>\n", "[/INST]"],
        "close": [" [/INST] reply</s>", "[/INST]", " [/INST]", "[/INST]reply</s> ", " [/INST] reply </s><s>",
                  "[/SYSTEM_PROMPT]", "", "</s>", " [/INST] reply"],
        "end": ["", " ", "</s>", "reply", "[INST]"],
    },
    "gemma": {
        "start": ["<bos>", "", "<bos><bos>"],
        "open": ["<start_of_turn>user\n", "<start_of_turn>model\n", "<start_of_turn>system\n",
                 "<start_of_turn>assistant\n", "<start_of_turn>user", "<end_of_turn>"],
        "close": ["<end_of_turn>\n", "<end_of_turn>", "", "<start_of_turn>"],
        "end": ["", "<start_of_turn>model\n", "<eos>", "<start_of_turn>model"],
    },
    "zephyr": {
        "start": ["", "<s>", "\n"],
        "open": ["<|user|>\n", "<|assistant|>\n", "<|system|>\n", "<|user|>", "<|bot|>\n", "</s>"],
        "close": ["</s>\n", "</s>", "", "\n<|assistant|>\n", "<|end|>\n"],
        "end": ["", "<|assistant|>\n", "<|assistant|>", "</s>"],
    },
    "phi3": {
        "start": ["", "<s>", "<|endoftext|>"],
        "open": ["<|user|>\n", "<|assistant|>\n", "<|system|>\n", "<|user|>", "<|tool|>\n", "<|end|>"],
        "close": ["<|end|>\n", "<|end|>", "", "<|user|>", "</s>\n"],
        "end": ["", "<|assistant|>\n", "<|endoftext|>", "<|assistant|>", "<|end|>"],
    },
}


def _random_text(rng: random.Random, slots: dict[str, list[str]]) -> str:
    def pick(options: list[str]) -> str:
        return options[0] if rng.random() < 0.7 else rng.choice(options)

    turns = []
    for _ in range(rng.randint(1, 4)):
        body = "".join(rng.choice(_TEXT_PIECES) for _ in range(rng.randint(0, 3)))
        turns.append(pick(slots["open"]) + body + pick(slots["close"]))
    return pick(slots["start"]) + "".join(turns) + pick(slots["end"])


@pytest.mark.parametrize("family", sorted(_FUZZ))
def test_random_texts_parse_without_loss_or_raise(family):
    rng = random.Random(f"chat-parsing-{family}")
    parsed_count = 0
    for i in range(500):
        text = _random_text(rng, _FUZZ[family])
        try:
            messages, fmt = parse_chat(text, where=f"texts[{i}]")
        except ValueError as err:
            assert str(err).startswith(f"texts[{i}]: ")
            continue
        parsed_count += 1
        assert fmt == detect_chat_format(text)
        assert messages
        assert_nothing_dropped(text, messages, fmt)
    assert parsed_count >= 100, parsed_count  # the property was checked on a real sample, not vacuously


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_random_conversations_parse_without_loss(template):
    rng = random.Random(f"chat-parsing-{template}")
    for _ in range(30):
        messages = [{"role": "user" if k % 2 == 0 else "assistant",
                     "content": "".join(rng.choice(["word", " ", "\n", "ünï", "<x>", "[y]", "{z}"])
                                        for _ in range(rng.randint(1, 8))).strip() or "w"}
                    for k in range(rng.choice([1, 3, 5]))]
        text = render(template, messages, rng.random() < 0.5)
        parsed, fmt = parse_chat(text)
        assert_nothing_dropped(text, parsed, fmt)
        assert [m["role"] for m in parsed if m["role"] != "system"] == [m["role"] for m in messages]


# --- strip_completion ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, completion, expected", [
    ("chatml", "The answer is 4.<|im_end|>", "The answer is 4."),
    ("chatml", "The answer is 4.<|im_end|><|endoftext|>", "The answer is 4."),
    ("chatml", "The answer is 4.<|im_end|>\n", "The answer is 4.<|im_end|>\n"),  # whitespace is not a marker
    ("chatml", "Use <|im_end|> to end a turn.", "Use <|im_end|> to end a turn."),
    ("llama3", "4<|eot_id|>", "4"),
    ("llama3", "4<|end_of_text|>", "4"),
    ("mistral", "4 </s>", "4 "),
    ("llama2", "4</s>", "4"),
    ("gemma", "4<end_of_turn>", "4"),
    ("gemma", "4<end_of_turn><eos>", "4"),
    ("zephyr", "4</s>", "4"),
    ("phi3", "4<|end|>", "4"),
    ("phi3", "4<|endoftext|>", "4"),
    ("phi3", "4</s>", "4</s>"),
    ("plain", "4</s>", "4</s>"),
    ("chatml", "  4  ", "  4  "),
])
def test_strip_completion(fmt, completion, expected):
    assert strip_completion(completion, fmt) == expected


def test_strip_completion_unknown_format():
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        strip_completion("hi", "vicuna")


# --- speed --------------------------------------------------------------------------------------------------------

LONG_CONVERSATIONS = r"""
from rlhf_rewards.chat_parsing import parse_chat

turns = 500_000
chatml = "".join(f"<|im_start|>{'user' if k % 2 == 0 else 'assistant'}\nmessage {k}<|im_end|>\n"
                 for k in range(turns)) + "<|im_start|>assistant\n"
mistral = ("<s>" + "".join(f"[INST] question {k} [/INST] answer {k}</s>" for k in range(turns // 2))
           + "[INST] q [/INST]")
messages, _ = parse_chat(chatml)
assert len(messages) == turns and messages[-1] == {"role": "assistant", "content": f"message {turns - 1}"}
messages, _ = parse_chat(mistral)
assert len(messages) == turns + 1 and messages[-1] == {"role": "user", "content": "q"}
"""


def test_long_conversations_parse_in_linear_time():
    """500,000 turns (22 MB of ChatML, 12 MB of Mistral): linear parsing takes a few seconds; quadratic work, even
    only copying the rest of the text once per turn, copies 5 TB (minutes at memory speed, far beyond the bound of
    120 s). In a subprocess, so a regression fails instead of hanging the suite."""
    done = subprocess.run([sys.executable, "-c", LONG_CONVERSATIONS], env={"PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
