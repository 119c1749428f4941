"""The events a webhook may subscribe to, shared by the server (which sends them) and
``deployctl webhook`` (which checks names before sending anything); imports nothing."""

DEPLOYMENT_STARTED = "deployment.started"
DEPLOYMENT_FINISHED = "deployment.finished"
AGENT_CONNECTED = "agent.connected"
AGENT_DISCONNECTED = "agent.disconnected"
ROLLOUT_FINISHED = "rollout.finished"

#: Every event a webhook may subscribe to.
EVENTS: tuple[str, ...] = (
    DEPLOYMENT_STARTED,
    DEPLOYMENT_FINISHED,
    AGENT_CONNECTED,
    AGENT_DISCONNECTED,
    ROLLOUT_FINISHED,
)
