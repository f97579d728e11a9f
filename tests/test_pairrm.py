"""PairRM (card 004) against an oracle that runs llm-blender's own inference procedure step by step."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from torch import nn

from rlhf_rewards.backends.pairrm import (CANDIDATE1_PREFIX, CANDIDATE2_PREFIX, CANDIDATE_PREFIX,
                                          CONVERSATION_INSTRUCTION, SOURCE_PREFIX, PairRMRewardModel,
                                          check_pairrm_tokenizer, source_and_candidate)
from rlhf_rewards.backends.pairrm_loading import (DEBERTA_SPECIAL_TOKENS, load_pairrm, load_pairrm_reward_model,
                                                  load_pairrm_tokenizer)
from rlhf_rewards.pairwise import best_of_n, rank
from rlhf_rewards.presets import get_preset
from rlhf_rewards.testing.pairrm import write_tiny_pairrm

CPU = torch.device("cpu")


class LLMBlenderOracle:
    """llm-blender 0.0.2's PairRM inference, written from its source step by step: ``CrossCompareCollator`` (input
    building and batch padding), ``CrossCompareReranker._forward`` / ``_full_predict`` and ``Blender.compare`` /
    ``compare_conversations``, on a plain ``DebertaV2Model`` and head loaded from the checkpoint's safetensors."""

    def __init__(self, path: str, source_maxlength: int = 1224, candidate_maxlength: int = 412):
        from safetensors.torch import load_file
        from transformers import DebertaV2Config, DebertaV2Model, PreTrainedTokenizerFast

        # build_tokenizer: transformers 4's AutoTokenizer gave DebertaV2TokenizerFast over the repo's tokenizer.json
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"),
                                                 **DEBERTA_SPECIAL_TOKENS)
        self.source_maxlength, self.candidate_maxlength = source_maxlength, candidate_maxlength
        self.sep_token = self.tokenizer.sep_token
        self.sep_token_id = self.tokenizer.sep_token_id
        ids = self.tokenizer.convert_tokens_to_ids([SOURCE_PREFIX, CANDIDATE1_PREFIX, CANDIDATE2_PREFIX,
                                                    CANDIDATE_PREFIX])
        self.source_prefix_id, self.cand1_prefix_id, self.cand2_prefix_id, self.cand_prefix_id = ids
        config = DebertaV2Config.from_pretrained(path)
        state = load_file(os.path.join(path, "model.safetensors"))
        self.encoder = DebertaV2Model(config).eval()
        self.encoder.load_state_dict({k[len("pretrained_model."):]: v for k, v in state.items()
                                      if k.startswith("pretrained_model.")})
        hidden = config.hidden_size
        self.head_layer = nn.Sequential(nn.Dropout(config.drop_out), nn.Linear(2 * hidden, hidden), nn.Tanh(),
                                        nn.Dropout(config.drop_out), nn.Linear(hidden, config.n_tasks)).eval()
        self.head_layer.load_state_dict({k[len("head_layer."):]: v for k, v in state.items()
                                         if k.startswith("head_layer.")})

    def encode_texts(self, texts, max_length):
        p = self.tokenizer(texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
        return p["input_ids"], p["attention_mask"]

    def collate(self, batch):
        """CrossCompareCollator.__call__ for DeBERTa (its sep token encodes to 3 ids, so no manual [SEP])."""
        batch_source = [SOURCE_PREFIX + b["source"] for b in batch]
        batch_candidates = [[CANDIDATE_PREFIX + c for c in b["candidates"]] for b in batch]
        batch_source = [s.replace(self.sep_token, " ") for s in batch_source]
        batch_candidates = [[c.replace(self.sep_token, " ") for c in cands] for cands in batch_candidates]
        source_ids, source_masks = self.encode_texts(batch_source, self.source_maxlength)
        valid_positions = source_masks.any(dim=0)
        source_ids, source_masks = source_ids[:, valid_positions], source_masks[:, valid_positions]
        remaining_length = self.source_maxlength - valid_positions.sum().item()
        encoded = [self.encode_texts(c, self.candidate_maxlength + remaining_length // 2) for c in batch_candidates]
        candidate_ids = torch.stack([e[0] for e in encoded])
        candidate_masks = torch.stack([e[1] for e in encoded])
        valid = candidate_masks.reshape(-1, candidate_masks.shape[-1]).any(dim=0)
        return source_ids, source_masks, candidate_ids[:, :, valid], candidate_masks[:, :, valid]

    def cat_ids(self, ids1, masks1, ids2, masks2, ids3, masks3):
        """Each part up to its last [SEP], then all the parts' padding."""
        def last_sep(ids):
            return [int(row.eq(self.sep_token_id).nonzero()[-1]) for row in ids]

        s1, s2, s3 = last_sep(ids1), last_sep(ids2), last_sep(ids3)
        cat_ids, cat_masks = [], []
        for i in range(ids1.shape[0]):
            cat_ids.append(torch.cat([ids1[i, :s1[i] + 1], ids2[i, :s2[i] + 1], ids3[i, :s3[i] + 1],
                                      ids1[i, s1[i] + 1:], ids2[i, s2[i] + 1:], ids3[i, s3[i] + 1:]]))
            cat_masks.append(torch.cat([masks1[i, :s1[i] + 1], masks2[i, :s2[i] + 1], masks3[i, :s3[i] + 1],
                                        masks1[i, s1[i] + 1:], masks2[i, s2[i] + 1:], masks3[i, s3[i] + 1:]]))
        return torch.stack(cat_ids), torch.stack(cat_masks)

    def model_inputs(self, source_ids, source_mask, cand1_ids, cand1_mask, cand2_ids, cand2_mask):
        """CrossCompareReranker._forward's input building: markers set, parts concatenated, padding trimmed."""
        cand1_ids, cand2_ids = cand1_ids.clone(), cand2_ids.clone()
        cand1_ids[torch.where(cand1_ids == self.cand_prefix_id)] = self.cand1_prefix_id
        cand2_ids[torch.where(cand2_ids == self.cand_prefix_id)] = self.cand2_prefix_id
        input_ids, attention_mask = self.cat_ids(source_ids, source_mask, cand1_ids, cand1_mask, cand2_ids,
                                                 cand2_mask)
        keep_column_mask = attention_mask.ne(0).any(dim=0)
        return input_ids[:, keep_column_mask], attention_mask[:, keep_column_mask]

    @torch.no_grad()
    def forward(self, *parts):
        """CrossCompareReranker._forward: logits, > 0 when candidate 1 is better."""
        input_ids, attention_mask = self.model_inputs(*parts)
        encs = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=True).hidden_states[-1]
        s = torch.where(input_ids == self.source_prefix_id)
        c1 = torch.where(input_ids == self.cand1_prefix_id)
        c2 = torch.where(input_ids == self.cand2_prefix_id)
        source_encs, cand1_encs, cand2_encs = encs[s[0], s[1]], encs[c1[0], c1[1]], encs[c2[0], c2[1]]
        left = self.head_layer(torch.cat([source_encs, cand1_encs], dim=-1))
        right = self.head_layer(torch.cat([source_encs, cand2_encs], dim=-1))
        return (left - right).mean(dim=-1)

    def full_predict(self, source_ids, source_mask, candidate_ids, candidate_mask):
        """CrossCompareReranker._full_predict: M[b, i, j] = logit with candidate i first and j second."""
        n = candidate_ids.shape[1]
        results = torch.zeros(candidate_ids.shape[0], n, n)
        for i in range(n):
            for j in range(n):
                if i != j:
                    results[:, i, j] = self.forward(source_ids, source_mask, candidate_ids[:, i],
                                                    candidate_mask[:, i], candidate_ids[:, j], candidate_mask[:, j])
        return results

    def compare(self, inputs, candidates_a, candidates_b, instructions=None, batch_size=4):
        """Blender.compare in its default mode "[A,B]+[B,A]": returns (cmp, M) with cmp = scores_A - scores_B
        (> 0: A better) and M the comparison matrices."""
        data = [{"source": (instructions[i] if instructions else "") + inputs[i],
                 "candidates": [candidates_a[i], candidates_b[i]]} for i in range(len(inputs))]
        cmps, matrices = [], []
        for start in range(0, len(data), batch_size):
            m = self.full_predict(*self.collate(data[start:start + batch_size]))
            scores = (m - m.transpose(1, 2)).mean(dim=-1)  # get_scores_from_cmps, "max_logits"
            cmps.append(scores[:, 0] - scores[:, 1])
            matrices.append(m)
        return torch.cat(cmps), torch.cat(matrices)

    def compare_conversations(self, conversations_a, conversations_b, batch_size=4):
        """Blender.compare_conversations: USER turns into the source, ASSISTANT turns into the candidates."""
        instructions = [CONVERSATION_INSTRUCTION] * len(conversations_a)
        inputs = ["\n".join("USER: " + x[i]["content"] + f"\nAssistant: <Response {i // 2 + 1}>"
                            for i in range(0, len(x), 2)) for x in conversations_a]
        cand1 = ["\n".join(f"<Response {i // 2 + 1}>: " + x[i]["content"] for i in range(1, len(x), 2))
                 for x in conversations_a]
        cand2 = ["\n".join(f"<Response {i // 2 + 1}>: " + x[i]["content"] for i in range(1, len(x), 2))
                 for x in conversations_b]
        return self.compare(inputs, cand1, cand2, instructions, batch_size=batch_size)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return write_tiny_pairrm(str(tmp_path_factory.mktemp("pairrm") / "hf"), seed=0)


@pytest.fixture(scope="module")
def oracle(tiny) -> LLMBlenderOracle:
    return LLMBlenderOracle(tiny)


def make_rm(path: str, max_batch_tokens=None) -> PairRMRewardModel:
    return load_pairrm_reward_model(path, preset=get_preset("pairrm"), tokenizer=None, device=CPU,
                                    dtype=torch.float32, max_length=None, max_batch_tokens=max_batch_tokens,
                                    quantization=None, adapter=None)


@pytest.fixture(scope="module")
def rm(tiny) -> PairRMRewardModel:
    return make_rm(tiny)


SINGLE = [
    ("Hello there!", "Hi! How can I help you today?", "Go away."),
    ("Why is the sky blue?", "Rayleigh scattering: short blue waves scatter more than red ones.", "Because."),
    ("What is 17 times 23?", "391", "It is 17 times 20 plus 17 times 3, so 340 + 51 = 391."),
    ("Translate good morning into French.", "bonjour", ""),
    ("Ａ１ in full width [SEP] and a separator", "naïve  résumé\n\nwith   spaces ", "Café ① ﬁne [SEP] x"),
]


def check(ours_p, ours_logits, cmp, matrices, tol=1e-4):
    for p, (ab, ba), c, m in zip(ours_p, ours_logits, cmp.tolist(), matrices):
        assert ab == pytest.approx(float(m[0, 1]), abs=tol)
        assert ba == pytest.approx(float(m[1, 0]), abs=tol)
        assert p == pytest.approx(sigmoid(c / 2), abs=tol)
        assert (p > 0.5) == (c > 0)


def test_card_parity_single_turn(rm, oracle):
    prompts, a, b = map(list, zip(*SINGLE))
    cmp, matrices = oracle.compare(prompts, a, b, batch_size=3)  # batches of 3 and 2, padded as its collator does
    check(rm.compare(prompts, a, b), rm.compare_logits(prompts, a, b), cmp, matrices)


def test_several_tasks_and_marker_lookup(tmp_path):
    """A head with 3 outputs (mean over tasks) matches the oracle; markers looked up by id match given positions."""
    path = write_tiny_pairrm(str(tmp_path / "tasks"), seed=1, n_tasks=3)
    rm3 = make_rm(path)
    prompts, a, b = map(list, zip(*SINGLE))
    cmp, matrices = LLMBlenderOracle(path).compare(prompts, a, b)
    check(rm3.compare(prompts, a, b), rm3.compare_logits(prompts, a, b), cmp, matrices)
    rows = rm3.encode(*SINGLE[0])
    ids, mask = torch.tensor(rows), torch.ones(len(rows), len(rows[0]), dtype=torch.long)
    with torch.no_grad():
        found = rm3.model(ids, mask).tolist()  # markers looked up by id, as the original forward does
    assert found == pytest.approx(list(rm3.compare_logits(*map(list, zip(SINGLE[0])))[0]), abs=1e-6)


def test_card_parity_multi_turn_and_system_prompt(rm, oracle):
    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
               {"role": "user", "content": "Another one, please."}]
    longer = history + [{"role": "assistant", "content": "Green."}, {"role": "user", "content": "And a third?"}]
    cases = [(history, "Green, like grass.", "Red."), (longer, "Yellow, like the sun.", "No.")]
    prompts, a, b = map(list, zip(*cases))

    def conversation(prompt, reply):
        turns = [{"role": m["role"].upper(), "content": m["content"]} for m in prompt]
        return turns + [{"role": "ASSISTANT", "content": reply}]

    cmp, matrices = oracle.compare_conversations([conversation(p, x) for p, x in zip(prompts, a)],
                                                 [conversation(p, x) for p, x in zip(prompts, b)])
    check(rm.compare(prompts, a, b), rm.compare_logits(prompts, a, b), cmp, matrices)

    # a system prompt is folded into the (first) user message: "{system}\n\n{user}"
    system = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}]
    cmp, matrices = oracle.compare(["You are terse.\n\nWhy is the sky blue?"], ["Scattering."], ["Magic."])
    check(rm.compare([system], ["Scattering."], ["Magic."]),
          rm.compare_logits([system], ["Scattering."], ["Magic."]), cmp, matrices)


def test_source_and_candidate_rule():
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    source, candidate = source_and_candidate(conv, "See you")
    assert source == (CONVERSATION_INSTRUCTION + "USER: Be kind.\n\nHi\nAssistant: <Response 1>\n"
                      "USER: Bye\nAssistant: <Response 2>")
    assert candidate == "<Response 1>: Hello\n<Response 2>: See you"
    assert source_and_candidate([{"role": "user", "content": "Hi"}], "Yo") == ("Hi", "Yo")
    with pytest.raises(ValueError):
        source_and_candidate([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "c")
    with pytest.raises(ValueError):
        source_and_candidate([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                              {"role": "user", "content": "c"}], "d")


def test_truncation_parity_and_counting(tiny, rm):
    """Small budgets (source 40, candidates 20 + half the source's slack): llm-blender with batch_size=1."""
    small = PairRMRewardModel(rm.model, preset=rm.preset, tokenizer=rm.tokenizer, device=CPU,
                              source_max_length=40, candidate_max_length=20)
    assert small.max_length == 80
    small_oracle = LLMBlenderOracle(tiny, source_maxlength=40, candidate_maxlength=20)
    long_text = "The quick brown fox jumps over the lazy dog. " * 8
    cases = [(long_text, "Short answer.", long_text), ("Short question?", long_text, "Yes."),
             ("Short question?", "Fine.", "Also fine.")]
    prompts, a, b = map(list, zip(*cases))
    cmp, matrices = small_oracle.compare(prompts, a, b, batch_size=1)
    check(small.compare(prompts, a, b), small.compare_logits(prompts, a, b), cmp, matrices)

    def length(marker, text):
        return len(small.tokenizer(marker + text)["input_ids"])

    expected = 0
    for p, x, y in cases[:2]:
        src = min(length(SOURCE_PREFIX, p), 40)
        budget = (80 - src) // 2
        expected += (length(SOURCE_PREFIX, p) - src + max(0, length(CANDIDATE1_PREFIX, x) - budget)
                     + max(0, length(CANDIDATE1_PREFIX, y) - budget))
    small.stats.reset()
    small.compare(prompts, a, b)
    assert small.stats.samples == 6
    assert small.stats.truncated == 4  # both orders of the two long comparisons
    assert small.stats.truncated_tokens == 2 * expected


def test_truncation_at_the_card_budgets(rm, oracle):
    """A source past 1224 tokens and candidates past their budget, with the card's 1224/412/2048: the same token
    ids as llm-blender's input building (the forward on such inputs is covered at small budgets above)."""
    source = "Please write a short poem about the sea and the wind. " * 60
    a, b = "The waves roll in, the gulls call out. " * 60, "Numbers like 12345 and 3.14. " * 80
    assert len(rm.tokenizer(SOURCE_PREFIX + source)["input_ids"]) > 1224
    src_ids, src_mask, cand_ids, cand_mask = oracle.collate([{"source": source, "candidates": [a, b]}])
    ab, _ = oracle.model_inputs(src_ids, src_mask, cand_ids[:, 0], cand_mask[:, 0], cand_ids[:, 1], cand_mask[:, 1])
    ba, _ = oracle.model_inputs(src_ids, src_mask, cand_ids[:, 1], cand_mask[:, 1], cand_ids[:, 0], cand_mask[:, 0])
    assert rm.encode(source, a, b) == [ab[0].tolist(), ba[0].tolist()]
    assert len(ab[0]) == 2048


def test_mixed_batches_match_single_comparisons(tiny, rm):
    prompts, a, b = map(list, zip(*SINGLE))
    prompts += ["Please write a short poem about the sea. " * 10]
    a += ["The waves roll in. " * 12]
    b += ["No."]
    alone = [rm.compare_logits([p], [x], [y])[0] for p, x, y in zip(prompts, a, b)]
    rm.stats.reset()
    together = rm.compare_logits(prompts, a, b)
    # rows of different lengths ran padded together (the padding cap splits off the ones too unlike the rest)
    assert rm.stats.batches < 2 * len(prompts) and rm.stats.computed_tokens > rm.stats.real_tokens
    small = make_rm(tiny, max_batch_tokens=300)
    split = small.compare_logits(prompts, a, b)
    assert small.stats.batches > 1
    for x, y, z in zip(alone, together, split):
        assert x == pytest.approx(y, abs=1e-5) and x == pytest.approx(z, abs=1e-5)


def test_identical_candidates_tie_by_construction(rm, oracle):
    """Identical candidates make the two orders the same input: logit_AB == logit_BA, P exactly 0.5, as
    llm-blender's compare gives 0 (not better) for them."""
    items = [([{"role": "user", "content": "Name a colour."}], "Blue.", "Blue.")]
    (p_ab, p_ba, p), = rm._compare_both_orders(items)
    assert p == 0.5 and p_ab + p_ba == pytest.approx(1.0)
    cmp, _ = oracle.compare(["Name a colour."], ["Blue."], ["Blue."])
    assert float(cmp[0]) == 0.0
    # different strings, same tokens (the normaliser strips and collapses spaces): still the same input
    assert rm.compare(["Name a colour."], ["Blue."], ["  Blue.  "]) == [0.5]


def test_both_layouts_load_the_same_weights(tiny, tmp_path, rm):
    blender = write_tiny_pairrm(str(tmp_path / "llm-blender"), seed=0, layout="llm-blender")
    assert not os.path.exists(os.path.join(blender, "tokenizer.json"))
    other = make_rm(blender)
    assert other.tokenizer.get_vocab() == rm.tokenizer.get_vocab()
    args = ([p for p, _, _ in SINGLE], [x for _, x, _ in SINGLE], [y for _, _, y in SINGLE])
    expected = [x for pair in rm.compare_logits(*args) for x in pair]
    assert [x for pair in other.compare_logits(*args) for x in pair] == pytest.approx(expected, abs=1e-6)
    # llm-blender's pytorch_model.bin instead of safetensors
    from safetensors.torch import load_file

    torch.save(load_file(os.path.join(blender, "model.safetensors")), os.path.join(blender, "pytorch_model.bin"))
    os.remove(os.path.join(blender, "model.safetensors"))
    assert [x for pair in make_rm(blender).compare_logits(*args) for x in pair] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dropped", ["head_layer.4.weight", "pretrained_model.encoder.rel_embeddings.weight"])
def test_missing_weight_is_an_error(tiny, tmp_path, dropped):
    from safetensors.torch import load_file, save_file

    broken = str(tmp_path / "broken")
    shutil.copytree(tiny, broken)
    state = load_file(os.path.join(broken, "model.safetensors"))
    del state[dropped]
    save_file(state, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks"):
        load_pairrm(broken, load_pairrm_tokenizer(broken), device=CPU, dtype=torch.float32)


def test_tokenizer_matches_sentencepiece_and_repairs_transformers5(tiny, rm):
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tiny, "spm.model"))
    for text in ["Ａ１ café", "x  y", "tab\tand\nnewline", " leading and trailing ", "naïve résumé ①",
                 "a\u00a0b\u3000c", "ﬁne", "\n\nhello\n\n"]:
        assert rm.tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    # transformers 5's own DebertaV2Tokenizer drops the NFKC step (5.24 still does): whatever a release does, the
    # check refuses a tokenizer that drifts, naming the step, and the loader repairs it
    auto = AutoTokenizer.from_pretrained(tiny)
    if auto("Ａ１ ﬁne", add_special_tokens=False)["input_ids"] != sp.encode("Ａ１ ﬁne"):
        with pytest.raises(ValueError, match="NFKC"):
            check_pairrm_tokenizer(auto, rm.model.config)
    repaired = load_pairrm_reward_model(tiny, preset=rm.preset, tokenizer=auto, device=CPU, dtype=torch.float32,
                                        max_length=None, max_batch_tokens=None, quantization=None, adapter=None)
    assert repaired.tokenizer.get_vocab() == rm.tokenizer.get_vocab()


def llm_blender_rank(oracle: LLMBlenderOracle, source: str, candidates: list[str]
                     ) -> tuple[list[int], list[float], torch.Tensor]:
    """Blender.rank on one source, step by step: the collator with all candidates, ``_full_predict``'s comparison
    matrix M (M[i, j]: candidate i first, j second), ``get_scores_from_cmps`` "max_logits"
    (``mean_j (M[i, j] - M[j, i])``) and ``get_ranks_from_scores`` (higher score first, equal scores share a place,
    listed here in index order)."""
    m = oracle.full_predict(*oracle.collate([{"source": source, "candidates": candidates}]))[0].double()
    scores = (m - m.T).mean(dim=-1).tolist()
    return sorted(range(len(candidates)), key=lambda k: (-scores[k], k)), scores, m


RANK_CASES = [
    ("Say something helpful.", ["Sure, here it is.", "391", "bonjour", "Thank you!", "It is 17 times 20.", "No."]),
    ("Why is the sky blue?", ["Rayleigh scattering.", "Because.", "Blue light scatters more.", "Because.", "Go away."]),
]


@pytest.mark.parametrize("source,candidates", RANK_CASES)
def test_rank_is_llm_blenders_rank(rm, oracle, source, candidates):
    expected, scores, m = llm_blender_rank(oracle, source, candidates)
    gaps = [abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1:] if a != b]
    assert min(gaps) > 1e-3  # distinct scores well apart, so float noise cannot decide the expected order
    order = rank(rm, [source], [candidates])[0]
    assert order == expected
    if len(set(candidates)) == len(candidates):
        # the rule this replaced (summed P of winning) picks another candidate first here
        summed = [sum(sigmoid(float(m[i, j] - m[j, i]) / 2) for j in range(len(candidates)) if j != i)
                  for i in range(len(candidates))]
        assert max(range(len(candidates)), key=lambda k: summed[k]) != expected[0]
    else:  # duplicates: llm-blender gives them equal scores; here they are adjacent, in index order
        dup = [k for k, c in enumerate(candidates) if candidates.count(c) > 1]
        assert scores[dup[0]] == scores[dup[1]]
        assert order.index(dup[1]) == order.index(dup[0]) + 1
        winner = best_of_n(rm, [source], [candidates])[0]
        assert winner != dup[1]  # a duplicate never wins over its earlier twin


def transformers4_ids(sp, text: str, unk_id: int, mask_id: int) -> list[int]:
    """What transformers 4's DeBERTa-v3 fast tokenizer (llm-blender's) gives for ``text`` holding literal
    ``[UNK]`` / ``[MASK]`` strings, step by step as the tokenizers library runs it. Added tokens that are not
    normalized (``[MASK]``, [CLS], [SEP], [PAD]) are found in the raw text first; each stretch between them is then
    normalized (stripped at both ends, NFKC, space runs collapsed) and searched for the normalized added token
    ``[UNK]``, so the pieces around ``[UNK]`` keep their spaces; Metaspace makes a piece's trailing space a lone
    "▁" word; the other words are sentencepiece's (which strips and prefixes "▁" the same way)."""
    ids = []
    for k, stretch in enumerate(text.split("[MASK]")):
        if k:
            ids.append(mask_id)
        pieces = " ".join(w for w in stretch.split(" ") if w).split("[UNK]")  # strip + collapse (NFKC: a no-op)
        for j, piece in enumerate(pieces):
            if j:
                ids.append(unk_id)
            ids.extend(sp.encode(piece))
            if j < len(pieces) - 1 and piece.endswith(" "):
                ids.append(sp.piece_to_id("▁"))
    return ids


@pytest.mark.parametrize("layout", ["hf", "llm-blender", "hf-tokenizer-json"])
def test_literal_special_tokens_tokenize_as_transformers_4(tiny, tmp_path, layout):
    import sentencepiece
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if layout == "llm-blender":
        tok = load_pairrm_tokenizer(write_tiny_pairrm(str(tmp_path / "lb"), seed=0, layout="llm-blender"))
    elif layout == "hf":
        tok = load_pairrm_tokenizer(tiny)
    else:  # the file the tiny -hf checkpoint ships, read as saved (as transformers 4 read PairRM-hf's)
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(os.path.join(tiny, "tokenizer.json")),
                                      **DEBERTA_SPECIAL_TOKENS)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tiny, "spm.model"))
    unk, mask = tok.unk_token_id, tok.convert_tokens_to_ids("[MASK]")
    assert unk == sp.unk_id() == 3
    for text in ["They are [UNK] to me.", "x [UNK]", "[UNK] at the start", "two  [UNK]  spaces", "a [MASK] b",
                 "no[UNK]space", " They are [UNK] [UNK] to me. ", "a [MASK] [UNK] b", "a [UNK] [MASK] b"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == transformers4_ids(sp, text, unk, mask), text
    # the case run through llm-blender: the space before [UNK] is its own "▁"
    ids = tok("They are [UNK] to me.", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[ids.index(unk) - 1:ids.index(unk) + 1]) == ["▁", "[UNK]"]
    assert tok.added_tokens_decoder[unk].normalized
    assert not any(tok.added_tokens_decoder[tok.convert_tokens_to_ids(t)].normalized
                   for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))


def test_a_tokenizer_matching_unk_before_normalizing_is_replaced(tiny, rm, caplog):
    from tokenizers import AddedToken

    raw = load_pairrm_tokenizer(tiny)
    raw.backend_tokenizer.add_special_tokens([AddedToken("[UNK]", normalized=False, special=True)])
    text = "They are [UNK] to me."
    assert raw(text)["input_ids"] != rm.tokenizer(text)["input_ids"]
    with pytest.raises(ValueError, match=r"literal '\[UNK\]'"):
        check_pairrm_tokenizer(raw, rm.model.config)
    with caplog.at_level("WARNING"):
        repaired = load_pairrm_reward_model(tiny, preset=rm.preset, tokenizer=raw, device=CPU, dtype=torch.float32,
                                            max_length=None, max_batch_tokens=None, quantization=None, adapter=None)
    assert "normalized [UNK]" in caplog.text
    assert repaired.tokenizer(text)["input_ids"] == rm.tokenizer(text)["input_ids"]


def test_format_and_probability_mapping(rm):
    texts = rm.format("Hi [SEP] there", "Yo", "Hey")
    assert texts[0] == ("[CLS]<|source|>Hi   there[SEP][CLS]<|candidate1|>Yo[SEP][CLS]<|candidate2|>Hey[SEP]")
    assert texts[1] == ("[CLS]<|source|>Hi   there[SEP][CLS]<|candidate1|>Hey[SEP][CLS]<|candidate2|>Yo[SEP]")
    (ab, ba), = rm.compare_logits(["Hi"], ["Yo"], ["Hey"])
    (p_ab, p_ba, p), = rm._compare_both_orders([([{"role": "user", "content": "Hi"}], "Yo", "Hey")])
    assert p_ab == pytest.approx(sigmoid(ab)) and p_ba == pytest.approx(sigmoid(-ba))
    assert p == pytest.approx(sigmoid((ab - ba) / 2))
    # swapping A and B mirrors P (the two rows swap places in the batch: float rounding only)
    assert rm.compare(["Hi"], ["Hey"], ["Yo"])[0] == pytest.approx(1 - p, abs=1e-6)


def test_load_reward_model_picks_the_preset(tiny):
    from rlhf_rewards import load_reward_model

    model = load_reward_model(tiny, device="cpu")
    assert isinstance(model, PairRMRewardModel) and model.preset.name == "pairrm"
    assert 0.0 <= model.compare(["Hello!"], ["Hi!"], ["Bye."])[0] <= 1.0
