"""A C-MOVE destination for one run: where a PACS that allows no C-GET sends what meddx
reads.

    meddx screen 'dimse://PACS@pacs:104?retrieve=move&move_to=MEDDX_MOVE&move_port=11113' ...

The PACS must know ``MEDDX_MOVE`` as a destination at the driver's host and that port.
While the run reads, a storage SCP (``meddx listen``'s Receiver, accepting only the
PACS's AE title) listens on ``move_port`` of every interface and keeps what the PACS
sends in a private temporary folder, the spool; each read task sends its instance's
C-MOVE and takes the file out of the spool (its locator names it: ``dimse.spooled``).
Each file is removed once read, and the spool with whatever is left in it when the
reads end.

The spool is on the driver's node, so the reads must run there: a Ray cluster of more
than one node is refused in one line (C-GET has no such bound). After the reads (a
night's heatmaps, say), an instance cannot be moved again: those reads say so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from meddx import MeddxError, secret
from meddx.imaging.dicom import pseudonym
from meddx.inputs import dimse, storage
from meddx.inputs.storage import StorageSettings

if TYPE_CHECKING:
    from meddx.pacs.receiver import Receiver

HOST = "0.0.0.0"  # the PACS connects to the host it knows the destination at


@contextmanager
def dimse_spool(cfg, located: dict[str, str] | None) -> Iterator[dict[str, str] | None]:
    """``located`` as it is, unless INPUT is a DIMSE source read by C-MOVE: then, while
    the block runs, a receiver for the PACS's C-STORE sub-operations, and each locator
    with the spool file its instance is to arrive at."""
    target = dimse.peer(cfg.input) if located and dimse.is_source(cfg.input) else None
    move = dimse.move_of(target) if target else None
    if move is None:
        yield located
        return
    import ray

    from meddx.pacs.receiver import Receiver  # pynetdicom: C-MOVE runs only

    if ray.is_initialized() and sum(1 for node in ray.nodes() if node["Alive"]) > 1:
        raise MeddxError(
            "retrieve=move reads on the driver's node alone (its C-MOVE receiver's spool "
            "is there): use C-GET, or a one-node Ray"
        )
    ae_title, port = move
    key = secret.pseudonym_key()
    with tempfile.TemporaryDirectory(prefix="meddx-spool-") as spool:  # mode 0700
        receiver = Receiver(spool, StorageSettings(), key, ae_title, allow_ae=(target.ae_title,))
        try:
            receiver.start(HOST, port)
        except OSError as exc:
            raise MeddxError(f"cannot receive C-MOVE on port {port}: {exc.strerror}") from None
        try:
            yield {
                uri: dimse.spooled(loc, spool_file(receiver, loc, key))
                for uri, loc in located.items()
            }
        finally:
            receiver.stop()


def spool_file(receiver: Receiver, locator: str, key: bytes) -> str:
    """Where ``receiver`` keeps the instance of ``locator``: SPOOL/STUDY/INSTANCE.dcm,
    each the keyed pseudonym of its UID."""
    _, study, _, sop, _ = dimse.locator_parts(locator)
    return storage.join(receiver.archive, pseudonym(study, key), f"{pseudonym(sop, key)}.dcm")
