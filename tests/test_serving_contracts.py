"""Every endpoint of ``rlhf-rewards serve`` against in-process scoring of the same tiny checkpoint (1e-5), for
every preset: /v1/score, /v1/compare, /v1/rewards (as RewardFunction), OpenRLHF's /get_reward with queries decoded
by a Qwen-ChatML and a Llama-3 policy tokenizer with their special tokens left in, and verl's /classify with inputs
rendered by the reward model's own chat template."""

from __future__ import annotations

import math

import httpx
import pytest

from rlhf_rewards import RewardFunction, list_presets, load_reward_model
from rlhf_rewards.errors import SampleError
from rlhf_rewards.serving import RewardEngine, build_app
from rlhf_rewards.testing.tokenizers import write_chatml_bpe_tokenizer, write_llama3_tokenizer

from serving_helpers import ServerThread

PRESETS = list_presets()
TOL = dict(rel=1e-5, abs=1e-5)

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris is the capital of France."),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
     "Rayleigh scattering: short waves scatter more.\n\nThat is all."),
    ([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
      {"role": "user", "content": "Another one, please."}], "Green, like grass."),
]
REFERENCE = "I am not sure what you mean."


@pytest.fixture(scope="module")
def servers(tiny_dir):
    """``servers(preset)``: ``(model, url)``, the tiny model loaded in-process and a server over the same model
    object (the test's own in-process calls and the server's take turns through the model lock)."""
    running, stack = {}, []

    def get(preset: str):
        if preset not in running:
            model = load_reward_model(tiny_dir(preset), preset=preset, device="cpu")
            server = ServerThread(build_app(RewardEngine(model, max_wait_ms=2)))
            stack.append(server)
            running[preset] = (model, server.__enter__())
        return running[preset]

    yield get
    for server in stack:
        server.__exit__(None, None, None)


def post(url: str, path: str, body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def assert_rewards(actual, expected) -> None:
    """Equal within 1e-5, with ``None`` exactly where it is expected."""
    assert [a is None for a in actual] == [e is None for e in expected]
    assert [a for a in actual if a is not None] == pytest.approx([e for e in expected if e is not None], **TOL)


def readable(model, chats):
    """The ``(messages, response)`` pairs ``model`` can score: a process model may refuse a conversation per sample
    (Math-Shepherd reads one question, RLHFlow's PRMs one question after an optional system message)."""
    if model.kind != "process":
        return list(chats)
    results = model.score_samples([m for m, _ in chats], [c for _, c in chats])
    kept = [chat for chat, r in zip(chats, results) if not isinstance(r, SampleError)]
    assert kept, "no conversation left to test"
    return kept


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def expected_scores(model, messages, responses, references=None):
    """In-process: the scalar score, or for a pairwise model logodds(P(response better than reference))."""
    if model.kind == "pairwise":
        probs = model.compare(messages, responses, references)
        return [math.log(p) - math.log1p(-p) for p in probs]
    return model.score(messages, responses)


# -- health and models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_health_and_models_describe_the_loaded_model(servers, preset):
    model, url = servers(preset)
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    (entry,) = httpx.get(url + "/v1/models").json()["data"]
    assert entry["id"] == preset and entry["preset"] == preset and entry["kind"] == model.kind
    assert entry["device"] == "cpu" and entry["dtype"] == "float32" and entry["max_length"] == model.max_length


def test_health_is_503_until_the_engine_is_installed():
    with ServerThread(build_app(None)) as url:
        assert httpx.get(url + "/health").status_code == 503
        r = post(url, "/v1/score", {"prompts": ["a"], "completions": ["b"]})
        assert r.status_code == 503 and "Retry-After" in r.headers


# -- /v1/score and /v1/compare -------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_score_and_compare_equal_in_process(servers, preset):
    model, url = servers(preset)
    chats = readable(model, CONVERSATIONS + [("Plain text prompt", "A plain answer.")])
    prompts, completions = [m for m, _ in chats], [c for _, c in chats]
    baselines = [REFERENCE] * len(prompts)
    if model.kind == "process":  # no baselines; its step rewards are tests/test_process_rewards.py's
        r = post(url, "/v1/score", {"prompts": prompts, "completions": completions})
        assert r.status_code == 200 and r.json()["rewards"] == pytest.approx(model.score(prompts, completions), **TOL)
        assert post(url, "/v1/score", {"prompts": prompts, "completions": completions,
                                       "baselines": baselines}).status_code == 422
        return
    if model.kind == "scalar":
        r = post(url, "/v1/score", {"prompts": prompts, "completions": completions})
        assert r.status_code == 200
        assert r.json()["rewards"] == pytest.approx(model.score(prompts, completions), **TOL)
        ra, rb = model.score(prompts, completions), model.score(prompts, baselines)
        bradley_terry = [sigmoid(a - b) for a, b in zip(ra, rb)]
        diff = [a - b for a, b in zip(ra, rb)]
    else:
        probs = model.compare(prompts, completions, baselines)
        bradley_terry = probs
        diff = [2 * p - 1 for p in probs]
    body = {"prompts": prompts, "completions": completions, "baselines": baselines}
    if model.kind == "pairwise":
        body["transform"] = "centered"
    r = post(url, "/v1/score", body)
    assert r.status_code == 200 and r.json()["rewards"] == pytest.approx(diff, **TOL)
    r = post(url, "/v1/compare", {"prompts": prompts, "completions_a": completions, "completions_b": baselines})
    assert r.status_code == 200 and r.json()["probabilities"] == pytest.approx(bradley_terry, **TOL)


def test_pairwise_score_without_baselines_is_422(servers):
    _, url = servers("pairrm")
    r = post(url, "/v1/score", {"prompts": ["a"], "completions": ["b"]})
    assert r.status_code == 422 and "baselines" in r.json()["detail"]


# -- /v1/rewards = RewardFunction ----------------------------------------------------------------------------------

def rewards_cases(kind: str):
    prompts = ["Hello there"] * 3 + [[{"role": "user", "content": "Name a colour."}]] * 3
    completions = ["Hi!", "Hello, friend.", "Hi!", "Blue.", "Red, surely.", "Green."]
    ref = ["Hey."] * 6
    if kind == "process":  # each completion on its own: no pairing, no baselines
        return [({}, prompts, completions)]
    cases = [({"pairing": "group", "group_size": 3}, prompts, completions),
             ({"pairing": "group", "group_mode": "anchor", "transform": "probability"}, prompts, completions),
             ({"pairing": "halves"}, prompts[:2] + prompts[:2], completions[:4]),
             ({"baselines": ref}, prompts, completions)]
    if kind == "scalar":
        cases.append(({}, prompts, completions))
    return cases


@pytest.mark.parametrize("preset", PRESETS)
def test_rewards_equal_reward_function(servers, preset):
    model, url = servers(preset)
    for options, prompts, completions in rewards_cases(model.kind):
        options = dict(options)
        baselines = options.pop("baselines", None)
        fn = RewardFunction(model, baseline_column="ref" if baselines else None, **options)
        expected = fn(prompts, completions, **({"ref": baselines} if baselines else {}))
        body = {"prompts": prompts, "completions": completions, **options}
        if baselines:
            body["baselines"] = baselines
        r = post(url, "/v1/rewards", body)
        assert r.status_code == 200, (options, r.text)
        data = r.json()
        assert_rewards(data["rewards"], expected)
        assert data["errors"] == [None] * len(prompts)
        assert data["stats"]["samples"] > 0


@pytest.mark.parametrize("preset", ["starling-rm-34b", "rlhflow-pair-pm-llama3-8b"])
def test_rewards_one_bad_sample_is_null_with_its_reason(servers, preset):
    model, url = servers(preset)
    bad = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "prefilled"}]
    prompts = ["Hello there", bad, "Hello there", "What now?"]
    completions = ["Hi!", "x", "Hello.", "Nothing."]
    options = {"pairing": "halves"} if model.kind == "pairwise" else {}
    if model.kind == "pairwise":
        prompts, completions = ["Hello there", bad, "Hello there", bad], ["Hi!", "x", "Hello.", "y"]
    expected = RewardFunction(model, **options)(prompts, completions)
    data = post(url, "/v1/rewards", {"prompts": prompts, "completions": completions, **options}).json()
    assert_rewards(data["rewards"], expected)
    assert data["rewards"][1] is None and "prompts[1]" in data["errors"][1]
    assert data["rewards"][0] is not None and data["errors"][0] is None


def test_rewards_groups_that_do_not_split_are_422(servers):
    _, url = servers("pairrm")
    r = post(url, "/v1/rewards", {"prompts": ["a", "a", "b"], "completions": ["x", "y", "z"], "pairing": "group",
                                  "group_size": 2})
    assert r.status_code == 422 and "group_size=2" in r.json()["detail"]


# -- OpenRLHF /get_reward ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy_tokenizers(tmp_path_factory):
    """Qwen-style ChatML (EOS <|im_end|>, pad <|endoftext|>) and Llama-3 (EOS <|eot_id|>, pad <|end_of_text|>)."""
    qwen = write_chatml_bpe_tokenizer(str(tmp_path_factory.mktemp("qwen")))
    llama = write_llama3_tokenizer(str(tmp_path_factory.mktemp("llama3")))
    return {"qwen-chatml": (qwen, qwen.pad_token_id), "llama3": (llama, llama.convert_tokens_to_ids("<|end_of_text|>"))}


def openrlhf_query(tok, pad_id: int, messages, response: str, left_pads: int, right_pads: int) -> str:
    """What OpenRLHF sends: the policy's prompt+response token ids decoded with ``skip_special_tokens=False``."""
    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tok(response, add_special_tokens=False)["input_ids"]
    assert tok.decode(response_ids) == response  # the test's premise: the response survives its own decode
    ids = [pad_id] * left_pads + prompt_ids + response_ids + [tok.eos_token_id] + [pad_id] * right_pads
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("policy", ["qwen-chatml", "llama3"])
@pytest.mark.parametrize("preset", PRESETS)
def test_get_reward_scores_openrlhf_queries(servers, policy_tokenizers, preset, policy):
    model, url = servers(preset)
    tok, pad_id = policy_tokenizers[policy]
    chats = readable(model, CONVERSATIONS)
    queries = [openrlhf_query(tok, pad_id, m, c, left_pads=k % 2, right_pads=k) for k, (m, c) in enumerate(chats)]
    assert tok.eos_token in queries[0]
    messages = [m for m, _ in chats]
    responses = [c for _, c in chats]
    labels = [REFERENCE] * len(queries)
    expected = expected_scores(model, messages, responses, labels)
    # OpenRLHF sends one sample per request, with the prompt and label beside the query
    for k, query in enumerate(queries):
        r = post(url, "/get_reward", {"query": [query], "prompts": ["<templated prompt>"], "labels": [labels[k]]})
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["rewards"] == pytest.approx([expected[k]], **TOL) and data["scores"] == data["rewards"]
        assert isinstance(data["extra_logs"], dict)
    r = post(url, "/get_reward", {"query": queries, "labels": labels})
    assert r.json()["rewards"] == pytest.approx(expected, **TOL)


def test_get_reward_plain_query_is_split_at_its_prompt(servers):
    model, url = servers("starling-rm-34b")
    r = post(url, "/get_reward", {"query": ["Question: why?\nAnswer: because."], "prompts": ["Question: why?\n"]})
    assert r.json()["rewards"] == pytest.approx(model.score(["Question: why?\n"], ["Answer: because."]), **TOL)
    r = post(url, "/get_reward", {"query": ["no template, no prompt"]})
    assert r.status_code == 422 and "query[0]" in r.json()["detail"]


@pytest.mark.parametrize("labels", [None, [None], [{"answer": 3}]])
def test_pairwise_get_reward_needs_a_string_label(servers, policy_tokenizers, labels):
    _, url = servers("rlhflow-pair-pm-llama3-8b")
    tok, pad = policy_tokenizers["qwen-chatml"]
    body = {"query": [openrlhf_query(tok, pad, *CONVERSATIONS[0], 0, 0)]}
    if labels is not None:
        body["labels"] = labels
    r = post(url, "/get_reward", body)
    assert r.status_code == 422 and "labels[0]" in r.json()["detail"]


# -- verl /classify ------------------------------------------------------------------------------------------------

def verl_input(model, messages, response: str) -> str:
    """verl's reward loop: the RM tokenizer's chat template over the chat plus the response, one leading BOS
    string removed."""
    text = model.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                               tokenize=False, add_generation_prompt=False)
    bos = model.tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


def renders(model, messages, response) -> bool:
    from jinja2.exceptions import TemplateError

    try:
        verl_input(model, messages, response)
    except TemplateError:
        return False
    return True


# their tokenizers have none
TEMPLATED = [p for p in PRESETS if p not in ("starling-rm-7b-alpha", "pairrm", "math-shepherd")]


@pytest.mark.parametrize("preset", TEMPLATED)
def test_classify_scores_verl_inputs(servers, preset):
    model, url = servers(preset)
    assert model.tokenizer.chat_template is not None
    # verl renders with the reward model's own template, which may refuse a system message (Mistral v0.2, Gemma-2)
    chats = readable(model, [(m, c) for m, c in CONVERSATIONS if renders(model, m, c)])
    inputs = [verl_input(model, m, c) for m, c in chats]
    expected = expected_scores(model, [m for m, _ in chats], [c for _, c in chats], [REFERENCE] * len(chats))
    extra = {"labels": REFERENCE} if model.kind == "pairwise" else {}
    for text, value in zip(inputs, expected):
        r = post(url, "/classify", {"model": "/path/to/rm", "input": text, "activation": False, **extra})
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["object"] == "list" and data["model"] == preset and isinstance(data["created"], int)
        assert data["data"][-1]["probs"][-1] == pytest.approx(value, **TOL)  # what verl reads
        assert data["data"][0]["index"] == 0 and data["data"][0]["num_classes"] == 1
        assert data["usage"]["prompt_tokens"] > 0
    extra = {"labels": [REFERENCE] * len(inputs)} if model.kind == "pairwise" else {}
    data = post(url, "/classify", {"input": inputs, "use_activation": True, **extra}).json()
    assert [d["probs"][0] for d in data["data"]] == pytest.approx([sigmoid(v) for v in expected], **TOL)
    assert [d["index"] for d in data["data"]] == list(range(len(inputs)))
    data = post(url, "/classify", {"input": inputs, **extra}).json()  # vLLM's default: activation on
    assert [d["probs"][0] for d in data["data"]] == pytest.approx([sigmoid(v) for v in expected], **TOL)
