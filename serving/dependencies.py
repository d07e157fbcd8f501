"""What a route may use of the service, as FastAPI dependencies: a route names what it needs in its signature
(``db: Database``, ``engine: LoadedEngine``...) instead of reaching into ``request.app.state``. The caller (an API
key) comes from ``auth.require``; the signed-in reader of the review UI from ``SignedIn`` / ``SignedInAdmin`` /
``PageReader`` here.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from medvision.serving.engine import Engine
from medvision.serving.metrics import Metrics
from medvision.serving.settings import Settings
from medvision.serving.storage import DataFolder


def _database(request: Request) -> sessionmaker[Session]:
    return request.app.state.db


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _data(request: Request) -> DataFolder:
    return request.app.state.data


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _state(request: Request):
    """The app's state, for the few routes that hand several of its parts to one helper (e.g. the decode pool
    and the batcher of ``predict``)."""
    return request.app.state


Database = Annotated[sessionmaker[Session], Depends(_database)]
ServiceSettings = Annotated[Settings, Depends(_settings)]
LoadedEngine = Annotated[Engine, Depends(_engine)]
Data = Annotated[DataFolder, Depends(_data)]
ServiceMetrics = Annotated[Metrics, Depends(_metrics)]
State = Annotated[object, Depends(_state)]
