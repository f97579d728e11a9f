"""Reward-model replicas on Ray Serve: the app of ``rlhf-rewards serve``, one replica per GPU, behind Ray Serve's
proxy (``rlhf-rewards serve MODEL --ray``), and a reward function that calls the replicas through a deployment
handle inside the cluster. Needs the ``ray`` extra (``pip install "rlhf-rewards[ray]"``); see docs/ray.md.

- :func:`deploy` starts (or joins) Ray, deploys the replicas and returns the HTTP address and the handle.
- :class:`RayRewardFunction` / :class:`AsyncRayRewardFunction`: TRL reward functions over the handle (no HTTP).
- :func:`start_local_ray` / :func:`shutdown`: a Ray instance on this machine only, and its clean stop.

Each replica loads the model once in its constructor, on the GPU Ray assigned it, and runs the same
:class:`~rlhf_rewards.serving.RewardEngine` (batching across the requests that reach it) and the same app (routes,
auth, limits) as the plain server. A replica whose model fails to load never takes traffic (Ray Serve retries its
constructor, then reports the deployment failed); one whose model breaks later fails its health check and Ray
Serve replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import ray
import ray._private.ray_constants as ray_constants
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle
from starlette.middleware import Middleware

from .app import ROUTES, build_app
from .endpoints import models as models_endpoint
from .endpoints import rewards as rewards_endpoint
from .engine import RewardEngine
from .ray_client import AsyncRayRewardFunction, RayRewardFunction
from .routing import Served
from .server import is_loopback
from .settings import ServerSettings

logger = logging.getLogger(__name__)

__all__ = ["AsyncRayRewardFunction", "RayDeployment", "RayRewardFunction", "deploy", "proxy_middlewares",
           "shutdown", "start_local_ray"]

REPLICA_HEADER = "x-rlhf-rewards-replica"
"""Response header naming the Ray Serve replica that answered (its replica id)."""

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = f"{__name__}.proxy_middlewares"

DEPLOYMENT_NAME = "RewardModel"

_started_ray = False  # whether this process started the Ray instance it uses (and so stops it)


# -- the proxy ----------------------------------------------------------------------------------------------------
class _ReplicaLostMiddleware:
    """Pure ASGI, in Ray Serve's proxy: a request whose replica died before answering gets 503 + ``Retry-After``.

    Ray Serve's proxy sends no response at all for such a request, which its server turns into a bare 500; clients
    (``RemoteRewardFunction``, OpenRLHF's, verl's) rightly do not retry a 500, yet the request is safe to resend: the
    replica is gone and Ray Serve is starting another. A response the app started itself is passed on untouched.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, receive, watch)
        if not started:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body",
                        "body": b'{"detail": "the replica serving this request stopped; retry"}'})


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): set in the environment of
    ``ray start`` on clusters you start yourself; :func:`start_local_ray` sets it for the Ray it starts."""
    return [Middleware(_ReplicaLostMiddleware)]


# -- Ray itself ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``values`` in the environment the Ray processes started meanwhile inherit (where not already set)."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _loopback_node(address: Optional[str]) -> Iterator[None]:
    """Keep a loopback node address (or a loopback cluster address) loopback while Ray starts or connects.

    Ray "resolves" 127.0.0.1 to the address of the interface that routes outward (so its ports would listen
    there, and a cluster listening on loopback could not be joined) unless it believes it runs single-node, its
    Windows/macOS behaviour, which it reads from this constant at ``ray.init`` time, in this process only.
    """
    host = address.rsplit(":", 1)[0] if address else None
    if host is None or not is_loopback(host):
        yield
        return
    saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def start_local_ray(*, num_cpus: Optional[float] = None, num_gpus: Optional[int] = None, loopback: bool = True,
                    temp_dir: Optional[str] = None, log_to_driver: bool = True) -> str:
    """Start a Ray instance on this machine for the replicas and return its address (``host:port``); if this
    process is already connected to Ray, return that cluster's address and start nothing.

    Args:
        num_cpus, num_gpus: resources Ray may hand out (default: all of this machine's).
        loopback: pin the node address to 127.0.0.1, so Ray's own ports listen on loopback only and nothing is
            reachable from other machines (other processes join it with ``address="127.0.0.1:<port>"``).
        temp_dir: root of Ray's session directory (default ``/tmp/ray``).
        log_to_driver: stream the replicas' logs to this process.

    The Ray started here runs Ray Serve's proxy with :func:`proxy_middlewares`. :func:`shutdown` stops it.
    """
    global _started_ray
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    node = "127.0.0.1" if loopback else None
    with _loopback_node(node), _environ(**{PROXY_CALLBACK_ENV: PROXY_CALLBACK}):
        context = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                           log_to_driver=log_to_driver, _node_ip_address=node, _temp_dir=temp_dir)
    _started_ray = True
    return context.address_info["gcs_address"]


def shutdown() -> None:
    """Stop what this process started: Ray Serve and Ray itself when :func:`start_local_ray` started them (their
    processes are gone when this returns); otherwise only disconnect from the cluster, whose applications keep
    running (remove yours with :meth:`RayDeployment.delete`)."""
    global _started_ray
    if not ray.is_initialized():
        return
    if _started_ray:
        serve.shutdown()
    ray.shutdown()
    _started_ray = False


def _connect(address: Optional[str], *, host: str) -> None:
    if ray.is_initialized():
        return
    if address in (None, "local"):
        start_local_ray(loopback=is_loopback(host))
        return
    with _loopback_node(address):
        ray.init(address=address, log_to_driver=True)


# -- a replica ----------------------------------------------------------------------------------------------------
class _ReplicaEngine(RewardEngine):
    """The engine of one replica: remembers whether the model's last call failed for a reason other than its input
    (a CUDA error, a lost device), which fails the replica's health check until a call succeeds again."""

    broken: Optional[str] = None

    def _forward(self, items):
        try:
            result = super()._forward(items)
        except ValueError:  # the input's fault, not the model's
            raise
        except Exception as err:
            self.broken = f"{type(err).__name__}: {err}"
            raise
        self.broken = None
        return result


class ReplicaModelCard(models_endpoint.ModelCard):
    """A replica's ``/v1/models`` entry: the plain server's, plus ``replicas`` (running replicas of the deployment;
    ``None`` when the Serve controller could not say) and ``replica`` (the id of the one answering)."""

    replicas: Optional[int]
    replica: str


class ReplicaModelList(models_endpoint.ModelList):
    data: list[ReplicaModelCard]


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class RewardReplica:
    """One replica: the model (loaded once, on the GPU Ray assigned this actor) and the app of ``rlhf-rewards
    serve`` around it. Every response carries ``x-rlhf-rewards-replica: <replica id>``; ``/v1/models`` also says how
    many replicas of the deployment are running and which one answered."""

    def __init__(self, model: str, load_kwargs: dict[str, Any], engine_kwargs: dict[str, Any],
                 settings: ServerSettings):
        context = serve.get_replica_context()
        self.replica_id = context.replica_tag
        self._app_name, self._deployment = context.app_name, context.deployment
        # A load failure raises here: Ray Serve never routes to this replica and retries the constructor.
        self.engine = _ReplicaEngine.from_pretrained(model, load_kwargs=load_kwargs, **engine_kwargs)
        self.settings = settings
        logger.info("replica %s ready: %s", self.replica_id, self.engine.describe())

    def __serve_build_asgi_app__(self):
        routes = [dataclasses.replace(route, handler=self._models_route, response_model=ReplicaModelList)
                  if route.path == models_endpoint.MODELS_PATH else route for route in ROUTES]
        app = build_app(self.engine, self.settings, routes=routes)
        app.add_middleware(_ReplicaHeaderMiddleware, replica_id=self.replica_id)
        return app

    async def models(self) -> dict[str, Any]:
        """What ``GET /v1/models`` answers, for callers holding the deployment handle (``RayRewardFunction`` reads
        the limits from it)."""
        return (await self._model_list()).model_dump()

    async def _models_route(self, served: Served, body: None) -> ReplicaModelList:
        return await self._model_list()

    async def _model_list(self) -> ReplicaModelList:
        """The plain server's entry plus ``replicas`` (running replicas of this deployment) and ``replica`` (the
        one answering)."""
        card = models_endpoint.model_card(self.engine, self.settings)
        replicas = await asyncio.to_thread(self._running_replicas)
        return ReplicaModelList(object="list", data=[ReplicaModelCard(**card.model_dump(), replicas=replicas,
                                                                      replica=self.replica_id)])

    def _running_replicas(self) -> Optional[int]:
        try:
            status = serve.status().applications[self._app_name].deployments[self._deployment]
        except Exception:  # noqa: BLE001 - the controller is restarting: the count is unknown, not an error
            logger.warning("could not read the replica count from the Serve controller", exc_info=True)
            return None
        return int(status.replica_states.get("RUNNING", 0))

    async def rewards(self, body: dict[str, Any]) -> dict[str, Any]:
        """What ``POST /v1/rewards`` answers for ``body``, for callers holding the deployment handle (no HTTP, no
        API key: anyone who can reach the handle already runs code in the cluster), plus ``replica``. A body the
        model cannot use raises ``ValueError``; a full queue raises
        :class:`~rlhf_rewards.serving.batcher.QueueFull`."""
        request = rewards_endpoint.RewardsRequest.model_validate(body)
        with self.engine.request():  # as the app does for HTTP requests: the batcher waits for this one
            answer = await rewards_endpoint.run(self.engine, request, "handle")
        self.engine.metrics.samples.labels("handle").inc(len(request.prompts))  # as the app: only samples answered
        return {**answer.model_dump(), "replica": self.replica_id}

    def check_health(self) -> None:
        """Ray Serve's periodic probe: raising makes it replace this replica."""
        if self.engine.broken is not None:
            raise RuntimeError(f"replica {self.replica_id}: the reward model's last call failed: "
                               f"{self.engine.broken}")

    async def __del__(self):
        await self.engine.close()


class _ReplicaHeaderMiddleware:
    """Pure ASGI: adds the replica id to every response's headers."""

    def __init__(self, app, replica_id: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


# -- deploying ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayDeployment:
    """A deployed reward model.

    Attributes:
        url: base URL of the app through Ray Serve's proxy, route prefix included (``http://127.0.0.1:8000``): give
            it to ``RemoteRewardFunction``, OpenRLHF's ``--remote_rm_url`` (``<url>/get_reward``) or verl.
        handle: the deployment handle, for :class:`RayRewardFunction` inside the cluster.
        name: the Serve application's name.
    """

    url: str
    handle: DeploymentHandle
    name: str

    def delete(self) -> None:
        """Remove the application (its replicas stop; Ray and Serve keep running)."""
        serve.delete(self.name)


def deploy(model: str, *, replicas: Optional[int] = None, min_replicas: Optional[int] = None,
           max_replicas: Optional[int] = None, num_gpus_per_replica: Optional[float] = None,
           num_cpus_per_replica: float = 1.0, ray_actor_options: Optional[dict[str, Any]] = None,
           load_kwargs: Optional[dict[str, Any]] = None,
           engine_kwargs: Optional[dict[str, Any]] = None, settings: Optional[ServerSettings] = None,
           address: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
           name: str = "rlhf-rewards", max_ongoing_requests: int = 128, target_ongoing_requests: float = 32,
           health_check_period_s: float = 10.0, start_attempts: int = 3) -> RayDeployment:
    """Deploy ``model`` as Ray Serve replicas of the ``rlhf-rewards serve`` app; return once they all serve.

    Args:
        model: hub id or local directory, loaded by every replica with ``load_reward_model(model, **load_kwargs)``
            (so it must be readable on every node that may host a replica).
        replicas: a fixed number of replicas (default 1). Or ``min_replicas`` and ``max_replicas``: Ray Serve
            autoscales between them, aiming at ``target_ongoing_requests`` requests in flight per replica.
        num_gpus_per_replica: GPUs each replica reserves (Ray makes them its ``cuda:0``...); default 1 when the
            cluster has GPUs, else 0. Fractions share a GPU between replicas.
        num_cpus_per_replica: CPUs each replica reserves (request parsing and tokenization run there).
        ray_actor_options: more of Ray Serve's ``ray_actor_options`` for each replica, e.g. ``{"resources":
            {"reward_node": 1}}`` to place replicas only on nodes started with ``--resources '{"reward_node": N}'``
            (the nodes that do not train), ``label_selector``, ``runtime_env``, ``accelerator_type``.
        load_kwargs: arguments of :func:`~rlhf_rewards.load_reward_model` (preset, dtype, max_length...).
        engine_kwargs: arguments of :class:`~rlhf_rewards.serving.RewardEngine` (model_id, max_wait_ms...).
        settings: API key and body limit of the app (:class:`~rlhf_rewards.serving.ServerSettings`).
        address: the Ray cluster (``"auto"``, ``"ray://head:10001"``, ``"10.0.0.1:6379"``); default: the one this
            process is connected to, else a new Ray instance on this machine (loopback-only when ``host`` is).
        host, port: where Ray Serve's proxy listens. Applied only when this call starts Serve: a cluster whose
            Serve already runs keeps its proxy address, which the returned ``url`` reports. A ``host`` other than
            loopback needs an API key in ``settings``.
        route_prefix: the app's path on the proxy (``"/rm"``: ``http://host:port/rm/v1/rewards``).
        name: the Serve application's name (several reward models: several names and prefixes).
        max_ongoing_requests: requests in flight per replica; beyond it they queue in the proxy or handle. The
            engine batches across the requests in flight, so keep it well above one request per trainer rank.
        health_check_period_s: how often Ray Serve checks each replica.
        start_attempts: replicas Ray Serve starts in a row, each failing (a model that does not load), before it
            gives up and this call raises ``RuntimeError`` (Ray Serve's default is 20: slow for a large model that
            will not load on the 20th try either).
    """
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise ValueError("give either replicas or min_replicas/max_replicas, not both")
    autoscale = min_replicas is not None or max_replicas is not None
    if autoscale and (min_replicas is None or max_replicas is None or not 0 <= min_replicas <= max_replicas
                      or max_replicas < 1):
        raise ValueError(f"autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                         f"min_replicas={min_replicas}, max_replicas={max_replicas}")
    if replicas is not None and replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if not route_prefix.startswith("/"):
        raise ValueError(f"route_prefix must start with '/', got {route_prefix!r}")
    settings = settings or ServerSettings()
    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"refusing to serve on {host}: other machines could use the reward model without "
                         "credentials. Give an API key or use host 127.0.0.1")
    _connect(address, host=host)
    serve.start(http_options={"host": host, "port": port})
    proxy = _get_global_client().http_config
    if not is_loopback(proxy.host) and not settings.api_key:
        raise ValueError(f"this cluster's Serve proxy listens on {proxy.host}: give an API key")
    if num_gpus_per_replica is None:
        num_gpus_per_replica = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    actor = {"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica}
    clash = sorted(set(actor) & set(ray_actor_options or {}))
    if clash:
        raise ValueError(f"ray_actor_options sets {clash}: give num_cpus_per_replica / num_gpus_per_replica instead")
    options: dict[str, Any] = dict(
        ray_actor_options={**actor, **(ray_actor_options or {})},
        max_ongoing_requests=max_ongoing_requests, health_check_period_s=health_check_period_s,
        max_constructor_retry_count=start_attempts)
    if autoscale:
        options["autoscaling_config"] = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                         "initial_replicas": max(min_replicas, 1),
                                         "target_ongoing_requests": target_ongoing_requests}
    else:
        options["num_replicas"] = replicas or 1
    app = RewardReplica.options(**options).bind(model, dict(load_kwargs or {}), dict(engine_kwargs or {}),
                                                settings)
    handle = serve.run(app, name=name, route_prefix=route_prefix)
    url_host = "127.0.0.1" if proxy.host in ("0.0.0.0", "::") else proxy.host
    url = f"http://{url_host}:{proxy.port}{route_prefix.rstrip('/')}"
    logger.info("%s: %s replicas of %s at %s", name, options.get("num_replicas", "autoscaled"), model, url)
    return RayDeployment(url=url, handle=handle, name=name)
