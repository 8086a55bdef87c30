"""Signing a SIF: one signature object per object group, added atomically.

As the reference's ``integrity.Signer`` (sylabs/sif pkg/integrity/sign.go): by default one
signature per group; ``group_ids`` signs those groups; ``object_ids`` signs just those objects
(one signature per group they fall in). Each signature is a Signature object (0x4005) in no
group, linked to its group (``group | 0xf0000000``), whose Extra holds the signature's hash
type and, for PGP, the signer's 20-byte primary-key fingerprint.

Every digest and signature is computed before the file is touched, and all signature objects
are then added in one atomic rewrite: the image gains all of them or none.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sifpy.errors import SignatureError
from sifpy.sif import format as F
from sifpy.sif.image import Descriptor, SifImage
from sifpy.sif.modify import modify
from sifpy.sif.objects import ObjectInput
from sifpy.sif.table import Writer
from sifpy.sif.write import now
from sifpy.sign import digest as D
from sifpy.sign import dsse, pgp
from sifpy.sign.keyring import Key, Keyring


@dataclass(frozen=True)
class SignedPayload:
    """A signature object's data and its descriptor's signature fields."""

    data: bytes
    hashtype: int
    entity: bytes  # 20-byte PGP fingerprint, or empty (DSSE)


class Signer(Protocol):
    """Something that turns integrity metadata JSON into a signature object."""

    def sign(self, payload: bytes) -> SignedPayload: ...

    def describe(self) -> str: ...


class PgpSigner:
    """Clear-signs with a secret key of a sifpy keyring (through gpg)."""

    def __init__(self, keyring: Keyring, key: Key, passphrase: str | None = None) -> None:
        self.keyring = keyring
        self.key = key
        self.passphrase = passphrase

    def sign(self, payload: bytes) -> SignedPayload:
        data = pgp.clearsign(self.keyring.ensure(), self.key.fingerprint, payload, self.passphrase)
        return SignedPayload(data, F.HashType.SHA256, bytes.fromhex(self.key.fingerprint))

    def describe(self) -> str:
        return f"{self.key.name} ({self.key.fingerprint})"


class DsseSigner:
    """Signs a DSSE envelope with one or more PEM private keys."""

    def __init__(self, keys: Sequence[dsse.PrivateKey]) -> None:
        self.keys = list(keys)

    def sign(self, payload: bytes) -> SignedPayload:
        return SignedPayload(dsse.sign_envelope(payload, self.keys), F.HashType.SHA256, b"")

    def describe(self) -> str:
        return ", ".join(dsse.keyid(k.public_key()) for k in self.keys)


@dataclass(frozen=True)
class GroupSignature:
    """What was signed: a group, its covered objects, and the new signature object's ID."""

    group_id: int
    objects: tuple[int, ...]
    signature_id: int


def _plan(
    img: SifImage, group_ids: Sequence[int], object_ids: Sequence[int]
) -> list[tuple[int, list[Descriptor]]]:
    plan: list[tuple[int, list[Descriptor]]] = []
    for gid in group_ids:
        objs = [d for d in img.descriptors if d.group_id == gid]
        if gid <= 0 or not objs:
            raise SignatureError(f"can't sign: object group {gid} not found in {img.path}")
        plan.append((gid, objs))
    if object_ids:
        by_group: dict[int, list[Descriptor]] = {}
        for oid in object_ids:
            d = img.get(oid)
            if d.group_id == 0:
                raise SignatureError(
                    f"can't sign: object {oid} is in no object group",
                    hint="only grouped objects can be signed",
                )
            by_group.setdefault(d.group_id, []).append(d)
        plan += sorted(by_group.items())
    if not plan:
        groups = sorted({d.group_id for d in img.descriptors if d.group_id})
        if not groups:
            raise SignatureError(f"can't sign: {img.path} has no object groups")
        plan = [(g, [d for d in img.descriptors if d.group_id == g]) for g in groups]
    return [(g, sorted({d.id: d for d in objs}.values(), key=lambda d: d.id)) for g, objs in plan]


def sign_image(
    path: str | os.PathLike[str],
    signer: Signer,
    *,
    group_ids: Iterable[int] = (),
    object_ids: Iterable[int] = (),
    digest: str = D.DEFAULT_DIGEST,
    deterministic: bool = False,
    t: int | None = None,
) -> list[GroupSignature]:
    """Sign the image at ``path``; returns one :class:`GroupSignature` per signature added."""
    p = os.fspath(path)
    payloads: list[tuple[int, tuple[int, ...], SignedPayload]] = []
    with SifImage.open(p) as img:
        before = os.fstat(img.fd)
        for gid, objs in _plan(img, list(group_ids), list(object_ids)):
            md = D.image_metadata(img, gid, objs, digest)
            payloads.append((gid, tuple(d.id for d in objs), signer.sign(md.to_json())))
    when = t if t is not None else (F.ZERO_TIME if deterministic else now())
    added: list[GroupSignature] = []

    def change(w: Writer) -> bool:
        st = os.stat(p)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        ):
            raise SignatureError(f"can't sign: {p} changed while it was being signed")
        for gid, ids, sp in payloads:
            obj = ObjectInput.signature(
                sp.data, sp.hashtype, sp.entity, group_id=0, linked_id=gid, link_to_group=True
            )
            added.append(GroupSignature(gid, ids, w.add(obj, when)))
        w.h = w.h.replace(modified_at=when)
        return True

    # One atomic rewrite for all signatures (sif/modify.py's clone-and-rename).
    modify(p, change)
    return added
