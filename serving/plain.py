"""The recommendation app under plain uvicorn, with no Serve: the ceiling that ``recsys bench
serve`` measures Serve against. The same FastAPI app and handler code as a Serve replica;
settings from the ``RECSYS_*`` environment.

    python -m uvicorn serving.plain:create --factory --port 28090 --workers 2
"""
from __future__ import annotations

from fastapi import FastAPI

from recsys.settings import Settings
from serving.app import RecsysService, app, install


def create() -> FastAPI:
    install(RecsysService(Settings()))
    return app
