"""A DICOM node a PACS can route to: a Storage SCP (C-ECHO, C-STORE) on pynetdicom, started by ``medvision serve``
when ``MEDVISION_DIMSE_PORT`` is set.

Who may send: calling AE titles on the allow-list (``MEDVISION_DIMSE_CALLERS``), each naming the site that owns
what it sends, optionally pinned to an address; anyone else is refused at association (or at the TCP connection,
for an address no entry allows; an allowed AE title from an address its entry does not pin is answered 0x0124 for every
instance). Every association and its outcome is one audit row.

What is kept: an instance is written as it arrived (the dataset's bytes with its file meta, never decoded or
transcoded on receive), fsynced, linked into the data folder and recorded in the database, and only then answered
Success; from there it joins the path STOW-RS instances take: the same "study stable" timer, job queue, results and
report. A disk under the free-space watermark answers 0xA700 before anything is written; an instance that is not a
usable image answers a failure naming why. Tomosynthesis and "For Processing" images are refused by name; SR, key
object and presentation-state objects of a study are accepted and not kept (a PACS routes whole studies).
"""

from __future__ import annotations

import logging
import os
import shutil
import socketserver
import threading
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from medvision.dicom_io import READABLE_SYNTAXES, ReadLimits
from medvision.errors import ConfigError
from medvision.serving.audit import FailureBudget, write_audit
from medvision.serving.identifiers import Owner, is_site
from medvision.serving.storage import DataFolder
from medvision.serving.stow import CANNOT_UNDERSTAND, PROCESSING_FAILURE, STUDY_MISMATCH, enqueue, store_file

log = logging.getLogger("medvision.serving.dimse")

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
# Scored: the image classes the reader takes (a colour or multi-frame instance is still refused by the reader).
SCORED = {
    MG_FOR_PRESENTATION: "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
# Accepted on the association, refused per instance by name: a PACS sending a whole study learns why.
REFUSED = {
    "1.2.840.10008.5.1.4.1.1.13.1.3": ("Breast Tomosynthesis Image Storage",
                                       "tomosynthesis is not scored: send the 2-D views"),
    "1.2.840.10008.5.1.4.1.1.1.2.1": ("Digital Mammography X-Ray Image Storage - For Processing",
                                      "For Processing images are not scored"),
    "1.2.840.10008.5.1.4.1.1.1.1.1": ("Digital X-Ray Image Storage - For Processing",
                                      "For Processing images are not scored"),
}
# Accepted and not kept: other objects of a study a PACS routes whole.
IGNORED = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.50": "Mammography CAD SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State Storage",
}
# Non-image objects are sent in a plain encoding.
PLAIN_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
VERIFICATION = "1.2.840.10008.1.1"

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS, OUT_OF_RESOURCES, NOT_AUTHORISED, SOP_CLASS_NOT_SUPPORTED = 0x0000, 0xA700, 0x0124, 0x0122
DATASET_MISMATCH, CANNOT_UNDERSTAND_STATUS, PROCESSING_FAILURE_STATUS = 0xA900, 0xC000, 0x0110


@dataclass(frozen=True)
class Sender:
    """An allowed calling AE: the site its instances belong to, and the address it must come from (if pinned)."""

    ae_title: str
    site: str
    address: str | None = None


def parse_callers(text: str) -> dict[str, Sender]:
    """``AET=SITE[@ADDRESS]`` entries, comma-separated (``PACS1=site-a@10.0.0.5,ORTHANC=site-b``)."""
    senders: dict[str, Sender] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        aet, _, rest = entry.partition("=")
        site, _, address = rest.partition("@")
        aet, site, address = aet.strip(), site.strip(), address.strip()
        if not (0 < len(aet) <= 16) or not aet.isascii() or "\\" in aet or not aet.isprintable():
            raise ValueError(f"{aet!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
        if not is_site(site):
            raise ValueError(f"the site of {aet} must be 1-64 letters, digits or . _ @ - (got {site!r})")
        senders[aet] = Sender(aet, site, address or None)
    return senders


def status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


@dataclass
class _Tally:
    stored: int = 0
    already: int = 0
    ignored: int = 0
    refused: dict[str, int] = field(default_factory=dict)


class StorageSCP:
    """The Storage SCP, on its own threads (one per association; pynetdicom's threaded server)."""

    def __init__(self, settings, sessions: sessionmaker[Session], data: DataFolder, metrics=None,
                 wake: threading.Event | None = None, failures: FailureBudget | None = None) -> None:
        self.settings, self.sessions, self.data, self.metrics, self.wake = settings, sessions, data, metrics, wake
        self.failures = failures or FailureBudget()
        self.senders = parse_callers(settings.dimse_callers)
        self.limits = ReadLimits(max_pixels=settings.max_pixels)
        self.server = None
        self._tallies: dict[int, _Tally] = {}
        self._lock = threading.Lock()

    # -- the application entity ------------------------------------------------------------------------------

    def _ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.settings.dimse_ae_title)
        ae.require_calling_aet = list(self.senders)
        ae.maximum_associations = self.settings.dimse_max_associations
        ae.acse_timeout = self.settings.dimse_acse_timeout
        ae.dimse_timeout = self.settings.dimse_dimse_timeout
        ae.network_timeout = self.settings.dimse_network_timeout
        ae.maximum_pdu_size = 0  # no limit: a full-field image in few PDUs
        for uid in (*SCORED, *REFUSED):
            ae.add_supported_context(uid, list(READABLE_SYNTAXES))
        for uid in IGNORED:
            ae.add_supported_context(uid, list(PLAIN_SYNTAXES))
        ae.add_supported_context(VERIFICATION, list(PLAIN_SYNTAXES))
        return ae

    def start(self) -> None:
        import ssl

        from pynetdicom import evt

        if not self.senders:
            raise ConfigError("MEDVISION_DIMSE_PORT is set but MEDVISION_DIMSE_CALLERS names no calling AE: nobody "
                              "could send (give AET=SITE entries)")

        context = None
        if self.settings.dimse_tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self.settings.dimse_tls_cert, self.settings.dimse_tls_key)
            if self.settings.dimse_tls_ca:  # mutual TLS: the PACS presents a certificate of this CA
                context.load_verify_locations(self.settings.dimse_tls_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_ACCEPTED, self._accepted), (evt.EVT_REJECTED, self._rejected),
                    (evt.EVT_RELEASED, self._ended), (evt.EVT_ABORTED, self._ended)]
        from pynetdicom.transport import ThreadedAssociationServer

        scp = self

        class Server(ThreadedAssociationServer):
            def verify_request(self, request, client_address) -> bool:  # before any DICOM is read
                return scp._address_allowed(request, client_address)

            def shutdown(self) -> None:  # this server was never in the AE's list of servers it started itself
                socketserver.TCPServer.shutdown(self)
                self.server_close()

        self.server = self._ae().make_server((self.settings.dimse_host, self.settings.dimse_port), ssl_context=context,
                                             evt_handlers=handlers, server_class=Server)
        threading.Thread(target=self.server.serve_forever, name="medvision-dimse", daemon=True).start()
        log.info("DICOM storage SCP %s listening on %s:%d (%d allowed caller(s)%s)", self.settings.dimse_ae_title,
                 self.settings.dimse_host, self.port, len(self.senders), ", TLS" if context else "")

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.settings.dimse_port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # -- who may send ----------------------------------------------------------------------------------------

    def _address_allowed(self, request, client_address) -> bool:
        pinned = {s.address for s in self.senders.values()}
        if None in pinned or client_address[0] in pinned:
            return True
        suppressed = self.failures.take(client_address[0])  # anyone can connect: audited within a budget
        if suppressed is not None:
            write_audit(self.sessions, "dimse_refused", 403, "", address=client_address[0], reason="address",
                        **({"suppressed": suppressed} if suppressed else {}))
        return False

    def _sender(self, assoc) -> Sender | None:
        sender = self.senders.get(assoc.requestor.ae_title.strip())
        if sender is None or (sender.address and assoc.requestor.address != sender.address):
            return None
        return sender

    def _accepted(self, event) -> None:
        assoc = event.assoc
        sender = self._sender(assoc)
        if sender is None:  # an allowed AE title from an address it is not pinned to: every C-STORE gets 0x0124
            suppressed = self.failures.take(assoc.requestor.address)
            if suppressed is not None:
                write_audit(self.sessions, "dimse_refused", 403, assoc.requestor.ae_title.strip(),
                            address=assoc.requestor.address, reason="address for this AE title",
                            **({"suppressed": suppressed} if suppressed else {}))
            return
        with self._lock:
            self._tallies[id(assoc)] = _Tally()
        if self.metrics:
            self.metrics.dimse_associations.labels("accepted").inc()

    def _rejected(self, event) -> None:
        assoc = event.assoc
        suppressed = self.failures.take(assoc.requestor.address)  # a flood of refusals is audited within a budget
        if suppressed is not None:
            write_audit(self.sessions, "dimse_refused", 403, assoc.requestor.ae_title.strip(),
                        address=assoc.requestor.address, reason="calling AE title or association limit",
                        **({"suppressed": suppressed} if suppressed else {}))
        if self.metrics:
            self.metrics.dimse_associations.labels("rejected").inc()

    def _ended(self, event) -> None:
        assoc = event.assoc
        with self._lock:
            tally = self._tallies.pop(id(assoc), None)
        if tally is None:
            return
        released = assoc.is_released
        write_audit(self.sessions, "dimse_association", 200 if released else 499, assoc.requestor.ae_title.strip(),
                    address=assoc.requestor.address, outcome="released" if released else "aborted",
                    stored=tally.stored, already_stored=tally.already, ignored=tally.ignored, refused=tally.refused)

    # -- C-STORE ---------------------------------------------------------------------------------------------

    def _refused(self, assoc, reason: str, code: int, comment: str) -> Dataset:
        with self._lock:
            tally = self._tallies.get(id(assoc))
            if tally is not None:
                tally.refused[reason] = tally.refused.get(reason, 0) + 1
        if self.metrics:
            self.metrics.dimse_instances.labels("refused").inc()
        return status(code, comment)

    def _store(self, event):
        assoc = event.assoc
        sender = self._sender(assoc)
        if sender is None:
            return self._refused(assoc, "not_authorised", NOT_AUTHORISED, "calling AE not allowed from here")
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class in IGNORED:
            with self._lock:
                if (tally := self._tallies.get(id(assoc))) is not None:
                    tally.ignored += 1
            if self.metrics:
                self.metrics.dimse_instances.labels("ignored").inc()
            return SUCCESS
        if sop_class in REFUSED:
            return self._refused(assoc, "not_scored", SOP_CLASS_NOT_SUPPORTED, REFUSED[sop_class][1])
        if shutil.disk_usage(self.data.root).free < self.settings.dimse_min_free_bytes:
            log.error("C-STORE refused: the data folder's disk is below its free-space watermark")
            return self._refused(assoc, "out_of_resources", OUT_OF_RESOURCES, "out of disk space")
        try:
            fd, path = self.data.temporary(".dcm")
            with os.fdopen(fd, "wb") as fh:
                fh.write(event.encoded_dataset(include_meta=True))  # as it arrived: never decoded or transcoded
                fh.flush()
                os.fsync(fh.fileno())
            outcome = store_file(path, self.sessions, self.data, Owner(sender.site), None, self.limits)
            if outcome.failure is None:
                enqueue(self.sessions, {(sender.site, outcome.study_instance_uid)},
                        self.settings.study_stable_seconds)
        except OSError as exc:  # the disk filled up while writing, or another I/O failure: nothing was recorded
            log.error("C-STORE not stored: %s", type(exc).__name__)
            return self._refused(assoc, "out_of_resources", OUT_OF_RESOURCES, "could not write the instance")
        except Exception as exc:  # the database is unavailable: not recorded, so not acknowledged
            log.error("C-STORE not recorded: %s", type(exc).__name__)
            return self._refused(assoc, "processing_failure", PROCESSING_FAILURE_STATUS, "could not record it")
        if outcome.failure is not None:
            code = {CANNOT_UNDERSTAND: CANNOT_UNDERSTAND_STATUS, STUDY_MISMATCH: DATASET_MISMATCH,
                    PROCESSING_FAILURE: PROCESSING_FAILURE_STATUS}.get(outcome.failure, DATASET_MISMATCH)
            return self._refused(assoc, outcome.reason.split(":")[0] or "refused", code, outcome.reason)
        with self._lock:
            if (tally := self._tallies.get(id(assoc))) is not None:
                tally.stored += not outcome.already_stored
                tally.already += outcome.already_stored
        if self.metrics:
            self.metrics.dimse_instances.labels("stored").inc()
        if self.wake is not None:
            self.wake.set()
        return SUCCESS


# -- reports back by C-STORE --------------------------------------------------------------------------------------

def send_files(settings, paths: list[str]) -> None:
    """C-STORE ``paths`` (the SR and its captures) to ``settings.dimse_destination`` in one association, each in the
    encoding it was written in; raises naming what went wrong."""
    import ssl

    from pydicom import dcmread
    from pynetdicom import AE

    from medvision.serving.settings import parse_destination

    aet, host, port = parse_destination(settings.dimse_destination)
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    ae = AE(ae_title=settings.dimse_ae_title)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (settings.dimse_acse_timeout, settings.dimse_dimse_timeout,
                                                             settings.dimse_network_timeout)
    for ds in headers:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    tls = None
    if settings.dimse_destination_tls:
        context = ssl.create_default_context(cafile=settings.dimse_tls_ca)
        if settings.dimse_tls_cert:
            context.load_cert_chain(settings.dimse_tls_cert, settings.dimse_tls_key)
        tls = (context, host)
    assoc = ae.associate(host, port, ae_title=aet, tls_args=tls)
    if not assoc.is_established:
        raise ConnectionError(f"the destination {aet} did not accept an association")
    try:
        for path in paths:
            answer = assoc.send_c_store(path)
            code = getattr(answer, "Status", None)
            if code is None:
                raise ConnectionError("no answer to C-STORE (timed out or aborted)")
            if code != 0 and not 0xB000 <= code <= 0xBFFF:  # warnings are stored too
                raise ConnectionError(f"the destination answered C-STORE with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
