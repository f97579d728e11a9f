"""The first citizens' presets: the four seed model cards (Ray2333's Mistral-7B RM, Starling-RM-34B, RLHFlow's
pair-PM, PairRM), Starling-RM-34B's 7B sibling, and any sequence classifier."""

from __future__ import annotations

from .base import GoldenIds, Preset, register

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

register(Preset(
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

register(Preset(
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

register(Preset(
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

register(Preset(
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

register(Preset(
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

register(Preset(
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
