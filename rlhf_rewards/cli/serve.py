"""``rlhf-rewards serve``: one reward model behind HTTP (OpenRLHF's /get_reward, vLLM's /classify as verl calls it,
and /v1/score, /v1/compare, /v1/rewards), batching concurrent requests; see docs/serving.md."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import serve_ray

HELP = "serve a reward model over HTTP for RL trainers (needs the 'serve' extra; see docs/serving.md)"
API_KEY_ENV = "RLHF_REWARDS_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="hub id or local directory of the reward model")
    parser.add_argument("--preset", help="preset name (default: chosen from the model)")
    parser.add_argument("--tokenizer", help="tokenizer path or hub id (default: the model's / the card's)")
    parser.add_argument("--device", help="device of the model, e.g. cuda:0 (default: the GPU, else CPU)")
    parser.add_argument("--dtype", help="weights' dtype (default: the card's on GPU, float32 on CPU)")
    parser.add_argument("--max-length", type=int, help="token limit per input (default: the card's)")
    parser.add_argument("--quantization", choices=("8bit", "4bit"), help="bitsandbytes quantization of the backbone")
    parser.add_argument("--adapter", help="a PEFT adapter to put on the reward model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other address needs an API key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-file", help=f"file holding the API key (default: env {API_KEY_ENV})")
    parser.add_argument("--max-batch-tokens", type=int,
                        help="token budget of one forward pass, and of one merged call of concurrent requests")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a request may wait for others to share its forward pass (0: no merging)")
    parser.add_argument("--max-request-mb", type=float, default=32.0, help="larger bodies get 413 (default 32)")
    parser.add_argument("--max-queue", type=int, default=4096,
                        help="samples allowed to wait for the model; beyond it requests get 503 + Retry-After")
    parser.add_argument("--served-model-name", help="model id reported to clients (default: the preset name)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve_ray.add_arguments(parser)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def run(args: argparse.Namespace) -> int:
    problem = serve_ray.misuse(args)
    if problem:
        print(f"rlhf-rewards serve: {problem}", file=sys.stderr)
        return 2
    try:
        from ..serving.app import ServerSettings
        from ..serving.engine import RewardEngine
        from ..serving.server import serve
    except ImportError as err:
        print(f"rlhf-rewards serve needs the 'serve' extra: pip install \"rlhf-rewards[serve]\" ({err})",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServerSettings(api_key=_api_key(args), max_request_mb=args.max_request_mb)
    except (OSError, ValueError) as err:
        print(f"rlhf-rewards serve: {err}", file=sys.stderr)
        return 2
    load_kwargs = {"preset": args.preset, "tokenizer": args.tokenizer, "device": args.device, "dtype": args.dtype,
                   "max_length": args.max_length, "max_batch_tokens": args.max_batch_tokens,
                   "quantization": args.quantization, "adapter": args.adapter}

    engine_kwargs = {"model_id": args.served_model_name, "max_batch_tokens": args.max_batch_tokens,
                     "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue}
    if args.ray:
        return serve_ray.run(args, load_kwargs, engine_kwargs, settings)

    def load():
        return RewardEngine.from_pretrained(args.model, load_kwargs=load_kwargs, **engine_kwargs)

    try:
        return serve(load, host=args.host, port=args.port, settings=settings, log_level=args.log_level)
    except ValueError as err:
        print(f"rlhf-rewards serve: {err}", file=sys.stderr)
        return 2
