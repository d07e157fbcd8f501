"""What a route may use of the service, as FastAPI dependencies: a route names what it needs in its signature
(``db: Database``, ``engine: LoadedEngine``...) instead of reaching into ``request.app.state``. The caller (an API
key) comes from ``auth.require``; the signed-in reader of the review UI from ``SignedIn`` / ``SignedInAdmin`` /
``PageReader`` here.

They are ``async`` because they only read the app's state: FastAPI runs a plain ``def`` dependency in a worker
thread, and on a busy service each such hand-off costs the event loop more than the lookup itself.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from medvision.serving.engine import Engine
from medvision.serving.metrics import Metrics
from medvision.serving.settings import Settings
from medvision.serving.storage import DataFolder


async def _database(request: Request) -> sessionmaker[Session]:
    return request.app.state.db


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _engine(request: Request) -> Engine:
    return request.app.state.engine


async def _data(request: Request) -> DataFolder:
    return request.app.state.data


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _state(request: Request):
    """The app's state, for the few routes that hand several of its parts to one helper (e.g. the decode pool
    and the batcher of ``predict``)."""
    return request.app.state


Database = Annotated[sessionmaker[Session], Depends(_database)]
ServiceSettings = Annotated[Settings, Depends(_settings)]
LoadedEngine = Annotated[Engine, Depends(_engine)]
Data = Annotated[DataFolder, Depends(_data)]
ServiceMetrics = Annotated[Metrics, Depends(_metrics)]
State = Annotated[object, Depends(_state)]
