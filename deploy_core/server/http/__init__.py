"""The HTTP layer of the server: the Starlette app (:mod:`.api`), its routes, the shapes of its
answers and its OpenAPI document.

It depends on the server's services (records and their rows, dispatch, rollbacks); none of those
imports anything from here.  :func:`deploy_core.server.http.api.create_app` is what
:class:`~deploy_core.server.app.DeployServer` mounts.
"""
