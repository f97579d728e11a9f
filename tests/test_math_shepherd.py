"""Math-Shepherd (``math-shepherd``) on a tiny checkpoint in its hub layout, against an oracle written from the model
card's code (``f"{question} {output}"`` with every step ending in " ки" and the steps on consecutive lines; the ids
transformers 4's sentencepiece tokenizer gave, BOS first; a full ``MistralForCausalLM`` forward;
``logits[:, :, candidate_tokens].softmax(-1)[:, :, 0]`` at the positions of ``step_tag_id``), one sample at a time;
the step tag inside text, the one-question prompt, batching, TRL, the server and the command line."""

from __future__ import annotations

import json

import httpx
import pytest
import sentencepiece
import torch
from datasets import Dataset
from transformers import MistralForCausalLM

from benchmarks.cards import MathShepherdCard, tagged
from rlhf_rewards import ProcessRewardModel, load_reward_model
from rlhf_rewards.cli import main
from rlhf_rewards.errors import SampleError, TooLongError
from rlhf_rewards.presets import get_preset, resolve_preset
from rlhf_rewards.serving import RewardEngine, build_app
from rlhf_rewards.testing.tokenizers import mistral_tokenizer_model
from rlhf_rewards.tokenization import SENTENCEPIECE_PROBES

from serving_helpers import ServerThread

PRESET = "math-shepherd"
TOL = 1e-4
QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four. She sells "
            "the rest for $2 each. How much does she make every day?")
CARD_OUTPUT = ("Step 1: Janet's ducks lay 16 eggs per day. ки\nStep 2: She eats three, so 16 - 3 = 13 eggs are left. "
               "ки\nStep 3: She bakes with four, so 13 - 4 = 9 are left. ки\nStep 4: She makes 9 * $2 = $18. The "
               "answer is: 18 ки")
SOLUTIONS = [
    ["She makes 9 * 2 = 18 dollars."],  # one step
    ["Step 1: 16 - 3 = 13.", "Step 2: 13 - 4 = 9.", "Step 3: 9 * 2 = 18. The answer is: 18"],  # several
    ["Step 1: first 16 - 3\n= 13.", "Step 2: The answer is: 18"],  # a step holding the separator text
    ["Step 1: 9 * 2 = 18.", ""],  # an empty final step
]


@pytest.fixture(scope="module")
def card(path):
    """The model card's procedure for one question and its tagged output, step by step. Its tokenizer is
    Mistral-7B's sentencepiece model as transformers 4 ran it when the card was written: ``encode`` = BOS, then
    sentencepiece's ids of the text."""
    oracle = MathShepherdCard(path)
    candidate_tokens, step_tag_id = oracle.candidate_tokens, oracle.step_tag_id
    assert candidate_tokens == [648, 387] and step_tag_id == 12902  # the card's comments
    return oracle


# -- the preset and the checkpoint ---------------------------------------------------------------------------------

def test_resolution_layout_and_golden_ids(path, prm):
    assert resolve_preset("peiyi9979/math-shepherd-mistral-7b-prm", None).name == PRESET
    assert resolve_preset("PEIYI9979/Math-Shepherd-Mistral-7B-PRM", None).name == PRESET
    assert resolve_preset(path, None).name == PRESET  # config.json's rlhf_rewards_preset
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["MistralForCausalLM"] and config["model_type"] == "mistral"
    assert isinstance(prm, ProcessRewardModel) and prm.kind == "process" and prm.aggregate == "min"
    assert prm.step_separator == "\n"
    # the real vocabulary: the preset's golden ids were checked at load (same vocabulary size)
    assert len(prm.tokenizer) == get_preset(PRESET).golden_ids[0].vocab_size == 32000
    assert prm.step_tag_id == 12902 and prm.label_ids == (648, 387)
    # transformers 5 loads this LlamaTokenizer without the dummy prefix; the package's tokenizer is sentencepiece's
    sp = sentencepiece.SentencePieceProcessor(model_file=mistral_tokenizer_model())
    text = f"{QUESTION} {CARD_OUTPUT}"
    assert prm.tokenizer.encode(text) == [1] + sp.encode(text)


def test_packed_rows_equal_padded_batches(path, prm):
    packed = load_reward_model(path, device="cpu", packing=True)
    assert packed.packing and not prm.packing  # auto: padded on sdpa, as every model
    prompts = [QUESTION] * len(SOLUTIONS)
    for a, b in zip(packed.score_steps(prompts, SOLUTIONS), prm.score_steps(prompts, SOLUTIONS)):
        assert a == pytest.approx(b, abs=1e-5)



def test_the_sliding_window_holds_padded_and_packed(path, tmp_path):
    """Mistral-7B v0.1 attends 4096 tokens back; here a window of 8 makes every solution longer than it, so a
    forward that ignored the window would differ from the card's."""
    import shutil

    small = tmp_path / "window"
    shutil.copytree(path, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    sp = sentencepiece.SentencePieceProcessor(model_file=mistral_tokenizer_model())
    model = MistralForCausalLM.from_pretrained(str(small), dtype=torch.float32).eval()
    whole = load_reward_model(str(path), device="cpu")
    for packing in (False, True):
        prm = load_reward_model(str(small), device="cpu", packing=packing)
        got = prm.score_steps([QUESTION] * 2, SOLUTIONS[1:3])
        for steps, rewards in zip(SOLUTIONS[1:3], got):
            ids = torch.tensor([[1] + sp.encode(f"{QUESTION} {tagged(steps)}")])
            with torch.no_grad():
                want = model(ids).logits[:, :, [648, 387]].softmax(-1)[:, :, 0][ids == 12902].tolist()
            assert rewards == pytest.approx(want, abs=TOL)
            assert rewards != pytest.approx(whole.score_steps([QUESTION], [steps])[0], abs=TOL)


# -- parity with the card --------------------------------------------------------------------------------------

def test_the_cards_own_example(prm, card):
    steps = [line[:-len(" ки")] for line in CARD_OUTPUT.split("\n")]
    assert tagged(steps) == CARD_OUTPUT
    want = card(QUESTION, CARD_OUTPUT)
    assert len(want) == 4
    assert prm.score_steps([QUESTION], [steps])[0] == pytest.approx(want, abs=TOL)
    # the same solution as the policy's text: one step per line
    assert prm.score_steps([QUESTION], ["\n".join(steps)])[0] == pytest.approx(want, abs=TOL)
    assert prm.format(QUESTION, "\n".join(steps)) == f"{QUESTION} {CARD_OUTPUT}"


@pytest.mark.parametrize("steps", SOLUTIONS, ids=["one", "several", "separator-inside", "empty-final"])
def test_step_rewards_equal_the_cards(prm, card, steps):
    got = prm.score_steps([QUESTION], [steps])[0]
    want = card(QUESTION, tagged(steps))
    assert len(got) == len(steps) == len(want)
    assert got == pytest.approx(want, abs=TOL)
    assert all(0.0 <= r <= 1.0 for r in got)
    assert len(set(round(r, 4) for r in got)) == len(got) or len(got) == 1  # the checkpoint tells steps apart


def test_text_completions_split_at_newlines(path, prm, card):
    text = "Step 1: 16 - 3 = 13.\nStep 2: 13 - 4 = 9.\n"  # str.split keeps the empty last step
    got = prm.score_steps([QUESTION], [text])[0]
    assert len(got) == 3 and got == pytest.approx(card(QUESTION, tagged(text.split("\n"))), abs=TOL)
    blank = load_reward_model(path, device="cpu", step_separator="\n\n")
    two = "Step 1: 16 - 3\n= 13.\n\nStep 2: 13 - 4 = 9."
    assert blank.score_steps([QUESTION], [two])[0] == pytest.approx(card(QUESTION, tagged(two.split("\n\n"))),
                                                                  abs=TOL)


def test_batch_invariance(path, prm):
    prompts = [QUESTION] * len(SOLUTIONS) + ["What is 2 + 2?"]
    completions = SOLUTIONS + [["2 + 2 = 4. The answer is: 4"]]
    together = prm.score_steps(prompts, completions)
    alone = [prm.score_steps([p], [c])[0] for p, c in zip(prompts, completions)]
    reversed_ = prm.score_steps(prompts[::-1], completions[::-1])[::-1]
    small = load_reward_model(path, device="cpu", max_batch_tokens=64)  # one sample per pass
    for a, b, c, d in zip(together, alone, reversed_, small.score_steps(prompts, completions)):
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5) and a == pytest.approx(d, abs=1e-5)


# -- the step tag inside text, and the prompt ------------------------------------------------------------------------

def test_a_sample_spelling_the_step_tag_is_refused_with_the_tag_named(path, prm, card):
    forged = ["Step 1: 16 - 3 = 13. ки Step 2: 13 - 4 = 9.", "Step 3: The answer is: 18"]
    # why: the card's own reading gives this two-step solution three rewards, every one after the forged tag
    # belonging to another step
    assert len(card(QUESTION, tagged(forged))) == 3
    prompts = [QUESTION, QUESTION, QUESTION, f"Translate ки. {QUESTION}", QUESTION]
    completions = [forged, "Step 1: ок ки\nStep 2: 18", ["Ответ: ученики"], ["18"], ["Step 1: 18"]]
    for model in (prm, load_reward_model(path, device="cpu", control_text="tokens")):
        got = model.score_steps_samples(prompts, completions)
        assert isinstance(got[0], SampleError) and str(got[0]).startswith("completions[0][0] contains 'ки', "
                                                                            "math-shepherd's step tag")
        assert isinstance(got[1], SampleError) and str(got[1]).startswith(
            "completions[1] (its step 1, split at '\\n') contains 'ки'")
        # inside a word the tokenizer would not make it the tag, but the rule is on the characters (documented)
        assert isinstance(got[2], SampleError) and str(got[2]).startswith("completions[2][0] contains 'ки'")
        assert isinstance(got[3], SampleError) and str(got[3]).startswith("prompts[3]: ")
        assert "the question contains 'ки'" in str(got[3])
        assert got[4] == pytest.approx(card(QUESTION, tagged(["Step 1: 18"])), abs=TOL)  # the others are scored
    with pytest.raises(ValueError, match="step tag"):
        prm.score([QUESTION], [forged])


def test_one_question_per_prompt(prm, card):
    user = [{"role": "user", "content": QUESTION}]
    assert prm.score_steps([user], [["Step 1: 18"]])[0] == pytest.approx(card(QUESTION, tagged(["Step 1: 18"])),
                                                                       abs=TOL)
    system = [{"role": "system", "content": "Be exact."}] + user
    turns = user + [{"role": "assistant", "content": "Eighteen."}, {"role": "user", "content": "Show steps."}]
    got = prm.score_steps_samples([system, turns, QUESTION], [["a"], ["a"], ["a"]])
    assert isinstance(got[0], SampleError) and str(got[0]).startswith("prompts[0]: ")
    assert "reads one question (a single user turn), and this prompt holds 2 messages (system, user)" in str(got[0])
    assert isinstance(got[1], SampleError) and "3 messages (user, assistant, user)" in str(got[1])
    assert isinstance(got[2], list)


def test_control_text_of_mistrals_tokenizer(path, prm, card):
    steps = ["Step 1: 13 </s> eggs.", "Step 2: 18"]
    before = prm.stats.control_text
    got = prm.score_steps([QUESTION], [steps])[0]
    assert prm.stats.control_text == before + 1
    # read as text: as sentencepiece encodes the characters "</s>" (a control symbol never comes from text)
    assert got == pytest.approx(card(QUESTION, tagged(steps)), abs=TOL)
    tokens = load_reward_model(path, device="cpu", control_text="tokens")
    as_eos = tokens.score_steps([QUESTION], [steps])[0]
    assert len(as_eos) == 2 and as_eos[0] != pytest.approx(got[0], abs=TOL)  # the card's raw reading: an EOS id
    # the guarded tokenization, forced on text without control text, is the tokenizer's own bit for bit
    rendered = [prm.format(QUESTION, [text, text]) for text in SENTENCEPIECE_PROBES]
    assert prm._control.encode(rendered) == prm.tokenizer(rendered)["input_ids"]


def test_too_long_is_refused_not_cut(path):
    short = load_reward_model(path, device="cpu", max_length=40)
    got = short.score_steps_samples([QUESTION, "Hi"], [["word " * 50], ["a"]])
    assert isinstance(got[0], TooLongError) and "max_length=40" in str(got[0]) and isinstance(got[1], list)


# -- TRL, server, command line, ProcessBench ---------------------------------------------------------------------

def test_grpo_step(prm, tmp_path):
    from test_trl_integration import check_process_grpo_step

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 2 + 3?"}],
                                            [{"role": "user", "content": "What is 7 - 4?"}]]})
    check_process_grpo_step(prm, "shepherd", dataset, tmp_path)


def test_server_score_steps(prm):
    prompts, completions = [QUESTION] * 3, [SOLUTIONS[1], "Step 1: a ки", SOLUTIONS[3]]
    with ServerThread(build_app(RewardEngine(prm, max_wait_ms=2))) as url:
        def post(route, body):
            return httpx.post(url + route, json=body, timeout=60)

        body = post("/v1/score_steps", {"prompts": prompts, "completions": completions}).json()
        score = post("/v1/score", {"prompts": prompts[::2], "completions": completions[::2], "aggregate": "last"})
        forged = post("/v1/score", {"prompts": prompts[:2], "completions": completions[:2]})
    for k in (0, 2):
        want = prm.score_steps([QUESTION], [completions[k]])[0]
        assert body["steps"][k] == pytest.approx(want, abs=1e-6) and body["errors"][k] is None
        assert score.json()["rewards"][k // 2] == pytest.approx(want[-1], abs=1e-6)
    assert body["steps"][1] is None and body["errors"][1].startswith("completions[1] (its step 1")
    assert "step tag" in body["errors"][1]
    assert forged.status_code == 422 and "step tag" in forged.text


def test_score_command_writes_reward_steps(path, prm, tmp_path):
    rows = [{"prompt": QUESTION, "completion": "Step 1: 16 - 3 = 13.\nStep 2: The answer is: 13"},
            {"prompt": QUESTION, "completion": "Step 1: 13 ки\nStep 2: 13"}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["score", str(data), "--model", path, "--output", str(out)]) == 0
    written = [r for r in map(json.loads, out.read_text().splitlines()) if "prompt" in r]
    want = prm.score_steps([QUESTION], [rows[0]["completion"]])[0]
    assert written[0]["reward_steps"] == pytest.approx(want, abs=1e-6)
    assert written[0]["reward"] == pytest.approx(min(want), abs=1e-6)
    assert written[1]["reward"] is None and written[1]["reward_steps"] is None
    assert "step tag" in written[1]["reward_error"]


def test_processbench_eval_with_math_shepherd(path, prm, tmp_path):
    """``eval`` on ProcessBench's sample: per subset, F1 of the accuracies on erroneous and correct rows, each row's
    prediction the first step whose reward is at most the threshold (or -1), from this model's step rewards."""
    from rlhf_rewards.cli.data_io import SAMPLE_PROCESSBENCH, sample_path

    rows = [json.loads(line) for line in open(sample_path(SAMPLE_PROCESSBENCH), encoding="utf-8")]
    threshold = 0.77  # near the tiny model's rewards, so predictions differ between rows
    rewards = prm.score_steps([r["problem"] for r in rows], [r["steps"] for r in rows])
    hits: dict = {}
    for row, steps in zip(rows, rewards):
        predicted = next((k for k, r in enumerate(steps) if r <= threshold), -1)
        kind = "correct" if row["label"] == -1 else "error"
        hits.setdefault(row["id"].rsplit("-", 1)[0], {"correct": [], "error": []})[kind].append(
            predicted == row["label"])
    out = tmp_path / "eval"
    assert main(["eval", "sample:processbench", "--model", path, "--output-dir", str(out),
                 "--threshold", str(threshold)]) == 0
    results = json.loads((out / "results.json").read_text())
    subsets = results["models"][0]["subsets"] if "models" in results else results[0]["subsets"]
    for subset, got in hits.items():
        err, cor = sum(got["error"]) / len(got["error"]), sum(got["correct"]) / len(got["correct"])
        f1 = 0.0 if err + cor == 0 else 2 * err * cor / (err + cor)
        assert subsets[subset]["f1"] == pytest.approx(f1, abs=1e-9), subset
