"""What each supported reward model needs, as data: one :class:`Preset` per model card.

A preset says which backend runs the model, which text format renders a conversation for it, where its tokenizer
comes from, how its card tokenizes, truncates and pads, which position its card reads the reward from, and token ids
that its real tokenizer must produce. A backend runs a family of architectures (a sequence classifier, a backbone with
a value head, a causal LM comparing two responses, PairRM's encoder) and reads what differs between models of that
family from the preset: a model of a known family needs only a preset here (and, if its text format is new, a
renderer in :mod:`rlhf_rewards.rendering`); a new family needs a backend implementing the per-sample protocol of
:mod:`rlhf_rewards.backends.base`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from .sources import check_local, read_json_file

Kind = Literal["scalar", "pairwise"]


@dataclass(frozen=True)
class GoldenIds:
    """Token ids the real model's tokenizer gives for ``text``; checked at load to catch tokenizer drift.

    Only checked when the loaded tokenizer's vocabulary has ``vocab_size`` entries (``len(tokenizer)``), so the
    small tokenizers of tiny test checkpoints, trained at build time, are not held to the real vocabulary.
    """

    text: str
    ids: tuple[int, ...]
    vocab_size: int
    add_special_tokens: bool = False


@dataclass(frozen=True)
class Preset:
    """Everything model-specific about one reward model.

    Attributes:
        name: the preset's name, e.g. ``"starling-rm-34b"``.
        kind: ``"scalar"`` (a score per completion) or ``"pairwise"`` (a preference between two completions).
        hub_ids: hub repositories this preset is chosen for automatically.
        backend: which model backend runs it (see :mod:`rlhf_rewards.backends`).
        text_format: which renderer in :mod:`rlhf_rewards.rendering` builds the model's input text.
        tokenizer_source: where the tokenizer comes from when the model directory has none (the card's choice).
        add_special_tokens: whether the card's code lets the tokenizer add BOS/EOS when tokenizing the text.
        max_length: the card's token limit per input (``None``: the model's position limit).
        truncation_side: which end over-long inputs lose tokens from; ``"left"`` keeps the scored end.
        reward_position: which position's output is the reward:
            ``"last-non-pad"``: the rightmost token whose id is not the config's ``pad_token_id`` (transformers'
            sequence-classification pooling); ``"before-first-pad-id"``: one before the first occurrence of
            ``card_pad_id`` in the sequence padded to ``max_length``, wrapping to the last padded position when
            that occurrence is the first token (the Starling cards' loop).
        card_pad_id: for ``"before-first-pad-id"``: an id, or ``"first-id-of-pad-token"`` for cards that compute
            ``tokenizer(tokenizer.pad_token)["input_ids"][0]`` (which is BOS when the tokenizer adds one).
        pad_token: the token to pad with when the tokenizer has none (cards that set ``pad_token = unk_token``).
        accelerator_dtype: the card's dtype on GPU; on CPU models run in float32 unless ``dtype`` is given.
        config_architectures: ``config.json`` architectures that identify this preset for a local directory.
        config_model_types: ``config.json`` ``model_type`` values (prefixes) this preset can load; a directory of
            another type is refused before loading, naming both (empty: any).
        golden_ids: token ids the real tokenizer must give (see :class:`GoldenIds`).
        single_tokens: strings the template relies on that must each be one token in any tokenizer used.
        sentencepiece_truth: the model was trained with a sentencepiece tokenizer run on each stretch of text
            between special tokens (transformers 4's legacy Llama-family tokenizers); a tokenizer that comes with
            its ``tokenizer.model`` is compared with sentencepiece at load (see :mod:`rlhf_rewards.tokenization`).
        fallback_chat_template: for ``"chat-template"`` formats, the template to use when the tokenizer has none.
        doc: one line for ``list_presets``.
    """

    name: str
    kind: Kind
    hub_ids: tuple[str, ...]
    backend: str
    text_format: str
    tokenizer_source: Optional[str] = None
    add_special_tokens: bool = True
    max_length: Optional[int] = None
    truncation_side: Literal["left", "right"] = "left"
    reward_position: Literal["last-non-pad", "before-first-pad-id", "last"] = "last-non-pad"
    card_pad_id: Union[int, Literal["first-id-of-pad-token"], None] = None
    pad_token: Optional[str] = None
    accelerator_dtype: str = "bfloat16"
    config_architectures: tuple[str, ...] = ()
    config_model_types: tuple[str, ...] = ()
    golden_ids: tuple[GoldenIds, ...] = ()
    single_tokens: tuple[str, ...] = ()
    sentencepiece_truth: bool = False
    fallback_chat_template: Optional[str] = None
    doc: str = ""
    extra: dict = field(default_factory=dict)


# Mistral-7B-Instruct-v0.2's chat template as published with the model in early 2024, used only when a Ray2333
# checkpoint ships without one (the card renders with the tokenizer's own template).
MISTRAL_V02_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

_MISTRAL_VOCAB = 32000
_LLAMA2_VOCAB = 32000
_LLAMA3_VOCAB = 128256

PRESETS: dict[str, Preset] = {}


def _register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


_register(Preset(
    name="ray2333-mistral-7b",
    kind="scalar",
    hub_ids=("Ray2333/reward-model-Mistral-7B-instruct-Unified-Feedback",),
    backend="sequence-classification",
    text_format="chat-template",
    add_special_tokens=True,  # the card tokenizes the templated text (which starts with "<s>") with BOS added again
    max_length=32768,
    reward_position="last-non-pad",
    accelerator_dtype="float16",
    config_architectures=("MistralForSequenceClassification",),
    config_model_types=("mistral",),
    # Verified with Mistral-7B's real tokenizer.model (mistral-common's tokenizer.model.v1) run by sentencepiece on
    # each stretch between special tokens, as transformers 4 tokenized for training; for Mistral's vocabulary (32000)
    # and Ray2333's (32001, [PAD] added).
    golden_ids=tuple(
        GoldenIds(text, ids, vocab_size, add_special_tokens)
        for vocab_size in (_MISTRAL_VOCAB, _MISTRAL_VOCAB + 1)
        for text, ids, add_special_tokens in (
            ("[INST]", (733, 16289, 28793), False),
            # The card's templated text starts with "<s>" and gets BOS added again; "[INST]" right after a special
            # token keeps its "▁[" (733), which transformers 5's non-legacy loading drops.
            ("<s>[INST] Hello [/INST]Hi</s>[INST] Again [/INST]",
             (1, 1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793, 23809, 2, 733, 16289, 28793, 9706, 733,
              28748, 16289, 28793), True),
            # A leading space (its own "▁"), a newline (byte fallback), runs of spaces, digits one by one.
            (" Hello\n    world  123", (28705, 22557, 13, 2287, 1526, 259, 28740, 28750, 28770), False),
        )
    ),
    single_tokens=("<s>", "</s>"),
    sentencepiece_truth=True,
    fallback_chat_template=MISTRAL_V02_CHAT_TEMPLATE,
    doc="Ray2333's Mistral-7B-Instruct-v0.2 sequence classifier; Mistral [INST] chat template, BOS twice.",
))

_register(Preset(
    name="starling-rm-34b",
    kind="scalar",
    hub_ids=("Nexusflow/Starling-RM-34B",),
    backend="value-head",
    text_format="yi-chatml",
    tokenizer_source="01-ai/Yi-34B-Chat",
    add_special_tokens=True,
    max_length=2048,
    reward_position="before-first-pad-id",
    card_pad_id=0,
    config_model_types=("llama",),
    pad_token="<unk>",
    accelerator_dtype="bfloat16",
    # Yi-34B-Chat's ids; not checkable offline here (no package ships Yi's tokenizer).
    golden_ids=(
        GoldenIds("<|im_start|>", (6,), 64000),
        GoldenIds("<|im_end|>", (7,), 64000),
        GoldenIds("<unk>", (0,), 64000),  # the pad token, whose id the card hard-codes as PAD_ID = 0
    ),
    single_tokens=("<|im_start|>", "<|im_end|>", "<unk>"),
    sentencepiece_truth=True,  # Yi-34B-Chat ships tokenizer.model (Yi's sentencepiece BPE)
    doc="Starling-RM-34B: Yi-34B-Chat backbone + linear value head; Yi ChatML; reward before the first id 0.",
))

_register(Preset(
    name="starling-rm-7b-alpha",
    kind="scalar",
    hub_ids=("berkeley-nest/Starling-RM-7B-alpha",),
    backend="value-head",
    text_format="starling-llama2",
    tokenizer_source="meta-llama/Llama-2-7b-chat-hf",
    add_special_tokens=True,
    max_length=2048,
    reward_position="before-first-pad-id",
    card_pad_id="first-id-of-pad-token",
    config_model_types=("llama",),
    pad_token="<unk>",
    accelerator_dtype="bfloat16",
    # Llama-2's ids as published tokenizations of Llama-2-7b-chat-hf show them (several independent sources agree);
    # not checkable offline here (no package ships Llama-2's tokenizer).
    golden_ids=(
        GoldenIds("[INST]", (518, 25580, 29962), _LLAMA2_VOCAB),
        # "[INST]" right after "<s>" keeps its "▁[" (518), which transformers 5's non-legacy loading drops.
        GoldenIds("<s>[INST] hello [/INST]", (1, 518, 25580, 29962, 22172, 518, 29914, 25580, 29962), _LLAMA2_VOCAB),
        GoldenIds("<unk>", (1, 0), _LLAMA2_VOCAB, add_special_tokens=True),
    ),
    single_tokens=("<s>", "</s>", "<unk>"),
    sentencepiece_truth=True,
    doc="Llama-2-7b-chat backbone + linear value head (Starling-RM-7B-alpha); reward at the card's position.",
))

_register(Preset(
    name="sequence-classifier",
    kind="scalar",
    hub_ids=(),
    backend="sequence-classification",
    text_format="chat-template",
    add_special_tokens=False,  # chat templates write their own BOS; adding another would double it
    max_length=None,
    reward_position="last-non-pad",
    accelerator_dtype="bfloat16",
    doc="Any AutoModelForSequenceClassification reward model (num_labels=1), its own tokenizer's chat template.",
))

_register(Preset(
    name="rlhflow-pair-pm-llama3-8b",
    kind="pairwise",
    hub_ids=("RLHFlow/pair-preference-model-LLaMA3-8B",),
    backend="causal-lm-pair",
    text_format="rlhflow-pair",
    add_special_tokens=False,  # the card strips the BOS string and encodes with add_special_tokens=False
    max_length=8192,
    reward_position="last",
    accelerator_dtype="bfloat16",
    config_model_types=("llama",),
    # Verified against tiktoken over Meta's Llama-3 tokenizer.model (shipped in llama-models).
    golden_ids=(
        GoldenIds("A", (32,), _LLAMA3_VOCAB),
        GoldenIds("B", (33,), _LLAMA3_VOCAB),
        GoldenIds("<|start_header_id|>user<|end_header_id|>\n\n[CONTEXT] hi [RESPONSE A] a [RESPONSE B] b<|eot_id|>",
                  (128006, 882, 128007, 271, 58, 99465, 60, 15960, 510, 68883, 26289, 362, 60, 264, 510, 68883, 26289,
                   426, 60, 293, 128009), _LLAMA3_VOCAB),
        # A word that is one vocabulary entry: Meta's tokenizer takes it whole ("ignore_merges"); merging pair by
        # pair, as a tokenizer.json with "ignore_merges": false does, gives three tokens.
        GoldenIds(" milyon", (107667,), _LLAMA3_VOCAB),
    ),
    single_tokens=("A", "B"),
    doc="RLHFlow's Llama-3-8B pairwise preference model: P(A better) from the 'A'/'B' logits, both orders.",
))

_register(Preset(
    name="pairrm",
    kind="pairwise",
    hub_ids=("llm-blender/PairRM", "llm-blender/PairRM-hf"),
    backend="pairrm",
    text_format="pairrm",
    add_special_tokens=False,
    max_length=2048,
    accelerator_dtype="float16",
    config_model_types=("deberta",),  # "deberta-v2", or llm-blender's own config's "deberta"
    doc="PairRM: DeBERTa-v3-large pairwise ranker, native implementation without llm-blender.",
))


def list_presets() -> dict[str, str]:
    """Return ``{preset name: one-line description}`` for every known preset."""
    return {name: p.doc for name, p in PRESETS.items()}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` (case-insensitive); raise ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"preset must be a preset name or a Preset, got {type(name).__name__}")
    for key, preset in PRESETS.items():
        if key.lower() == name.strip().lower():
            return preset
    hub = preset_for_hub_id(name)
    hint = f" ({name!r} is the hub id of preset {hub.name!r})" if hub else ""
    raise ValueError(f"unknown preset {name!r}{hint}; known presets: {', '.join(PRESETS)}")


def preset_for_hub_id(repo_id: str) -> Optional[Preset]:
    """The preset registered for hub id ``repo_id``, compared case-insensitively as the hub compares ids."""
    wanted = repo_id.strip().lower()
    return next((p for p in PRESETS.values() for h in p.hub_ids if h.lower() == wanted), None)


def canonical_hub_id(repo_id: str) -> str:
    """``repo_id`` spelled as a preset registers it (``nexusflow/starling-rm-34b`` -> ``Nexusflow/Starling-RM-34B``),
    so the local cache, whose folder names keep the case, finds it; other ids are returned unchanged."""
    preset = preset_for_hub_id(repo_id)
    if preset is None:
        return repo_id
    return next(h for h in preset.hub_ids if h.lower() == repo_id.strip().lower())


def _read_config(name_or_path: str) -> Optional[dict]:
    config_path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(config_path):
        return None
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config).__name__}, not an object of config fields")
    return config


def preset_for_directory(name_or_path: str) -> Optional[Preset]:
    """The preset a local directory's ``config.json`` names (``rlhf_rewards_preset``) or its architecture identifies
    (only when exactly one preset claims it); ``None`` otherwise."""
    config = _read_config(name_or_path)
    if config is None:
        return None
    hint = config.get("rlhf_rewards_preset")
    if hint:
        return get_preset(hint)
    archs = set(config.get("architectures") or ())
    matches = [p for p in PRESETS.values() if archs & set(p.config_architectures)]
    return matches[0] if len(matches) == 1 else None


def check_directory_matches(name_or_path: str, preset: Preset) -> None:
    """Refuse a local directory whose ``config.json`` holds a model type the preset cannot load, naming both and
    the preset the directory itself points to, if any."""
    config = _read_config(name_or_path)
    if config is None or not preset.config_model_types:
        return
    model_type = str(config.get("model_type", ""))
    if any(model_type.startswith(t) for t in preset.config_model_types):
        return
    archs = ", ".join(config.get("architectures") or ()) or "no architectures listed"
    found = preset_for_directory(name_or_path)
    hint = f"; this directory looks like preset {found.name!r}" if found is not None else ""
    raise ValueError(f"{name_or_path!r} holds a {model_type or 'untyped'!r} model ({archs}); preset {preset.name!r} "
                     f"loads {' / '.join(repr(t) for t in preset.config_model_types)} models{hint}")


def resolve_preset(name_or_path: str, preset: Union[str, Preset, None]) -> Preset:
    """Pick the preset for ``name_or_path``: the one given, the one registered for a hub id (case-insensitive), or
    one inferred from a local directory's ``config.json`` (only when exactly one preset claims its architecture)."""
    if isinstance(preset, Preset):
        return preset
    if preset is not None:
        return get_preset(preset)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model: expected a local directory or a hub id (a str or os.PathLike), got "
                        f"{type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    found = preset_for_hub_id(name_or_path) or preset_for_directory(os.path.expanduser(name_or_path))
    if found is not None:
        return found
    directory = check_local(name_or_path, "model")  # a path that cannot hold a model says so rather than this
    if directory is None:
        why = "it is no local directory, and no preset is registered for it as a hub id"
    else:
        config = _read_config(directory)
        why = ("its directory has no config.json" if config is None else
               f"its config.json names {', '.join(config.get('architectures') or ()) or 'no architectures'} "
               f"(model type {config.get('model_type')!r}), which no single preset claims")
    raise ValueError(f"cannot tell which preset {name_or_path!r} needs: {why}; pass preset=... "
                     f"(command line: --preset NAME), one of {', '.join(PRESETS)}")
