"""Deploy Center plugin: ``docker.monitor``, container state and usage from every agent.

- agent side (:mod:`monitor_docker.sampler`): every ``interval`` seconds one batched
  ``docker.monitor`` event with the state, health, CPU, memory and restarts of the containers
  Deploy Center manages (or of all containers);
- server side (:mod:`monitor_docker.store`, :mod:`monitor_docker.routes`): samples in the
  plugin's own tables with a retention, a current-state row per container, and
  ``GET /api/docker/monitor/{client_id}``.

Either side works without the other installed: a server without the plugin refuses the
events (the agent drops them), an agent without it sends none.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
