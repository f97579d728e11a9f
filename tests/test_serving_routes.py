"""The route table is the server: every path the app serves is a row of it, with its request model, and each
route's response model describes, field for field, what a real server answers on that route."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import BaseModel

from rlhf_rewards import load_reward_model
from rlhf_rewards.serving import RewardEngine, build_app
from rlhf_rewards.serving.app import ROUTES
from rlhf_rewards.serving.endpoints.fields import RequestBody

from serving_helpers import ServerThread

QUERY = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>"

BODIES = {
    "/v1/score": {"prompts": ["What is 2+2?", [{"role": "user", "content": "Hi"}]], "completions": ["4", "Hello!"],
                  "baselines": ["5", "Go away."]},
    "/v1/compare": {"prompts": ["What is 2+2?"], "completions_a": ["4"], "completions_b": ["5"]},
    "/v1/rewards": {"prompts": ["Hi", None, "Hi", "Hi"], "completions": ["Hello!", "Hey", "Go away", "Yo"],
                    "baselines": ["Hey."] * 4},
    "/get_reward": {"query": [QUERY], "prompts": ["What is 2+2?"], "labels": ["5"]},
    "/classify": {"model": "rm", "input": [QUERY, QUERY], "activation": False, "labels": ["5", "four"]},
    "/v1/score_steps": {"prompts": ["What is 2+2?", "Hi"], "completions": ["2 + 2\n\n= 4", []]},
}
"""A body each POST route answers 200 for, on a scalar and a pairwise model (a new route needs one here)."""

PROCESS_ONLY = {"/v1/score_steps"}
"""Routes only a process reward model answers (a 422 on the others)."""


def test_the_table_lists_every_route_with_its_models():
    app = build_app(None)
    served = {(route.path, method) for route in app.routes for method in route.methods}
    table = {(route.path, method) for route in ROUTES for method in route.methods}
    assert served == table
    assert len({route.path for route in ROUTES}) == len(ROUTES)
    for route in ROUTES:
        if "POST" in route.methods:
            assert issubclass(route.request_model, RequestBody), route.path
            assert issubclass(route.response_model, BaseModel), route.path
            assert route.path in BODIES, f"{route.path}: add a body to BODIES"
        else:
            assert route.request_model is None, route.path


@pytest.mark.parametrize("preset", ["starling-rm-34b", "rlhflow-pair-pm-llama3-8b", "qwen2.5-math-prm",
                                    "math-shepherd"])
def test_each_route_answers_exactly_its_response_model(tiny_dir, preset):
    model = load_reward_model(tiny_dir(preset), preset=preset, device="cpu")
    with ServerThread(build_app(RewardEngine(model, max_wait_ms=0))) as url:
        for route in ROUTES:
            if model.kind == "process" and route.path not in PROCESS_ONLY and "POST" in route.methods:
                continue  # the other POST routes' bodies hold baselines, which a process model refuses
            for method in route.methods:
                r = httpx.request(method, url + route.path, json=BODIES.get(route.path), timeout=60)
                if route.path in PROCESS_ONLY and model.kind != "process":
                    assert r.status_code == 422 and "process reward model" in r.text
                    continue
                assert r.status_code == 200, (route.path, r.text)
                if method == "HEAD":
                    continue
                if route.response_model is None:  # /metrics: Prometheus text, not JSON
                    assert r.headers["content-type"].startswith("text/plain") and "rlhf_rewards_" in r.text
                    continue
                answer = json.loads(r.content)
                # every field of the answer is a field of the model, with the JSON type the model gives it
                assert route.response_model.model_validate(answer).model_dump() == answer, route.path
                assert json.dumps(route.response_model.model_validate(answer).model_dump()) == json.dumps(answer)
