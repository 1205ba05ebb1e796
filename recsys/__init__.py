"""recsys: a real-time recommendation reference application."""
import os

__version__ = "0.1.0"

# Token authentication on (Ray's default for local clusters since 2.59), stated for the
# cluster and for every client, since a client that connects by address assumes it off.
# Ray reads these when it is imported, so they are set here, in the package every entry
# point imports first. The token lives in ~/.ray/auth_token, made by the first `ray start`.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)
