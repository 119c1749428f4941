"""Deploy Center plugin: ``deploy.docker`` runs a container image on the target host, and the
``previous_container`` rollback strategy puts the container it replaced back.

The docker SDK is blocking; :mod:`deploy_docker.engine` runs every call in a thread with a
timeout so the agent's event loop never waits on the engine.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
