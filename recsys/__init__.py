"""recsys: a real-time recommendation reference application."""
import os

__version__ = "0.1.0"

# Token authentication on (Ray's default for local clusters since 2.59), stated for the
# cluster and for every client, since a client that connects by address assumes it off.
# Ray reads these when it is imported, so they are set here, in the package every entry
# point imports first. The token lives in ~/.ray/auth_token, made by the first `ray start`.
#
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's one-machine mode (its default on macOS and
# Windows): the node's address is 127.0.0.1, so the GCS, raylet, agents and workers listen on
# loopback only, and drivers find the node there. On Kubernetes KubeRay starts Ray itself and
# sets its pods' addresses; nothing there reads this.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)
