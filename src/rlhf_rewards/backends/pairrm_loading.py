"""Loading PairRM in either published layout: its tokenizer as llm-blender had it under transformers 4,
its config and weights, and the :class:`~rlhf_rewards.backends.pairrm.PairRMRewardModel` around them."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
from transformers import DebertaV2Config

from .pairrm import (CANDIDATE_MAX_LENGTH, MARKERS, SOURCE_MAX_LENGTH, DebertaV2PairRM, PairRMRewardModel,
                     normalizes_nfkc, splits_literal_unk_as_trained)
from ..sources import read_json_file
from .weights import apply_adapter, from_pretrained_checked

logger = logging.getLogger(__name__)

BASE_MODEL = "microsoft/deberta-v3-large"
"""The base model llm-blender's own PairRM layout names for its encoder config and tokenizer."""

DEBERTA_SPECIAL_TOKENS = {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "sep_token": "[SEP]",
                          "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
"""DeBERTa-v3's special tokens: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3 in its sentencepiece model; [MASK] added after."""

_HF_FIELDS = ("n_tasks", "drop_out", "source_prefix_id", "cand1_prefix_id", "cand2_prefix_id")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "spm.model")


# -- tokenizer -------------------------------------------------------------------------------------------------------

def _local_dir(name_or_path: str, patterns: Sequence[str]) -> str:
    """``name_or_path`` itself when it is a directory, else the hub snapshot of the files matching ``patterns``
    (from the local cache when offline)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, allow_patterns=list(patterns))
    except Exception as err:  # offline without a cached copy, unknown repository, ...
        raise OSError(f"cannot find {name_or_path!r} locally or on the hub ({err}); pass a local directory") from err


def _read_json(path: str) -> Optional[dict]:
    return read_json_file(path) if os.path.isfile(path) else None


def _ranker_config(directory: str) -> Optional[dict]:
    """llm-blender's ranker config when ``directory`` has llm-blender's own layout, else ``None``."""
    raw = _read_json(os.path.join(directory, "config.json")) or {}
    if "ranker_type" not in raw:
        return None
    if raw["ranker_type"] != "pairranker" or not str(raw.get("model_type", "")).startswith("deberta"):
        raise ValueError(f"{directory}: llm-blender ranker type {raw['ranker_type']!r} / model type "
                         f"{raw.get('model_type')!r} is not PairRM's ('pairranker', 'deberta')")
    return raw


def _base_dir(ranker: dict, patterns: Sequence[str]) -> str:
    """The base model directory of llm-blender's layout (``model_name``, ``microsoft/deberta-v3-large``)."""
    return _local_dir(ranker.get("model_name") or BASE_MODEL, patterns)


def _tokenizer_from_spm(vocab_file: str, do_lower_case: bool, split_by_punct: bool):
    """The fast tokenizer transformers 4 built from DeBERTa-v3's ``spm.model`` (``DebertaV2Converter``): it keeps
    sentencepiece's NFKC normalisation, which transformers 5's ``DebertaV2Tokenizer`` drops."""
    import sentencepiece
    from transformers.convert_slow_tokenizer import DebertaV2Converter

    processor = sentencepiece.SentencePieceProcessor(model_file=vocab_file)

    class _SlowTokenizer:  # what the converter reads from the slow tokenizer
        def __init__(self):
            self.vocab_file = vocab_file
            self.do_lower_case = do_lower_case
            self.split_by_punct = split_by_punct

        @staticmethod
        def convert_tokens_to_ids(token: str) -> int:
            return processor.piece_to_id(token)

    return DebertaV2Converter(_SlowTokenizer()).converted()


def load_pairrm_tokenizer(name_or_path: str):
    """PairRM's tokenizer as llm-blender had it under transformers 4: the fast DeBERTa-v3 tokenizer from the
    repository's ``tokenizer.json`` or converted from its ``spm.model``, plus the four marker tokens added as
    llm-blender's collator adds them (ordinary, normalized added tokens) when the files lack them.

    ``[UNK]`` is made a *normalized* special token whatever the files say: transformers 4's slow
    ``DebertaV2Tokenizer`` registered it so (the other special tokens are not normalized), and the fast tokenizer
    converted from it kept that. A normalized added token is matched after the normalizer ran on the whole text, so
    the space before a literal ``"[UNK]"`` in a text survives the normalizer's strip and becomes its own ``"▁"``
    (``"They are [UNK] to me."``: ``... ▁a re ▁ [UNK] ▁ to ...``), as in the model's training and in llm-blender.

    llm-blender's own layout ships no tokenizer: its ranker config's ``model_name`` (DeBERTa-v3-large) supplies it.
    Never ``AutoTokenizer``: transformers 5 rebuilds DeBERTa's pipeline without sentencepiece's NFKC normalisation.
    """
    from tokenizers import Tokenizer
    from transformers import AddedToken, PreTrainedTokenizerFast

    patterns = ("*.json", "spm.model")
    directory = _local_dir(name_or_path, patterns)
    source = directory
    if not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        ranker = _ranker_config(directory)
        if ranker is None:
            raise OSError(f"{directory}: no tokenizer.json or spm.model")
        source = _base_dir(ranker, patterns)
    settings = _read_json(os.path.join(source, "tokenizer_config.json")) or {}
    if os.path.isfile(os.path.join(source, "tokenizer.json")):
        backend = Tokenizer.from_file(os.path.join(source, "tokenizer.json"))
    elif os.path.isfile(os.path.join(source, "spm.model")):
        backend = _tokenizer_from_spm(os.path.join(source, "spm.model"), bool(settings.get("do_lower_case", False)),
                                      bool(settings.get("split_by_punct", False)))
    else:
        raise OSError(f"{source}: no tokenizer.json or spm.model")
    backend.add_special_tokens([AddedToken(DEBERTA_SPECIAL_TOKENS["unk_token"], normalized=True, special=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=directory, **DEBERTA_SPECIAL_TOKENS)
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([AddedToken(m, normalized=True, special=False) for m in MARKERS if m not in vocab])
    return tokenizer


# -- loading ---------------------------------------------------------------------------------------------------------

def pairrm_config(directory: str, tokenizer: Any) -> DebertaV2Config:
    """The model config of a PairRM directory in either layout.

    -hf layout: ``config.json`` as it is; PairRM's fields must be there. llm-blender's layout: the base model's
    DeBERTa config with the vocabulary resized to the tokenizer (as llm-blender resizes the embeddings), the ranker
    config's ``n_tasks``, ``drop_out``, ``source_maxlength`` and ``candidate_maxlength``, and the markers' ids.
    """
    ranker = _ranker_config(directory)
    if ranker is None:
        config = DebertaV2Config.from_pretrained(directory)
        missing = [name for name in _HF_FIELDS if getattr(config, name, None) is None]
        if missing:
            raise ValueError(f"{directory}/config.json lacks PairRM's fields {', '.join(missing)}")
        return config
    config = DebertaV2Config.from_pretrained(_base_dir(ranker, ("config.json",)))
    config.vocab_size = len(tokenizer)
    config.architectures = ["DebertaV2PairRM"]
    config.n_tasks = ranker.get("n_tasks", 1)
    config.drop_out = ranker.get("drop_out", 0.05)
    config.sep_token_id = tokenizer.sep_token_id
    config.source_prefix_id, config.cand1_prefix_id, config.cand2_prefix_id, config.cand_prefix_id = (
        tokenizer.convert_tokens_to_ids(list(MARKERS)))
    config.source_maxlength = ranker.get("source_maxlength") or SOURCE_MAX_LENGTH
    config.candidate_maxlength = ranker.get("candidate_maxlength") or CANDIDATE_MAX_LENGTH
    return config


def load_pairrm(name_or_path: str, tokenizer: Any, *, device: torch.device, dtype: torch.dtype,
                quantization: Optional[str] = None, attn_implementation: Optional[str] = None) -> DebertaV2PairRM:
    """Load PairRM's weights (either layout, ``model.safetensors`` or ``pytorch_model.bin``) in ``dtype`` on
    ``device``, quantized (``"8bit"`` / ``"4bit"``) if asked, the head left in full precision. A weight missing from
    the checkpoint is an error, never a random initialisation."""
    directory = _local_dir(name_or_path, ("*.json", "spm.model", _WEIGHT_FILES[0]))
    if not any(os.path.isfile(os.path.join(directory, f)) for f in _WEIGHT_FILES):
        # a hub repository with only llm-blender's pytorch_model.bin (safetensors is preferred, not fetched twice)
        directory = _local_dir(name_or_path, ("*.json", "spm.model", _WEIGHT_FILES[1]))
    config = pairrm_config(directory, tokenizer)
    return from_pretrained_checked(DebertaV2PairRM, directory, dtype=dtype, device=device,
                                   quantization=quantization, skip_modules=("head_layer",), config=config,
                                   attn_implementation=attn_implementation)


def _faithful_tokenizer(tokenizer: Any, name_or_path: str) -> Any:
    """``tokenizer`` if it tokenizes as PairRM's does, else PairRM's tokenizer rebuilt from the same files (with a
    logged warning): transformers 5's ``AutoTokenizer`` gives a ``DebertaV2Tokenizer`` without sentencepiece's NFKC
    normalisation (and registers ``[UNK]`` as a non-normalized token). ``None`` or a path:
    :func:`load_pairrm_tokenizer`."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return load_pairrm_tokenizer(str(tokenizer or name_or_path))
    markers_ok = all(len(tokenizer(m, add_special_tokens=False)["input_ids"]) == 1 for m in MARKERS[:3])
    if markers_ok and normalizes_nfkc(tokenizer) and splits_literal_unk_as_trained(tokenizer):
        return tokenizer
    source = getattr(tokenizer, "name_or_path", None) or name_or_path
    logger.warning("The tokenizer of %s lacks PairRM's marker tokens, sentencepiece's NFKC normalisation "
                   "(transformers 5's DebertaV2Tokenizer drops it) or transformers 4's normalized [UNK]; using "
                   "PairRM's tokenizer rebuilt from %s.", name_or_path, source)
    return load_pairrm_tokenizer(source)


def load_pairrm_reward_model(name_or_path: str, *, preset, tokenizer: Any, device: torch.device,
                             dtype: torch.dtype, max_length: Optional[int], max_batch_tokens: Optional[int],
                             quantization: Optional[str], adapter: Optional[str], packing: Any = "auto",
                             attn_implementation: Optional[str] = None) -> PairRMRewardModel:
    """The ``"pairrm"`` backend's loader: PairRM's tokenizer (see :func:`_faithful_tokenizer`), the model
    (:func:`load_pairrm`), an optional PEFT adapter, and the :class:`PairRMRewardModel` around them. PairRM's
    encoder reads marker positions of one padded row per comparison: ``packing=True`` is refused. DeBERTa-v2 has
    one attention, its own disentangled one (transformers' ``"eager"``): any other ``attn_implementation`` is
    refused."""
    if packing is True:
        raise ValueError("packing=True is not possible: PairRM's encoder pads its rows (packing applies to decoder "
                         "reward models)")
    if attn_implementation not in (None, "eager"):
        raise ValueError(f"attn_implementation={attn_implementation!r} is not possible for PairRM: its DeBERTa-v2 "
                         "encoder runs only its own disentangled attention ('eager'; transformers has no sdpa or "
                         "flash-attention for it); leave attn_implementation unset or use 'eager'")
    tokenizer = _faithful_tokenizer(tokenizer, name_or_path)
    model = load_pairrm(name_or_path, tokenizer, device=device, dtype=dtype, quantization=quantization,
                        attn_implementation=attn_implementation)
    model = apply_adapter(model, adapter, quantized=quantization is not None)
    return PairRMRewardModel(model, preset=preset, tokenizer=tokenizer, device=device, max_length=max_length,
                             max_batch_tokens=max_batch_tokens)
