"""Reports back to the PACS, delivered until they arrive: by C-STORE (``dimse``) and by STOW-RS (``stow``).

A study whose report is due has its route's ``*_next_at`` set. Between jobs, the job worker sends what is due, one
study at a time, claimed with a compare-and-set so two service processes never send one twice. A failure (the
PACS down, refusing, timing out) ends the round (the others would most likely fail too, and scoring waits while a
round runs) and is recorded on the study (``*_error``, ``*_attempts``, visible in
``GET /v1/studies/{uid}`` and the ``medvision_results_sent`` metric) and tried again with back-off: 5 s, 15 s,
1 min, 5 min, 15 min, then every hour until it goes through. Nothing is dropped.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from medvision.serving.storage import DataFolder
from medvision.serving.tables import Study, utcnow

log = logging.getLogger("medvision.serving.delivery")
RETRY_SECONDS = (5, 15, 60, 300, 900, 3600)  # after each failed attempt; then every hour until it goes through


@dataclass(frozen=True)
class Route:
    """One way back: its name (the metric's ``via``) and the study's columns that keep its state."""

    via: str
    next_at: str
    attempts: str
    error: str
    sent_at: str

    def column(self, name: str):
        return getattr(Study, getattr(self, name))


DIMSE = Route("dimse", "dimse_next_at", "dimse_attempts", "dimse_error", "dimse_sent_at")
STOW = Route("stow", "push_next_at", "push_attempts", "push_error", "pushed_at")


def due_now(route: Route) -> dict:
    """The values that make a (new) report due on ``route`` at once."""
    return {route.next_at: utcnow(), route.sent_at: None, route.error: "", route.attempts: 0}


def deliver_due(route: Route, send: Callable[[list[str]], None], sessions: sessionmaker[Session], data: DataFolder,
                lease_seconds: float, metrics=None) -> int:
    """Send every report due on ``route`` with ``send(paths)`` (the report's files, inside the data folder);
    returns how many went through."""
    next_at = route.column("next_at")
    sent = 0
    while True:
        now = utcnow()
        with sessions() as db:
            study = db.scalar(select(Study).where(next_at.is_not(None), next_at <= now).order_by(next_at).limit(1))
            if study is None:
                return sent
            due = getattr(study, route.next_at)
            lease = now + _dt.timedelta(seconds=lease_seconds)  # a sender that dies mid-way: tried again after it
            claimed = db.execute(update(Study).where(Study.id == study.id, next_at == due)
                                 .values({route.next_at: lease})).rowcount
            db.commit()
        if claimed != 1:
            continue  # another worker took it
        attempts = getattr(study, route.attempts) + 1
        try:
            send([str(data.inside(p)) for p in study.report_files or [study.report_path]])
        except Exception as exc:  # the destination is down, refuses, or times out: try again later
            delay = RETRY_SECONDS[min(attempts - 1, len(RETRY_SECONDS) - 1)]
            log.warning("sending a report by %s failed (attempt %d, next in %d s): %s", route.via, attempts, delay,
                        type(exc).__name__)
            values = {route.attempts: attempts, route.error: f"{type(exc).__name__}: {exc}"[:256],
                      route.next_at: utcnow() + _dt.timedelta(seconds=delay)}
            outcome = "failed"
            stop = True  # the destination is likely down for the others too: they wait for the next round
        else:
            values = {route.attempts: attempts, route.error: "", route.sent_at: utcnow(), route.next_at: None}
            sent += 1
            outcome, stop = "sent", False
        if metrics:
            metrics.results_sent.labels(route.via, outcome).inc()
        with sessions() as db:
            db.execute(update(Study).where(Study.id == study.id).values(values))
            db.commit()
        if stop:
            return sent
