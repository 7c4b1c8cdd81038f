"""C2PA provenance for outputs (c2pa-python): a signed manifest saying the image is an AI edit of its
input. EDIT intent with the input as the `parentOf` ingredient (its SHA-256 in the ingredient's
metadata), a `c2pa.edited` action with digitalSourceType trainedAlgorithmicMedia, softwareAgent
kontext-engine and the model; no thumbnails unless asked (232 ms and 2.6 MB each at 1024²:
docs/safety-and-provenance.md, 'Provenance'). Signing is offline unless a timestamp authority URL is
given (one network call per image)."""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ProvenanceError
from .files import atomic_write_bytes, atomic_writer
from .images import ACCEPTED_FORMATS, OUTPUT_FORMATS, image_format, sniff_format
from .version import __version__

log = logging.getLogger(__name__)

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
INPUT_SHA256_KEY = "org.kontext-engine.sha256"  # in the parent ingredient's metadata
SOFTWARE_AGENT = {"name": "kontext-engine", "version": __version__}
ALGORITHMS = ("es256", "ps256")


@dataclass(frozen=True)
class SigningConfig:
    """Where the signing credentials are. cert: the PEM chain, leaf first (for C2PA validators to trust
    it, issued by a CA on the C2PA trust list); key: the leaf's private key, PEM; alg: es256 (P-256 key)
    or ps256 (RSA key); tsa_url: an RFC 3161 timestamp authority, None for no timestamp (offline)."""

    cert: Path
    key: Path
    alg: str = "es256"
    tsa_url: str | None = None
    thumbnails: bool = False


class ProvenanceSigner:
    """Signs encoded PNG/JPEG bytes. The PEM files are read once; each call builds its own c2pa Signer,
    Context and Builder (a Builder signs once), so concurrent calls share nothing mutable."""

    def __init__(self, config: SigningConfig) -> None:
        if config.alg.lower() not in ALGORITHMS:
            raise ProvenanceError(f"--c2pa-alg must be one of {', '.join(ALGORITHMS)}, got {config.alg!r}")
        self.config = config
        self._cert = _read_pem(config.cert, "--c2pa-cert", b"CERTIFICATE")
        self._key = _read_pem(config.key, "--c2pa-key", b"PRIVATE KEY")
        probe = _probe_png()
        self.sign(probe, parent=probe, model="probe")  # a wrong key or chain fails now, not per image

    @classmethod
    def from_files(
        cls, cert: str | Path, key: str | Path, *, alg: str = "es256", tsa_url: str | None = None
    ) -> ProvenanceSigner:
        return cls(SigningConfig(Path(cert), Path(key), alg, tsa_url))

    def sign(self, data: bytes, *, parent: bytes, model: str, title: str = "output") -> bytes:
        """`data` (an encoded PNG or JPEG) with a C2PA manifest embedded. parent: the encoded input image
        (the parentOf ingredient; if it carries its own C2PA manifest, that joins the chain). model: what
        made the edit."""
        import c2pa

        mime = _mime(data, "output")
        manifest: dict[str, Any] = {"claim_generator_info": [dict(SOFTWARE_AGENT)], "title": title}
        settings: dict[str, Any] = {"builder": {"thumbnail": {"enabled": self.config.thumbnails}}}
        provenanced = carries_c2pa(parent)
        if not provenanced:
            # No manifest to carry forward: describe the parent instead of streaming it through c2pa
            # (which would read and hash all of it again: a third of the signing time at 1024²).
            manifest["ingredients"] = [_parent_ingredient(parent)]
        try:
            builder = c2pa.Builder(manifest, context=c2pa.Context.from_dict(settings))
            builder.set_intent(c2pa.C2paBuilderIntent.EDIT)  # adds c2pa.opened on the parent
            if provenanced:  # the parent's own manifest becomes part of this one's chain
                builder.add_ingredient(_parent_ingredient(parent), _mime(parent, "input"), io.BytesIO(parent))
            builder.add_action(
                {
                    "action": "c2pa.edited",
                    "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": dict(SOFTWARE_AGENT),
                    "description": f"FLUX.1 Kontext [dev] edit ({model})",
                    "parameters": {"model": model},
                }
            )
            out = io.BytesIO()
            builder.sign(self._signer(), mime, io.BytesIO(data), out)
        except c2pa.C2paError as e:
            raise ProvenanceError(f"C2PA signing failed: {e}") from e
        return out.getvalue()

    def _signer(self) -> Any:
        import c2pa

        alg = getattr(c2pa.C2paSigningAlg, self.config.alg.upper())
        tsa = self.config.tsa_url.encode() if self.config.tsa_url else None
        return c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, self._cert, self._key, tsa))


def _parent_ingredient(parent: bytes) -> dict[str, Any]:
    return {
        "title": "input",
        "format": _mime(parent, "input"),
        "relationship": "parentOf",
        "metadata": {INPUT_SHA256_KEY: hashlib.sha256(parent).hexdigest()},
    }


def carries_c2pa(data: bytes) -> bool:
    """Whether an image carries a C2PA store: a PNG `caBX` chunk, a JPEG APP11 segment holding a JUMBF
    box labelled c2pa (found by walking chunk and segment headers, not scanning the pixels), or, for
    other formats, the label anywhere (a false positive only costs streaming the image through c2pa)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        pos = 8
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind == b"caBX":
                return True
            if kind == b"IEND":
                return False
            pos += 12 + length
        return False
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            if marker == 0xDA:  # start of scan: no more metadata segments
                return False
            if marker == 0xEB and b"c2pa" in data[pos + 4 : pos + 2 + length]:  # APP11
                return True
            pos += 2 + length
        return False
    return b"c2pa" in data


def _read_pem(path: Path, flag: str, kind: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProvenanceError(f"{flag} {path}: cannot read it ({e.strerror or e})") from e
    if b"-----BEGIN " not in data or kind not in data:
        raise ProvenanceError(f"{flag} {path}: not a PEM file with a {kind.decode()} block")
    return data


def _mime(data: bytes, what: str) -> str:
    """The MIME type of an output (PNG, JPEG) or, for what="input", of an input (also WebP)."""
    fmt = sniff_format(data)
    types = ACCEPTED_FORMATS if what == "input" else OUTPUT_FORMATS
    if fmt not in types:
        raise ProvenanceError(
            f"the {what} image is {fmt or 'not a known format'}; expected {', '.join(types)}"
        )
    return image_format(fmt).mime


def _probe_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class ManifestReport:
    """What a C2PA reader says of a signed image."""

    state: str  # Valid | Trusted | Invalid
    manifest: dict[str, Any]  # the active manifest
    failures: tuple[str, ...]  # validation failure codes, e.g. assertion.dataHash.mismatch


def read_manifest(data: bytes, *, trust_anchors: bytes | None = None) -> ManifestReport:
    """Validate a signed image. With `trust_anchors` (PEM CA certificates), a chain to one of them reads
    Trusted; without, a valid signature reads Valid."""
    import c2pa

    settings: dict[str, Any] = {"verify": {"verify_trust": trust_anchors is not None}}
    if trust_anchors is not None:
        settings["trust"] = {"trust_anchors": trust_anchors.decode()}
    try:
        reader = c2pa.Reader(
            _mime(data, "signed"), io.BytesIO(data), context=c2pa.Context.from_dict(settings)
        )
        results = reader.get_validation_results() or {}
        failures = tuple(f["code"] for f in results.get("activeManifest", {}).get("failure", []))
        return ManifestReport(
            str(reader.get_validation_state()), reader.get_active_manifest() or {}, failures
        )
    except c2pa.C2paError as e:
        raise ProvenanceError(f"cannot read the C2PA manifest: {e}") from e


# ---------------------------------------------------------------------------- trial credentials


@dataclass(frozen=True)
class TrialCredentials:
    """A throwaway CA and a leaf it issued, as PEM files: for tests, benchmarks and trying --c2pa-cert.
    No validator trusts them unless given `ca_pem` as a trust anchor: production needs a certificate
    from a CA on the C2PA trust list."""

    ca_pem: bytes
    chain: Path  # leaf + CA, PEM
    key: Path


def trial_credentials(folder: str | Path, kind: str = "ec") -> TrialCredentials:
    """Write a fresh CA-issued signing certificate chain and key into `folder` (kind: ec for ES256, rsa
    for PS256). The leaf has digitalSignature and emailProtection, which C2PA asks of a signer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kontext trial")
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), org])

    folder = Path(folder)  # a str too (it raised AttributeError on one)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("Kontext trial CA"))
        .issuer_name(name("Kontext trial CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name("Kontext trial signer"))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )  # digitalSignature
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem = ca.public_bytes(pem)
    chain, key = folder / f"chain-{kind}.pem", folder / f"key-{kind}.pem"
    atomic_write_bytes(chain, leaf.public_bytes(pem) + ca_pem)
    secret = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with atomic_writer(key, mode=0o600) as f:
        f.write(secret)
    return TrialCredentials(ca_pem, chain, key)
