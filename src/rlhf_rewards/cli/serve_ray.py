"""The ``--ray`` flags of ``rlhf-rewards serve``: the same app as Ray Serve replicas, one per GPU, behind Ray
Serve's proxy (docs/ray.md). Ray is imported only when ``--ray`` is given."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any, Optional

from .options import bounded, json_object

logger = logging.getLogger(__name__)

_RAY_ONLY = ("replicas", "min_replicas", "max_replicas", "num_gpus_per_replica", "ray_actor_options", "address")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Ray Serve", "with --ray, the server runs as Ray Serve replicas, each loading the model once on its own GPU; "
        "--host/--port are then the address of Ray Serve's proxy")
    group.add_argument("--ray", action="store_true", help="serve through Ray Serve (needs the 'ray' extra)")
    group.add_argument("--replicas", type=bounded(int, 1), help="a fixed number of replicas (default 1)")
    group.add_argument("--min-replicas", type=bounded(int, 0),
                       help="autoscale between --min-replicas and --max-replicas")
    group.add_argument("--max-replicas", type=bounded(int, 1))
    group.add_argument("--num-gpus-per-replica", type=bounded(float, 0),
                       help="GPUs each replica reserves (default: 1 if the cluster has GPUs, else 0)")
    group.add_argument("--num-cpus-per-replica", type=bounded(float, 0), default=1.0,
                       help="CPUs each replica reserves")
    group.add_argument("--ray-actor-options", type=json_object, metavar="JSON",
                       help="more Ray actor options per replica, e.g. '{\"resources\": {\"reward_node\": 1}}' "
                            "to place replicas on the nodes started with that resource")
    group.add_argument("--address",
                       help="Ray cluster to deploy on: auto, ray://head:10001 or host:port (default: start Ray on "
                            "this machine, loopback-only unless --host is another address)")
    group.add_argument("--route-prefix", default="/", help="path of the app on the proxy (default /)")
    group.add_argument("--app-name", default="rlhf-rewards", help="Ray Serve application name")
    group.add_argument("--max-ongoing-requests", type=bounded(int, 1), default=128,
                       help="requests in flight per replica, batched together (default 128)")
    group.add_argument("--target-ongoing-requests", type=bounded(float, 0, above=True), default=32,
                       help="with autoscaling: requests in flight per replica to aim at (default 32)")


def misuse(args: argparse.Namespace) -> Optional[str]:
    """Why these flags cannot be served (Ray flags without ``--ray``, replicas given twice), or ``None``."""
    if not args.ray:
        given = [f"--{name.replace('_', '-')}" for name in _RAY_ONLY if getattr(args, name) is not None]
        return f"{', '.join(given)} need --ray" if given else None
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        return "give either --replicas or --min-replicas/--max-replicas"
    if (args.min_replicas is None) != (args.max_replicas is None):
        return "autoscaling needs both --min-replicas and --max-replicas"
    if args.min_replicas is not None and args.min_replicas > args.max_replicas:
        return f"--min-replicas {args.min_replicas} is more than --max-replicas {args.max_replicas}"
    return None


def run(args: argparse.Namespace, load_kwargs: dict[str, Any], engine_kwargs: dict[str, Any], settings) -> int:
    """Deploy, serve until SIGTERM/SIGINT, then remove the application (in-flight requests finish first) and stop
    the Ray this command started (a cluster given with ``--address`` keeps running). Exit code 0 after a clean
    stop, 1 if the replicas could not start, 2 for a wrong setup."""
    try:
        from ..serving import ray as ray_serving
    except ImportError as err:
        print(f"rlhf-rewards serve --ray needs the 'ray' extra: pip install -e \".[ray]\" in a checkout ({err})",
              file=sys.stderr)
        return 2
    try:
        deployed = ray_serving.deploy(
            args.model, replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
            num_gpus_per_replica=args.num_gpus_per_replica, num_cpus_per_replica=args.num_cpus_per_replica,
            ray_actor_options=args.ray_actor_options,
            load_kwargs=load_kwargs, engine_kwargs=engine_kwargs, settings=settings, address=args.address,
            host=args.host, port=args.port, route_prefix=args.route_prefix, name=args.app_name,
            max_ongoing_requests=args.max_ongoing_requests, target_ongoing_requests=args.target_ongoing_requests)
    except (ValueError, ConnectionError) as err:  # a wrong setup, or no Ray cluster at --address
        print(f"rlhf-rewards serve: {err}", file=sys.stderr)
        ray_serving.shutdown()
        return 2
    except RuntimeError as err:  # Ray Serve gave up on the replicas (e.g. the model does not load)
        print(f"rlhf-rewards serve: the replicas did not start: {err}", file=sys.stderr)
        ray_serving.shutdown()
        return 1
    print(f"rlhf-rewards serve: {args.model} on Ray Serve at {deployed.url} (application {deployed.name!r})",
          flush=True)
    stop = threading.Event()
    # replaces ray.init's SIGTERM handler, which exits at once, without draining
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    logger.info("stopping: removing application %s", deployed.name)
    deployed.delete()
    ray_serving.shutdown()
    return 0
