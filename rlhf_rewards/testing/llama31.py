"""Llama-3.1's tokenizer files for tiny checkpoints of models built on Llama-3.1/3.3-Instruct (INF-ORM, Nemotron).

The vocabulary is Meta's Llama-3 ``tokenizer.model`` (``llama-models``), as for Llama-3.0; Llama-3.1 renamed some of
the 256 special tokens and changed the chat template, both written here.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from .tokenizers import write_llama3_tokenizer

# Llama-3.1's named special tokens (ids 128000 up); the others are <|reserved_special_token_K|>, numbered in id order.
_NAMED = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}

# Llama-3.1-Instruct's chat template for conversations of system, user and assistant turns: BOS, a system header
# that always carries the knowledge-cutoff and date lines (then the system message's content, trimmed, if the
# conversation starts with one), every other turn as header + trimmed content + <|eot_id|>. Meta's template also
# renders tool definitions and tool calls; reward models are never given tools, and for conversations without them
# this renders the same text.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] in ('ipython', 'tool') or 'tool_calls' in message %}"
    "{{- raise_exception('tool turns are not part of this template') }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def llama31_special_tokens() -> list[str]:
    """Llama-3.1's 256 special tokens in id order (ids 128000 to 128255)."""
    reserved = iter(range(256))
    return [_NAMED.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(128000, 128256)]


def write_llama31_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Llama-3.1-Instruct's tokenizer files (Meta's vocabulary, Llama-3.1's special tokens and chat template, EOS
    ``<|eot_id|>``, no pad token), written into ``path`` and returned."""
    return write_llama3_tokenizer(path, special_tokens=llama31_special_tokens(), chat_template=LLAMA31_CHAT_TEMPLATE)
