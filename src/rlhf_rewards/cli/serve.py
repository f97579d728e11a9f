"""``rlhf-rewards serve``: one reward model behind HTTP (OpenRLHF's /get_reward, vLLM's /classify as verl calls it,
and /v1/score, /v1/compare, /v1/rewards), batching concurrent requests; see docs/serving.md."""

from __future__ import annotations

import argparse
import logging
import os
from . import serve_ray
from .common import UsageError, attn_implementation_arg, check_preset, reports_usage_errors
from .options import bounded

HELP = "serve a reward model over HTTP for RL trainers (needs the 'serve' extra; see docs/serving.md)"
API_KEY_ENV = "RLHF_REWARDS_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive = bounded(int, 1)
    seconds = bounded(float, 0, above=True)
    parser.add_argument("model", metavar="MODEL", help="hub id or local directory of the reward model")
    parser.add_argument("--preset", help="preset name (default: chosen from the model)")
    parser.add_argument("--tokenizer", help="tokenizer path or hub id (default: the model's / the card's)")
    parser.add_argument("--device", help="device of the model, e.g. cuda:0 (default: the GPU, else CPU)")
    parser.add_argument("--dtype", help="weights' dtype (default: the card's on GPU, float32 on CPU)")
    parser.add_argument("--max-length", type=positive, help="token limit per input (default: the card's)")
    parser.add_argument("--quantization", choices=("8bit", "4bit"), help="bitsandbytes quantization of the backbone")
    parser.add_argument("--adapter", help="a PEFT adapter to put on the reward model")
    parser.add_argument("--attn-implementation", type=attn_implementation_arg, metavar="NAME",
                        help="attention implementation: sdpa, eager, flash_attention_2 (CUDA with flash_attn "
                             "installed; packs samples padding-free) ... (default: transformers' choice)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other address needs an API key)")
    parser.add_argument("--port", type=bounded(int, 0, 65535), default=8000)
    parser.add_argument("--api-key-file", help=f"file holding the API key (default: env {API_KEY_ENV})")
    parser.add_argument("--max-batch-tokens", type=positive,
                        help="token budget of one forward pass; one merged call of concurrent requests takes at "
                             "most 3 characters per token of it (a larger request runs in chunks of that size, "
                             "taking turns with the others)")
    parser.add_argument("--max-wait-ms", type=bounded(float, 0), default=5.0,
                        help="how long a request may wait for others to share its forward pass (0: no merging)")
    parser.add_argument("--max-request-mb", type=bounded(float, 0, above=True), default=32.0,
                        help="larger bodies get 413 (default 32)")
    parser.add_argument("--max-queue", type=positive, default=4096,
                        help="model inputs allowed to wait for the model; beyond it requests get 503 + Retry-After")
    parser.add_argument("--max-request-items", type=positive,
                        help="samples, and model inputs, one request may hold; beyond it 413 (default and "
                             "maximum: --max-queue)")
    parser.add_argument("--max-sample-chars", type=positive, default=1_000_000,
                        help="characters one sample may hold, all its fields together; beyond it 413 "
                             "(default 1000000)")
    parser.add_argument("--body-timeout", type=seconds, default=30.0,
                        help="seconds a request body may take to arrive; slower uploads get 408 (default 30)")
    parser.add_argument("--header-timeout", type=seconds, default=10.0,
                        help="seconds a connection may stay open without sending a request (default 10)")
    parser.add_argument("--shutdown-timeout", type=seconds, default=30.0,
                        help="after SIGTERM, seconds requests in flight may take to finish (default 30)")
    parser.add_argument("--served-model-name", help="model id reported to clients (default: the preset name)")
    parser.add_argument("--calibration",
                        help="reward statistics from `rlhf-rewards calibrate` of this model: what requests with "
                             "normalize='stats' divide by (default: the checkpoint config's OpenRLHF mean/std, "
                             "when present); GET /v1/models states which")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve_ray.add_arguments(parser)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as err:
            raise UsageError(f"--api-key-file {args.api_key_file}: {err.strerror or err}") from None
        if not key:
            raise UsageError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _check_before_loading(args: argparse.Namespace) -> None:
    """What would otherwise fail only once the model loads, behind a server already listening."""
    from ..backends.weights import check_attn_implementation, check_device, resolve_device, resolve_dtype

    if args.max_request_items is not None and args.max_request_items > args.max_queue:
        raise UsageError(f"--max-request-items {args.max_request_items} is more than --max-queue "
                         f"{args.max_queue}: such a request could never be queued")
    preset = check_preset(args.model, args.preset)
    try:
        device = resolve_device(args.device)
        check_device(device, args.device)
        resolve_dtype(args.dtype, preset, device)
        check_attn_implementation(args.attn_implementation, [device])
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.calibration is not None:
        args.calibration = _calibration(args.calibration, args.model, preset.name)


def _calibration(path: str, model: str, preset: str):
    """The ``--calibration`` file read and checked against the model to serve, before it loads (the replicas of
    ``--ray`` get the statistics, not the path)."""
    from ..loading import model_identity
    from ..normalization import check_same_model, read_calibration

    try:
        scale = read_calibration(path)
        check_same_model(scale, model_identity(model), preset)
    except ValueError as err:
        raise UsageError(f"--calibration: {err}") from None
    return scale


@reports_usage_errors("serve")
def run(args: argparse.Namespace) -> int:
    problem = serve_ray.misuse(args)
    if problem:
        raise UsageError(problem)
    try:
        from ..serving.engine import RewardEngine
        from ..serving.server import check_host, serve
        from ..serving.settings import ServerSettings
    except ImportError as err:
        raise UsageError(f"it needs the 'serve' extra: pip install -e \".[serve]\" in a checkout ({err})") from None
    try:
        settings = ServerSettings(api_key=_api_key(args), max_request_mb=args.max_request_mb,
                                  max_sample_chars=args.max_sample_chars, body_timeout_s=args.body_timeout,
                                  header_timeout_s=args.header_timeout, shutdown_timeout_s=args.shutdown_timeout)
        if not args.ray:
            check_host(args.host, settings)
    except ValueError as err:
        raise UsageError(str(err)) from None
    _check_before_loading(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_kwargs = {"preset": args.preset, "tokenizer": args.tokenizer, "device": args.device, "dtype": args.dtype,
                   "max_length": args.max_length, "max_batch_tokens": args.max_batch_tokens,
                   "quantization": args.quantization, "adapter": args.adapter,
                   "attn_implementation": args.attn_implementation}

    engine_kwargs = {"model_id": args.served_model_name, "max_wait_ms": args.max_wait_ms,
                     "max_queue": args.max_queue, "max_request_items": args.max_request_items,
                     "calibration": args.calibration}
    if args.ray:
        return serve_ray.run(args, load_kwargs, engine_kwargs, settings)

    def load():
        return RewardEngine.from_pretrained(args.model, load_kwargs=load_kwargs, **engine_kwargs)

    try:
        return serve(load, host=args.host, port=args.port, settings=settings, log_level=args.log_level)
    except ValueError as err:
        raise UsageError(str(err)) from None
