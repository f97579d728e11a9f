"""The FastAPI app around a :class:`~rlhf_rewards.serving.engine.RewardEngine`: the route table, auth, limits,
errors.

:func:`build_app` is the factory; it does not start a server, so the same app runs under ``uvicorn`` (``rlhf-rewards
serve``) or inside a Ray Serve replica (``@serve.ingress(build_app(engine, settings))``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from fastapi import FastAPI, Request

from .endpoints import classify, compare, get_reward, models, rewards, score, score_steps
from .engine import RewardEngine
from .middleware import GuardMiddleware, HTTPError, error_response
from .routing import Route, Served, add_route
from .settings import ServerSettings

ROUTES: tuple[Route, ...] = (
    *models.ROUTES,  # /health, /v1/models, /metrics
    score.ROUTE,
    score_steps.ROUTE,  # process reward models' step rewards
    compare.ROUTE,
    rewards.ROUTE,
    get_reward.ROUTE,  # OpenRLHF
    classify.ROUTE,  # vLLM's contract, as verl calls it
)
"""Every route of the server: path, methods, handler, request model, response model (see
:class:`~rlhf_rewards.serving.routing.Route`)."""

OPEN_PATHS = frozenset({models.HEALTH_PATH})
"""Paths served without the API key (load balancers and orchestrators probe them)."""


def build_app(engine: Optional[RewardEngine], settings: Optional[ServerSettings] = None, *,
              routes: Sequence[Route] = ROUTES) -> FastAPI:
    """The reward-model server as an ASGI app (FastAPI).

    Args:
        engine: the loaded model and its batcher; ``None`` while the model is still loading (``/health`` answers
            503 and scoring routes 503 with ``Retry-After`` until :func:`set_engine` installs it).
        settings: API key, limits, timeouts (see :class:`~rlhf_rewards.serving.ServerSettings`).
        routes: the routes served (default :data:`ROUTES`: ``GET``/``HEAD /health``, ``GET /v1/models``, ``GET
            /metrics``, ``POST /v1/score``, ``/v1/score_steps``, ``/v1/compare``, ``/v1/rewards``, ``/get_reward``
            (OpenRLHF), ``/classify`` (vLLM's contract, as verl calls it)).

    The app starts nothing at import or build time: the engine's batcher starts on the first request, on whatever
    event loop serves it.
    """
    served = Served(engine, settings or ServerSettings())
    app = FastAPI(title="rlhf-rewards", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rlhf_rewards = served

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError):
        return error_response(err.status, err.detail, err.headers, **err.fields)

    for route in routes:
        add_route(app, served, route)
    served.routes = frozenset(route.path for route in app.routes)
    app.add_middleware(GuardMiddleware, state=served, open_paths=OPEN_PATHS)
    return app


def set_engine(app: FastAPI, engine: RewardEngine) -> None:
    """Install the engine once the model has loaded (for an app built with ``engine=None``)."""
    app.state.rlhf_rewards.engine = engine


def get_engine(app: FastAPI) -> Optional[RewardEngine]:
    """The engine behind ``app`` (``None`` while loading)."""
    return app.state.rlhf_rewards.engine
