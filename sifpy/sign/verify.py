"""Verifying SIF signatures: modern (PGP clear-sign or DSSE) and, on request, legacy.

The algorithm is the reference's (sylabs/sif pkg/integrity/verify.go ``Verifier.Verify``)
with these checks, each the lesson of a published weakness:

1. every non-signature object is in a group (``errNonGroupedObject``);
2. by default every group is a task (CVE-2020-13846: "all" means all); ``group_ids`` or
   ``object_ids`` narrow it (object IDs allow a signed superset);
3. each task needs at least one signature linked to its group, and **every** linked
   signature must verify (no invalid signature is tolerated next to a good one);
4. cryptography first, against trusted keys only, with the hash allow-list
   (CVE-2022-39237); the JSON is parsed from verified bytes only;
5. the fingerprint in the signature descriptor must be the signer's (``errFingerprintMismatch``);
6. the signed object set equals the group's (an added or removed object fails);
7. the header digest, then each descriptor digest, then each object digest (CVE-2020-13847).

Legacy ``SIFHASH`` signatures cover object data only, never the header or descriptors, so
they are refused unless ``legacy=True``. The result lists the objects verified with their
offset and size so that a runtime can check that the partition it mounts is one of them
(:meth:`VerifyResult.covers`), reading through the same file descriptor (:func:`verify_fd`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sifpy.errors import SignatureError
from sifpy.sif import format as F
from sifpy.sif.image import Descriptor, SifImage
from sifpy.sign import digest as D
from sifpy.sign import dsse, pgp

MAX_SIGNATURE_SIZE = 1 << 20  # a clear-signed JSON for 48 objects is ~10 KiB


@dataclass(frozen=True)
class TrustedKeys:
    """Key material a verification trusts: binary OpenPGP public keys and DSSE public keys."""

    pgp: bytes = b""
    dsse: tuple[dsse.PublicKey, ...] = ()

    @classmethod
    def load(
        cls,
        dsse_keys: Iterable[str | os.PathLike[str]] = (),
        keyrings: Iterable[str | os.PathLike[str]] = (),
        keysdir: str | os.PathLike[str] | None = None,
        default_pgp: bool = True,
    ) -> TrustedKeys:
        """PEM public keys from ``dsse_keys``; OpenPGP keys from ``keyrings`` and, when
        ``default_pgp``, the sifpy keyring and Apptainer's public keyring."""
        from sifpy.sign.keyring import Keyring, trusted_keyring

        ring = Keyring(keysdir) if default_pgp else None
        blob = trusted_keyring(ring, tuple(keyrings), apptainer=default_pgp)
        return cls(blob, tuple(dsse.load_public_key(os.fspath(p)) for p in dsse_keys))


@dataclass(frozen=True)
class VerifiedObject:
    """An object whose descriptor and data a good signature covers."""

    id: int
    group_id: int
    data_type: int
    offset: int
    size: int


@dataclass
class SignatureResult:
    """The outcome of one signature object."""

    signature_id: int
    group_id: int  # the group it is linked to (0 for a legacy per-object signature)
    kind: str  # "pgp", "dsse", "legacy-pgp" or "unknown"
    signers: tuple[str, ...] = ()  # PGP fingerprints or DSSE key IDs that verified
    signer_names: tuple[str, ...] = ()  # PGP user IDs
    objects: tuple[int, ...] = ()  # object IDs it verified
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class VerifyResult:
    """Everything a verification found; :attr:`ok` only when nothing failed."""

    path: str
    signatures: list[SignatureResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # problems outside any one signature
    verified: list[VerifiedObject] = field(default_factory=list)
    unsigned: bool = False  # no signature object in scope at all
    legacy: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.signatures) and not self.errors and all(s.ok for s in self.signatures)

    def failures(self) -> list[str]:
        """Every failure, one line each, signature failures prefixed by their object."""
        out = list(self.errors)
        out += [f"signature object {s.signature_id}: {s.error}" for s in self.signatures if s.error]
        return out

    def check(self) -> VerifyResult:
        """Return self when verified; else raise :class:`SignatureError` with every failure."""
        if self.ok:
            return self
        fails = self.failures() or ["no signature verified"]
        hint = None
        if self.unsigned:
            hint = "the image is not signed: sign it with 'sifpy sign'"
        raise SignatureError(f"can't verify {self.path}: " + "; ".join(fails), hint=hint)

    def covers(self, d: Descriptor) -> bool:
        """Whether ``d`` (same ID, offset and size) is among the verified objects."""
        return self.ok and any(
            v.id == d.id and v.offset == d.offset and v.size == d.size for v in self.verified
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (what ``sifpy verify --json`` prints)."""
        return {
            "image": self.path,
            "verified": self.ok,
            "unsigned": self.unsigned,
            "legacy": self.legacy,
            "signatures": [
                {
                    "id": s.signature_id,
                    "group": s.group_id,
                    "kind": s.kind,
                    "signers": list(s.signers),
                    "signer_names": list(s.signer_names),
                    "objects": list(s.objects),
                    "error": s.error,
                }
                for s in self.signatures
            ],
            "objects": [v.__dict__ for v in self.verified],
            "errors": self.failures(),
        }


# --- selecting signatures ----------------------------------------------------------------


def _signature_data(img: SifImage, sig: Descriptor) -> bytes:
    if sig.size > MAX_SIGNATURE_SIZE:
        raise SignatureError(f"signature is {sig.size} bytes, too large to be one")
    return img.read(sig)


def _is_legacy(data: bytes) -> bool:
    """select.go isLegacySignature: clear-signed plaintext starting ``SIFHASH:``."""
    if not pgp.is_clearsigned(data):
        return False
    try:
        return pgp.parse_clearsigned(data).text.startswith(b"SIFHASH:\n")
    except SignatureError:
        return False


def _group_signatures(img: SifImage, group_id: int, legacy: bool) -> list[Descriptor]:
    out = []
    for d in img.find(F.DataType.SIGNATURE):
        if d.links_group and d.linked_id == group_id:
            try:
                data = _signature_data(img, d)
            except SignatureError:
                data = b""
            if _is_legacy(data) == legacy:
                out.append(d)
    return out


def _group_objects(img: SifImage, group_id: int) -> list[Descriptor]:
    return sorted((d for d in img.descriptors if d.group_id == group_id), key=lambda d: d.id)


# --- checking one signature --------------------------------------------------------------


def _authenticate(img: SifImage, sig: Descriptor, keys: TrustedKeys, res: SignatureResult) -> bytes:
    """Check the cryptographic signature; fill in the signer; return the signed bytes."""
    data = _signature_data(img, sig)
    extra = sig.signature()
    if dsse.is_envelope(data):
        res.kind = "dsse"
        v = dsse.verify_envelope(data, list(keys.dsse), extra.hashtype)
        res.signers = v.keyids
        return v.payload
    if pgp.is_clearsigned(data):
        res.kind = "legacy-pgp" if res.kind == "legacy-pgp" else "pgp"
        p = pgp.verify_clearsigned(data, keys.pgp)
        res.signers, res.signer_names = (p.fingerprint,), (p.user_id,)
        # verify.go errFingerprintMismatch: the descriptor must name the signing entity.
        recorded = extra.entity[:20].hex().upper()
        if recorded != p.fingerprint:
            raise SignatureError(
                f"fingerprint in descriptor ({recorded}) does not match the signing key "
                f"({p.fingerprint})"
            )
        return p.text
    raise SignatureError("unknown signature format (neither OpenPGP clear-sign nor DSSE)")


def _check_modern(
    img: SifImage,
    sig: Descriptor,
    group_id: int,
    objects: list[Descriptor],
    subset_ok: bool,
    keys: TrustedKeys,
) -> SignatureResult:
    res = SignatureResult(sig.id, group_id, "unknown")
    try:
        md = D.ImageMetadata.from_json(_authenticate(img, sig, keys, res))
        min_id = D.group_min_id(img, group_id)
        signed = {min_id + o.relative_id: o for o in md.objects}
        if not subset_ok:
            # metadata.go objectIDsMatch: the signed set is exactly the group.
            present = {d.id for d in objects}
            for d in objects:
                if d.id not in signed:
                    raise SignatureError(f"object {d.id}: object not signed (added after signing)")
            for oid in sorted(signed):
                if oid not in present:
                    raise SignatureError(
                        f"object {oid}: signed object not found (removed or regrouped)"
                    )
        if not D.header_matches(img, md.header):
            raise SignatureError(
                "header integrity compromised: launch script, magic, version or image UUID "
                "differs from what was signed"
            )
        done = []
        for d in objects:
            om = signed.get(d.id)
            if om is None:
                raise SignatureError(f"object {d.id}: object not signed")
            if not D.descriptor_matches(d, d.id - min_id, om.descriptor_digest):
                raise SignatureError(
                    f"object {d.id}: descriptor integrity compromised: data type, link, size, "
                    "name, extra (partition type/arch) or times differ from what was signed"
                )
            if not D.object_matches(img, d, om.object_digest):
                raise SignatureError(f"object {d.id}: data integrity compromised")
            done.append(d.id)
        res.objects = tuple(done)
    except SignatureError as exc:
        res.error = exc.message
    return res


def _check_legacy(
    img: SifImage, sig: Descriptor, group_id: int, objects: list[Descriptor], keys: TrustedKeys
) -> SignatureResult:
    res = SignatureResult(sig.id, group_id, "legacy-pgp")
    try:
        text = _authenticate(img, sig, keys, res)
        alg = D.LEGACY_HASHTYPES.get(sig.signature().hashtype)
        if alg is None:
            raise SignatureError(f"legacy signature hash type {sig.signature().hashtype} refused")
        hexval = text.removeprefix(b"SIFHASH:\n").removesuffix(b"\n")
        want = D.Digest.parse(f"{alg}:{hexval.decode('ascii', 'replace')}")
        if D.objects_digest(img, objects, alg) != want.value:
            ids = ", ".join(str(d.id) for d in objects)
            raise SignatureError(f"object {ids}: data integrity compromised")
        res.objects = tuple(d.id for d in objects)
    except SignatureError as exc:
        res.error = exc.message
    return res


# --- the verifier --------------------------------------------------------------------------


def verify_image(
    img: SifImage,
    keys: TrustedKeys,
    *,
    group_ids: Iterable[int] = (),
    object_ids: Iterable[int] = (),
    legacy: bool = False,
    legacy_all: bool = False,
) -> VerifyResult:
    """Verify ``img``; never raises for a bad signature (see :meth:`VerifyResult.check`).

    Raises :class:`SignatureError` only for bad requests (an unknown group or object).
    """
    res = VerifyResult(img.path, legacy=legacy or legacy_all)
    groups = sorted(set(group_ids))
    objs = sorted(set(object_ids))
    for gid in groups:
        if gid <= 0 or not _group_objects(img, gid):
            raise SignatureError(f"can't verify: object group {gid} not found in {img.path}")
    for oid in objs:
        img.get(oid)
    for d in img.descriptors:
        if d.group_id == 0 and d.data_type != F.DataType.SIGNATURE:
            res.errors.append(f"object {d.id}: not in an object group, so no signature covers it")
    res.unsigned = not img.find(F.DataType.SIGNATURE)
    if res.legacy:
        _legacy_tasks(img, keys, groups, objs, legacy_all, res)
    else:
        _modern_tasks(img, keys, groups, objs, res)
    if not res.signatures and not res.errors:
        res.errors.append("no signature found")
    _collect_verified(img, res)
    return res


def _modern_tasks(
    img: SifImage, keys: TrustedKeys, groups: list[int], objs: list[int], res: VerifyResult
) -> None:
    tasks: list[tuple[int, list[Descriptor], bool]] = []
    if not groups and not objs:
        groups = sorted({d.group_id for d in img.descriptors if d.group_id})
        if not groups:
            res.errors.append("image has no object groups: nothing is signed")
            res.unsigned = True
    tasks += [(g, _group_objects(img, g), False) for g in groups]
    for oid in objs:
        d = img.get(oid)
        if d.group_id == 0:
            res.errors.append(f"object {oid}: not in an object group, so it can't be signed")
            continue
        tasks.append((d.group_id, [d], True))
    for gid, objects, subset_ok in tasks:
        sigs = _group_signatures(img, gid, legacy=False)
        if not sigs:
            legacy = _group_signatures(img, gid, legacy=True) or any(
                _is_legacy(_signature_data(img, s)) for s in img.find(F.DataType.SIGNATURE)
            )
            res.errors.append(
                f"signature not found for object group {gid}"
                + (" (only legacy signatures, which need --legacy-insecure)" if legacy else "")
            )
            continue
        for sig in sigs:
            res.signatures.append(_check_modern(img, sig, gid, objects, subset_ok, keys))


def _legacy_tasks(
    img: SifImage,
    keys: TrustedKeys,
    groups: list[int],
    objs: list[int],
    legacy_all: bool,
    res: VerifyResult,
) -> None:
    # Reference (verify.go getLegacyTasks, apptainer verify): groups -> legacy group
    # signatures; objects -> signatures linked to the object; --all -> every grouped
    # non-signature object; neither -> the primary partition. sifpy extension: an object
    # with no signature of its own is covered by a legacy signature on its whole group.
    if legacy_all:
        objs = sorted(
            {d.id for d in img.descriptors if d.group_id and d.data_type != F.DataType.SIGNATURE}
            | set(objs)
        )
    elif not groups and not objs:
        prim = [d for d in img.descriptors if d.is_primary_partition()]
        if not prim:
            res.errors.append("image has no primary partition to verify; use --all or -g/-i")
        objs = [d.id for d in prim]
    done_groups: set[int] = set()
    for gid in groups:
        _legacy_group(img, keys, gid, res)
        done_groups.add(gid)
    for oid in objs:
        d = img.get(oid)
        sigs = [
            s
            for s in img.find(F.DataType.SIGNATURE)
            if not s.links_group and s.linked_id == oid and _is_legacy(_signature_data(img, s))
        ]
        if sigs:
            res.signatures += [_check_legacy(img, s, 0, [d], keys) for s in sigs]
        elif d.group_id and _group_signatures(img, d.group_id, legacy=True):
            if d.group_id not in done_groups:
                _legacy_group(img, keys, d.group_id, res)
                done_groups.add(d.group_id)
        else:
            res.errors.append(f"legacy signature not found for object {oid}")


def _legacy_group(img: SifImage, keys: TrustedKeys, gid: int, res: VerifyResult) -> None:
    sigs = _group_signatures(img, gid, legacy=True)
    if not sigs:
        res.errors.append(f"legacy signature not found for object group {gid}")
    objects = _group_objects(img, gid)
    res.signatures += [_check_legacy(img, s, gid, objects, keys) for s in sigs]


def _collect_verified(img: SifImage, res: VerifyResult) -> None:
    """Objects verified by at least one signature and not failed by any."""
    good: set[int] = set()
    for s in res.signatures:
        if s.ok:
            good |= set(s.objects)
    for d in img.descriptors:
        if d.id in good:
            res.verified.append(VerifiedObject(d.id, d.group_id, d.data_type, d.offset, d.size))


def verify_fd(
    fd: int,
    keys: TrustedKeys,
    *,
    path: str = "<fd>",
    group_ids: Iterable[int] = (),
    object_ids: Iterable[int] = (),
    require_primary: bool = True,
) -> VerifyResult:
    """Verify the image open on ``fd`` (the caller keeps it, and mounts from it).

    Modern signatures only. Raises :class:`SignatureError` unless every check passes and,
    with ``require_primary``, the primary partition is among the verified objects, so the
    caller can mount exactly the descriptor that was verified (never a path re-opened later).
    Returns the result; ``result.covers(descriptor)`` re-checks a descriptor before mounting.
    """
    img = SifImage.from_fd(fd, path)
    res = verify_image(img, keys, group_ids=group_ids, object_ids=object_ids).check()
    if require_primary:
        prim = img.primary_partition()
        if not res.covers(prim):
            raise SignatureError(
                f"can't verify {path}: primary partition (object {prim.id}) is not signed"
            )
    return res
