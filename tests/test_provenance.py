"""C2PA provenance: a throwaway CA and leaf (provenance.trial_credentials) sign an edit; c2pa's
Reader validates it (Trusted with the CA as anchor), finds the EDIT manifest's parentOf ingredient with
the input's SHA-256 and the c2pa.edited action; one changed byte fails validation."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

import engine
from engine import __version__, assets
from engine.cli import main
from engine.errors import ProvenanceError
from engine.images import encode_image, load_image, read_jpeg_metadata, read_png_metadata
from engine.outputs import output_metadata, save_output
from engine.provenance import (
    INPUT_SHA256_KEY,
    TRAINED_ALGORITHMIC_MEDIA,
    ProvenanceSigner,
    TrialCredentials,
    read_manifest,
    trial_credentials,
)
from tests.conftest import gradient_image


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TrialCredentials:
    return trial_credentials(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def signer(pki: TrialCredentials) -> ProvenanceSigner:
    return ProvenanceSigner.from_files(pki.chain, pki.key)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _edited_action(manifest: dict) -> dict:
    (actions,) = [
        a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")
    ]
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.edited"]
    return actions[1]


def test_signed_edit_reads_back_trusted(signer: ProvenanceSigner, pki: TrialCredentials) -> None:
    parent = _png(gradient_image(64, 48, seed=0))
    meta = output_metadata("tiny", prompt="add a hat", seed=1)
    signed = signer.sign(
        encode_image(gradient_image(64, 48, seed=1), "PNG", meta), parent=parent, model="tiny"
    )

    untrusted = read_manifest(signed)
    assert untrusted.state == "Valid" and untrusted.failures == ()
    report = read_manifest(signed, trust_anchors=pki.ca_pem)
    assert report.state == "Trusted" and report.failures == ()
    m = report.manifest
    assert m["claim_generator_info"][0]["name"] == "kontext-engine"
    assert (
        m["signature_info"]["common_name"] == "Kontext trial signer" and m["signature_info"]["alg"] == "Es256"
    )
    (ingredient,) = m["ingredients"]
    assert ingredient["relationship"] == "parentOf"
    assert ingredient["metadata"][INPUT_SHA256_KEY] == hashlib.sha256(parent).hexdigest()
    action = _edited_action(m)
    assert action["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert action["softwareAgent"] == {"name": "kontext-engine", "version": __version__}
    assert action["parameters"]["model"] == "tiny"
    assert not any("thumbnail" in str(k) for k in m)  # no thumbnails by default
    assert len(signed) - len(encode_image(gradient_image(64, 48, seed=1), "PNG", meta)) < 16_000


def test_a_signed_input_joins_the_chain(signer: ProvenanceSigner, pki: TrialCredentials) -> None:
    """Editing an output of ours again: the first edit's manifest is the second's parent ingredient."""
    first = signer.sign(_png(gradient_image(32, 32, seed=1)), parent=_png(gradient_image(8, 8)), model="tiny")
    second = signer.sign(_png(gradient_image(32, 32, seed=2)), parent=first, model="tiny")
    report = read_manifest(second, trust_anchors=pki.ca_pem)
    assert report.state == "Trusted" and report.failures == ()
    (ingredient,) = report.manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and "active_manifest" in ingredient
    assert ingredient["metadata"][INPUT_SHA256_KEY] == hashlib.sha256(first).hexdigest()


def test_signed_inputs_are_recognised(signer: ProvenanceSigner) -> None:
    """Only an input with a C2PA store is streamed through c2pa (its manifest joins the chain)."""
    from engine.provenance import carries_c2pa

    png = _png(gradient_image(32, 32))
    buf = io.BytesIO()
    gradient_image(32, 32).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    assert not carries_c2pa(png) and not carries_c2pa(jpeg)
    assert carries_c2pa(signer.sign(png, parent=png, model="tiny"))
    assert carries_c2pa(signer.sign(jpeg, parent=png, model="tiny"))


def test_a_webp_input_is_a_parent(signer: ProvenanceSigner) -> None:
    buf = io.BytesIO()
    gradient_image(16, 16).save(buf, format="WEBP")
    signed = signer.sign(_png(gradient_image(16, 16, seed=1)), parent=buf.getvalue(), model="tiny")
    report = read_manifest(signed)
    assert report.state == "Valid" and report.manifest["ingredients"][0]["format"] == "image/webp"


def test_a_changed_byte_fails_validation(signer: ProvenanceSigner, pki: TrialCredentials) -> None:
    image = gradient_image(64, 48, seed=1)
    signed = bytearray(signer.sign(_png(image), parent=_png(gradient_image(8, 8)), model="tiny"))
    idat = signed.index(b"IDAT")
    signed[idat + 40] ^= 0x01  # one pixel-data byte
    report = read_manifest(bytes(signed), trust_anchors=pki.ca_pem)
    assert report.state == "Invalid" and "assertion.dataHash.mismatch" in report.failures


def test_png_text_metadata_survives_signing(signer: ProvenanceSigner, tmp_path: Path) -> None:
    meta = output_metadata("tiny", prompt="a prompt ❄", seed=3)
    path = tmp_path / "out.png"
    saved = save_output(gradient_image(32, 32), path, meta, parent=_png(gradient_image(8, 8)), signer=signer)
    assert saved.signed and not saved.held and saved.path == path
    assert read_png_metadata(path) == meta
    assert read_manifest(path.read_bytes()).state == "Valid"


def test_jpeg_is_signed_and_discloses_in_exif(
    signer: ProvenanceSigner, pki: TrialCredentials, tmp_path: Path
) -> None:
    meta = output_metadata("tiny", prompt="a prompt ❄", seed=3)
    saved = save_output(
        gradient_image(48, 32), tmp_path / "out.jpg", meta, parent=_png(gradient_image(8, 8)), signer=signer
    )
    data = saved.path.read_bytes()
    assert data.startswith(b"\xff\xd8\xff")
    assert read_manifest(data, trust_anchors=pki.ca_pem).state == "Trusted"
    assert read_jpeg_metadata(data) == meta
    exif = Image.open(io.BytesIO(data)).getexif()
    assert exif[0x0131] == meta["Software"] and "AI generated" in exif[0x0131]  # Software
    assert exif[0x0110] == "tiny"  # Model


def test_ps256_with_an_rsa_key(tmp_path: Path) -> None:
    pki = trial_credentials(tmp_path, kind="rsa")
    signer = ProvenanceSigner.from_files(pki.chain, pki.key, alg="ps256")
    signed = signer.sign(_png(gradient_image(16, 16)), parent=_png(gradient_image(8, 8)), model="tiny")
    report = read_manifest(signed, trust_anchors=pki.ca_pem)
    assert report.state == "Trusted" and report.manifest["signature_info"]["alg"] == "Ps256"


def test_bad_credentials_are_refused_at_setup(pki: TrialCredentials, tmp_path: Path) -> None:
    with pytest.raises(ProvenanceError, match="cannot read"):
        ProvenanceSigner.from_files(tmp_path / "missing.pem", pki.key)
    with pytest.raises(ProvenanceError, match="CERTIFICATE"):
        ProvenanceSigner.from_files(pki.key, pki.key)
    with pytest.raises(ProvenanceError, match="es256, ps256"):
        ProvenanceSigner.from_files(pki.chain, pki.key, alg="md5")
    (tmp_path / "other").mkdir()
    other = trial_credentials(tmp_path / "other")
    with pytest.raises(ProvenanceError, match="signing failed"):
        ProvenanceSigner.from_files(pki.chain, other.key)  # a key that is not the certificate's


# ------------------------------------------------------------------ the CLI and the Python API


@pytest.fixture
def quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers = list(root.handlers)
    yield
    root.handlers[:] = handlers


@pytest.mark.usefixtures("quiet_root_logger")
def test_cli_signs_with_a_certificate(
    pki: TrialCredentials, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"
    args = [
        "edit",
        "--no-progress",
        "--steps",
        "1",
        "-o",
        str(out),
        "--c2pa-cert",
        str(pki.chain),
        "--c2pa-key",
        str(pki.key),
    ]
    assert main([*args, "--no-prompt-metadata", "--", "", "add a hat"]) == 0
    assert "C2PA-signed" in capsys.readouterr().out
    report = read_manifest(out.read_bytes(), trust_anchors=pki.ca_pem)
    assert report.state == "Trusted"
    sample = assets.sample_image_path().read_bytes()
    assert (
        report.manifest["ingredients"][0]["metadata"][INPUT_SHA256_KEY] == hashlib.sha256(sample).hexdigest()
    )
    meta = read_png_metadata(out)
    assert "prompt" not in meta and meta["Software"].startswith(f"kontext-engine {__version__}; AI generated")
    assert main(["edit", "--no-progress", "--c2pa-cert", str(pki.chain), "-o", str(tmp_path / "x.png")]) == 2
    assert "both --c2pa-cert and --c2pa-key" in capsys.readouterr().err


def test_no_certificate_no_signature_metadata_still_written(tmp_path: Path) -> None:
    with engine.load("tiny") as kontext:
        result = kontext.edit(assets.sample_image_path(), "add a hat", seed=2, steps=1)
        saved = kontext.outputs.save(result, tmp_path / "out.png", source=assets.sample_image_path())
    assert not saved.signed
    meta = read_png_metadata(saved.path)
    assert meta["prompt"] == "add a hat" and meta["seed"] == "2" and meta["model"] == "tiny"
    assert "AI generated" in meta["Software"]
    assert b"caBX" not in saved.path.read_bytes()  # no C2PA box in the PNG


def test_api_save_signs_with_the_input_as_parent(
    signer: ProvenanceSigner, pki: TrialCredentials, tmp_path: Path
) -> None:
    image = load_image(assets.sample_image_path())
    with engine.load("tiny", signer=signer) as kontext:
        result = kontext.edit(image, "add a hat", seed=2, steps=1)
        saved = kontext.outputs.save(result, tmp_path / "out.jpg", source=image, include_prompt=False)
    report = read_manifest(saved.path.read_bytes(), trust_anchors=pki.ca_pem)
    assert saved.signed and report.state == "Trusted"
    parent_hash = report.manifest["ingredients"][0]["metadata"][INPUT_SHA256_KEY]
    assert parent_hash == hashlib.sha256(_png(image)).hexdigest()  # a PIL source is signed as its PNG
    assert "prompt" not in read_jpeg_metadata(saved.path.read_bytes())
