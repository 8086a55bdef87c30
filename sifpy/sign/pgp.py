"""OpenPGP through GnuPG: clear-signing, strict clear-sign parsing, and verification.

The reference signs integrity metadata as an OpenPGP clear-signed message (RFC 4880
section 7; sylabs/sif pkg/integrity/clearsign.go). sifpy drives ``gpg`` with a private
``--homedir`` to sign, and ``gpgv`` with a keyring built from trusted keys only to verify.

Verification never trusts gpg's idea of the plaintext: :func:`parse_clearsigned` splits the
message itself, and the armored signature is checked by ``gpgv`` as a *detached* signature
over exactly the text that sifpy then parses. A message with two signatures, junk around the
armor, a non-text signature class or a hash outside {SHA-224, SHA-256, SHA-384, SHA-512}
(CVE-2022-39237; clearsign.go ``expectedHashes``) is refused.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sifpy.errors import SignatureError, ToolError
from sifpy.util.proc import PIPE, CompletedProcess, run

BEGIN_SIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
BEGIN_SIG = b"-----BEGIN PGP SIGNATURE-----"
END_SIG = b"-----END PGP SIGNATURE-----"
# OpenPGP hash algorithm IDs (RFC 4880 9.4) that a signature may use.
ALLOWED_PGP_HASHES = {8: "SHA256", 9: "SHA384", 10: "SHA512", 11: "SHA224"}
PGP_HASH_NAMES = {1: "MD5", 2: "SHA1", 3: "RIPEMD160", **ALLOWED_PGP_HASHES}
_ARMOR_LINE = re.compile(rb"^[A-Za-z0-9+/=]*$")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolError(
            f"can't find {name}: OpenPGP signing and verification need GnuPG",
            hint="install it (Debian: apt-get install gnupg gpgv)",
        )
    return path


def run_gpg(
    homedir: str,
    args: Sequence[str],
    *,
    stdin: bytes = b"",
    passphrase: str | None = None,
    tool: str = "gpg",
) -> CompletedProcess[bytes]:
    """Run ``gpg`` (or ``gpgv``) on ``homedir`` in batch mode; never prompts on a tty.

    A passphrase goes through a pipe (``--passphrase-fd``), never the command line.
    """
    argv = [_tool(tool), "--homedir", homedir]
    if tool == "gpg":
        argv += ["--batch", "--no-tty", "--no-greeting", "--no-permission-warning"]
    rfd = -1
    if passphrase is not None:
        rfd, wfd = os.pipe()
        os.write(wfd, passphrase.encode() + b"\n")  # a pipe holds far more than a passphrase
        os.close(wfd)
        argv += ["--pinentry-mode", "loopback", "--passphrase-fd", str(rfd)]
    try:
        return run(
            [*argv, *args],
            "run gpg",
            input=stdin,
            stdout=PIPE,
            pass_fds=(rfd,) if rfd >= 0 else (),
            ok=None,
        )
    finally:
        if rfd >= 0:
            os.close(rfd)


def stop_agent(homedir: str) -> None:
    """Stop the gpg-agent that gpg starts on its own for secret-key operations: it would
    outlive the command (a daemon per keyring, holding unlocked keys in memory). Called
    when a command ends; it waits until the agent is gone (its socket removed), so that a
    next command can't reach an agent that is shutting down and see no secret keys."""
    gpgconf = shutil.which("gpgconf")
    if gpgconf is None:
        return

    def gpgconf_run(*args: str) -> str:
        argv = [gpgconf, "--homedir", homedir, *args]
        return str(run(argv, "ask gpgconf", stdout=PIPE, text=True, ok=None).stdout).strip()

    socket = gpgconf_run("--list-dirs", "agent-socket")
    if not socket or not os.path.exists(socket):
        return  # no agent ran
    gpgconf_run("--kill", "gpg-agent")
    for _ in range(100):
        if not os.path.exists(socket):
            return
        time.sleep(0.02)


def gpg_failure(what: str, proc: CompletedProcess[bytes]) -> SignatureError:
    """A :class:`SignatureError` carrying the tail of gpg's stderr."""
    tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
    reason = "; ".join(line.removeprefix("gpg: ") for line in tail) or f"exit {proc.returncode}"
    return SignatureError(f"{what}: {reason}")


def clearsign(
    homedir: str, fingerprint: str, message: bytes, passphrase: str | None = None
) -> bytes:
    """Clear-sign ``message`` with the secret key ``fingerprint``, as the reference does.

    SHA-256 (the reference's packet.Config default, descriptor hashtype 1). The trailing
    newline gpg writes after the armor is dropped: Go's clearsign.Encode writes none.
    """
    proc = run_gpg(
        homedir,
        ["--digest-algo", "SHA256", "--local-user", fingerprint + "!", "--clearsign"],
        stdin=message,
        passphrase=passphrase if passphrase is not None else "",
    )
    if proc.returncode != 0:
        raise gpg_failure(f"can't sign with key {fingerprint}", proc)
    out = proc.stdout.rstrip(b"\r\n")
    if parse_clearsigned(out).text != message:
        raise SignatureError("can't sign: gpg altered the message while clear-signing")
    return out


@dataclass(frozen=True)
class ClearSigned:
    """A clear-signed message split into its signed text and armored signature."""

    text: bytes  # the signed text, dash-unescaped, lines joined by "\n", no final newline
    signature: bytes  # the armored signature block, BEGIN to END lines


def parse_clearsigned(data: bytes) -> ClearSigned:
    """Split a clear-signed message strictly (RFC 4880 section 7); :class:`SignatureError`."""
    lines = data.split(b"\n")
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[0] != BEGIN_SIGNED:
        raise SignatureError("not an OpenPGP clear-signed message")
    i = 1
    while i < len(lines) and lines[i]:
        if not lines[i].startswith(b"Hash: "):
            raise SignatureError("clear-signed message: unexpected armor header")
        i += 1
    if i == 1 or i >= len(lines):
        raise SignatureError("clear-signed message: missing Hash header")
    try:
        start = lines.index(BEGIN_SIG, i + 1)
    except ValueError:
        raise SignatureError("clear-signed message: no signature block") from None
    text = []
    for ln in lines[i + 1 : start]:
        if ln.startswith(b"-"):
            if not ln.startswith(b"- "):
                raise SignatureError("clear-signed message: bad dash escaping")
            ln = ln[2:]
        # Trailing whitespace is not signed (RFC 4880 7.1).
        text.append(ln.rstrip(b" \t"))
    sig = lines[start:]
    if sig[-1] != END_SIG or sig.count(BEGIN_SIG) != 1 or sig.count(END_SIG) != 1:
        raise SignatureError("clear-signed message: malformed or repeated signature block")
    body = sig[1:-1]
    if b"" not in body:
        raise SignatureError("clear-signed message: malformed signature armor")
    blank = body.index(b"")
    if not all(_ARMOR_LINE.match(ln) for ln in body[blank + 1 :]):
        raise SignatureError("clear-signed message: junk in the signature armor")
    return ClearSigned(b"\n".join(text), b"\n".join(sig) + b"\n")


def is_clearsigned(data: bytes) -> bool:
    return data.lstrip().startswith(BEGIN_SIGNED)


@dataclass(frozen=True)
class PgpVerified:
    """What a good OpenPGP signature proves: the text, who signed it, and with which hash."""

    text: bytes
    fingerprint: str  # the signer's primary key fingerprint, upper-case hex
    signing_key: str  # the (sub)key that made the signature
    user_id: str
    hash_name: str


def verify_clearsigned(data: bytes, keyring: bytes) -> PgpVerified:
    """Verify a clear-signed message against ``keyring`` (binary OpenPGP public keys) only.

    Raises :class:`SignatureError` saying what is wrong: unknown signer, bad signature,
    weak hash, several signatures.
    """
    msg = parse_clearsigned(data)
    if not keyring:
        raise SignatureError(
            "can't verify: no trusted OpenPGP public keys",
            hint="import the signer's key with 'sifpy key import FILE', or give --keyring",
        )
    with tempfile.TemporaryDirectory(prefix="sifpy-gpgv-") as tmp:
        os.chmod(tmp, 0o700)
        paths = {}
        for name, content in (
            ("keys.gpg", keyring),
            ("msg.txt", msg.text),
            ("msg.asc", msg.signature),
        ):
            paths[name] = os.path.join(tmp, name)
            with open(paths[name], "wb") as f:
                f.write(content)
        proc = run_gpg(
            tmp,
            [
                "--status-fd",
                "1",
                "--keyring",
                paths["keys.gpg"],
                paths["msg.asc"],
                paths["msg.txt"],
            ],
            tool="gpgv",
        )
    return _check_status(proc, msg.text)


def _check_status(proc: CompletedProcess[bytes], text: bytes) -> PgpVerified:
    status: list[list[str]] = []
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("[GNUPG:] "):
            status.append(line[9:].split(" "))
    words = [s[0] for s in status]
    if words.count("NEWSIG") > 1:
        raise SignatureError("clear-signed message holds more than one signature")
    for s in status:
        if s[0] == "ERRSIG" and len(s) > 6 and s[6] == "9":
            raise SignatureError(
                f"signed by an unknown key {s[1]}",
                hint="import the signer's public key ('sifpy key import FILE') if you trust it",
            )
        if s[0] == "ERRSIG":
            raise SignatureError(f"can't check signature by key {s[1]}: unsupported algorithm")
        if s[0] == "BADSIG":
            raise SignatureError(f"bad signature by key {s[1]}: the signed metadata was altered")
        if s[0] in ("EXPKEYSIG", "REVKEYSIG", "EXPSIG"):
            what = {"EXPKEYSIG": "expired key", "REVKEYSIG": "revoked key", "EXPSIG": "expired"}
            raise SignatureError(f"signature by {what[s[0]]} {s[1]} refused")
    valid = [s for s in status if s[0] == "VALIDSIG"]
    good = [s for s in status if s[0] == "GOODSIG"]
    if proc.returncode != 0 or len(valid) != 1 or len(good) != 1 or len(valid[0]) < 11:
        raise gpg_failure("can't verify OpenPGP signature", proc)
    v = valid[0]
    hash_id = int(v[8])
    if hash_id not in ALLOWED_PGP_HASHES:
        name = PGP_HASH_NAMES.get(hash_id, f"algorithm {hash_id}")
        raise SignatureError(
            f"signature uses the weak hash {name}; only SHA-224/256/384/512 are accepted",
            hint="re-sign the image with a current key and tool",
        )
    if v[9] != "01":
        raise SignatureError(f"signature class {v[9]} is not a text signature")
    uid = " ".join(good[0][2:])
    return PgpVerified(text, v[10].upper(), v[1].upper(), uid, ALLOWED_PGP_HASHES[hash_id])


def dearmor(data: bytes) -> bytes:
    """Binary packets from ASCII-armored OpenPGP data (any number of blocks); binary as is."""
    if b"-----BEGIN PGP" not in data:
        return data
    out = bytearray()
    for block in re.finditer(rb"-----BEGIN PGP [A-Z ]+-----\r?\n(.*?)-----END PGP", data, re.S):
        body = block.group(1).replace(b"\r", b"").split(b"\n\n", 1)
        b64 = body[-1] if len(body) > 1 else body[0]
        lines = [ln for ln in b64.split(b"\n") if ln and not ln.startswith(b"=")]
        try:
            out += base64.b64decode(b"".join(lines), validate=True)
        except ValueError:
            raise SignatureError("malformed ASCII-armored OpenPGP data") from None
    return bytes(out)
