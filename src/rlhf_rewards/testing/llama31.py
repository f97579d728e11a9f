"""Llama-3.1 and Llama-3.2 tokenizers for tiny test checkpoints: Meta's Llama-3 vocabulary (``llama-models``) with
the special tokens and chat templates of Meta's Llama-3.1-8B-Instruct and Llama-3.2-1B/3B-Instruct repositories.

The two templates differ in what matters for scoring only in the date they write into the system header: 3.1's
defaults to the fixed "26 Jul 2024"; 3.2's asks the renderer for today's date (transformers' ``strftime_now``) and
falls back to "26 Jul 2024" where there is none (see :mod:`rlhf_rewards.rendering` for how scoring pins that date).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from .tokenizers import write_llama3_tokenizer

# Llama-3.1 named five more of the 256 special ids; the rest stay <|reserved_special_token_K|>, numbered in id order.
_LLAMA31_NAMED_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}

# The chat templates as the Meta repositories publish them (tool-calling branches included, so a conversation with
# any roles renders as there). Data, reproduced exactly: whitespace and all.
_LLAMA3X_HEAD = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
"""
_LLAMA31_DATE = r"""{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
"""
_LLAMA32_DATE = r"""{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
"""
_LLAMA3X_SYSTEM_START = r"""{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

"""
_LLAMA31_SYSTEM_HEADER = r"""{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
"""
_LLAMA32_SYSTEM_HEADER = r"""{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
"""
_LLAMA3X_SYSTEM_BODY = r"""{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
"""
_LLAMA31_TOOL_CALL = r"""        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
"""
_LLAMA32_TOOL_CALL = r"""        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
"""
_LLAMA3X_TAIL = r"""    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

LLAMA31_CHAT_TEMPLATE = (_LLAMA3X_HEAD + _LLAMA31_DATE + _LLAMA3X_SYSTEM_START + _LLAMA31_SYSTEM_HEADER
                         + _LLAMA3X_SYSTEM_BODY + _LLAMA31_TOOL_CALL + _LLAMA3X_TAIL).rstrip("\n")
"""Meta-Llama-3.1-8B-Instruct's chat template: system header with "Cutting Knowledge Date: December 2023" and
"Today Date: 26 Jul 2024" unless the caller passes ``date_string``; content trimmed; BOS written by the template."""

LLAMA32_CHAT_TEMPLATE = (_LLAMA3X_HEAD + _LLAMA32_DATE + _LLAMA3X_SYSTEM_START + _LLAMA32_SYSTEM_HEADER
                         + _LLAMA3X_SYSTEM_BODY + _LLAMA32_TOOL_CALL + _LLAMA3X_TAIL).rstrip("\n")
"""Llama-3.2-1B/3B-Instruct's chat template: as 3.1's, but "Today Date" is the renderer's current date
(``strftime_now("%d %b %Y")``) unless the caller passes ``date_string``."""


def llama31_special_tokens() -> list[str]:
    """Llama-3.1's (and 3.2's text models') 256 special tokens in id order (ids 128000 to 128255)."""
    reserved = iter(range(256))
    return [_LLAMA31_NAMED_SPECIALS.get(i) or f"<|reserved_special_token_{next(reserved)}|>"
            for i in range(128000, 128256)]


def write_llama31_tokenizer(path: str, *, version: str = "3.1") -> PreTrainedTokenizerFast:
    """Write Meta's Llama-3.1 (``version="3.1"``) or Llama-3.2 (``"3.2"``) instruct tokenizer files into ``path``:
    the Llama-3 vocabulary, the 3.1 special tokens, BOS added by the tokenizer, EOS ``<|eot_id|>``, no pad token,
    and that release's chat template; return the tokenizer."""
    templates = {"3.1": LLAMA31_CHAT_TEMPLATE, "3.2": LLAMA32_CHAT_TEMPLATE}
    if version not in templates:
        raise ValueError(f"version must be one of {', '.join(templates)}, got {version!r}")
    return write_llama3_tokenizer(path, special_tokens=llama31_special_tokens(), chat_template=templates[version])
