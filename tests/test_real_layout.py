"""The real download's layout (tests/real_layout.py; its files: docs/checkpoints.md), reduced: both routes
load it (folder and BFL file, from --local-dir and from a cache snapshot) with every tensor equal to the
bytes on disk and bit-identical edits; every broken download is exit 2 and one stderr line naming the
file; builds are named, keyed and signed by what they read."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import sentencepiece
import torch

from engine import cli
from engine.backends.torch import TorchDenoiser
from engine.builder.builder import BuildOptions, default_out_dir
from engine.builder.request import Target, request_hash
from engine.cli.parser import build_parser
from engine.config import KONTEXT_DEV_TRANSFORMER, TransformerConfig
from engine.errors import BackendUnavailableError, BuildError, WeightsError
from engine.model import random_weights
from engine.model.bfl import BFL_FILE, config_from_shapes, from_bfl
from engine.model.components import Components
from engine.model.layout import model_name
from engine.model.load import load_components, source_signature
from engine.model.safetensors_files import shapes
from engine.pipeline import KontextPipeline
from engine.request import EditRequest

from .conftest import gradient_image
from .real_layout import FILES, REPO_DIR, TRANSFORMER, disk_tensors, real_folder, real_snapshot

__all__ = ["real_folder", "real_snapshot"]  # session fixtures, used by name


@pytest.fixture(scope="module")
def from_folder(real_folder: Path) -> Components:
    return load_components(real_folder, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def from_bfl_file(real_folder: Path) -> Components:
    return load_components(real_folder / BFL_FILE, dtype=torch.bfloat16)


def test_the_fixture_is_the_real_layout_file_for_file(real_folder, real_snapshot):
    on_disk = sorted(str(p.relative_to(real_folder)) for p in real_folder.rglob("*") if p.is_file())
    assert on_disk == FILES
    assert not (real_folder / "tokenizer" / "tokenizer.json").exists()
    index = json.loads((real_folder / "text_encoder_2/model.safetensors.index.json").read_text())
    assert "shared.weight" in index["weight_map"] and "encoder.embed_tokens.weight" not in index["weight_map"]
    assert len(set(index["weight_map"].values())) == 2
    assert json.loads((real_folder / "text_encoder/config.json").read_text())["eos_token_id"] == 2
    linked = [p for p in real_snapshot.rglob("*") if p.is_symlink()]
    assert len(linked) == len([f for f in FILES if not f.startswith(".cache/")])
    assert all(os.readlink(p).startswith("../") and "blobs" in os.readlink(p) for p in linked)


# a file's key -> the module's name for it, as the library's own from_pretrained loads it (transformers
# 5.x's conversion_mapping.py: CLIPTextModel's PrefixChange(prefix_to_remove="text_model")); others as is
LOADED_AS: dict[str, Callable[[str], str]] = {"text_encoder": lambda k: k.removeprefix("text_model.")}


def assert_equals_disk(c: Components, root: Path) -> None:
    """Every tensor of every module is the bytes on disk (bf16 in, bf16 loaded), nothing left at init."""
    t5 = c.text_encoder_2.state_dict()
    assert torch.equal(t5["encoder.embed_tokens.weight"], t5["shared.weight"])  # tied, only shared on disk
    pairs = [
        (c.transformer, "transformer"),
        (c.text_encoder, "text_encoder"),
        (c.text_encoder_2, "text_encoder_2"),
        (c.vae, "vae"),
    ]
    for module, sub in pairs:
        disk = {LOADED_AS.get(sub, str)(k): v for k, v in disk_tensors(root, sub).items()}
        state = {k: v for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"}
        assert state.keys() == disk.keys(), sub
        for k, v in state.items():
            assert v.dtype == torch.bfloat16 and torch.equal(v.cpu(), disk[k]), (sub, k)
        assert not any(p.is_meta for p in module.parameters()) and not any(
            b.is_meta for b in module.buffers()
        )
        assert not any(p.requires_grad for p in module.parameters()) and not module.training
    (position_ids,) = [b for n, b in c.text_encoder.named_buffers() if n.endswith("position_ids")]
    assert torch.equal(position_ids.cpu(), torch.arange(77)[None])


def test_the_folder_loads_every_tensor_from_disk(from_folder, real_folder):
    assert_equals_disk(from_folder, real_folder)
    assert from_folder.preset.transformer == TRANSFORMER
    assert from_folder.source == str(real_folder)
    # the real tokenizer files: CLIP from vocab.json + merges.txt, T5 from its files, ending in </s>
    assert from_folder.tokenizer("a red hat").input_ids[0] == from_folder.tokenizer.bos_token_id
    ids = from_folder.tokenizer_2("add a red hat").input_ids
    assert ids[-1] == 1 and 2 not in ids  # eos, and no unknown piece for words of the training text
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(real_folder / "tokenizer_2/spiece.model"))
    assert len(from_folder.tokenizer_2) == pieces.get_piece_size() + 100  # + extra_ids


def test_the_bfl_file_loads_the_same_tensors_and_edits_bit_identically(
    from_folder, from_bfl_file, real_folder
):
    from safetensors.torch import load_file

    bfl = from_bfl(load_file(real_folder / BFL_FILE))
    for k, v in from_bfl_file.transformer.state_dict().items():
        assert torch.equal(v, bfl[k]), k
    for a, b in zip(from_folder.modules(), from_bfl_file.modules(), strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert from_bfl_file.source == str(real_folder / BFL_FILE)
    assert from_bfl_file.weights_id != from_folder.weights_id  # other files, another fingerprint
    assert torch.equal(edit(from_folder), edit(from_bfl_file))


def edit(c: Components) -> torch.Tensor:
    pipe = KontextPipeline(c, TorchDenoiser(c.transformer), dtype=torch.bfloat16)
    request = EditRequest(gradient_image(64, 48), "add a red hat", steps=1, seed=3)
    return pipe.edit(request, progress=False).latents


@pytest.mark.gpu
def test_both_routes_load_straight_onto_the_gpu(real_folder):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for path in (real_folder, real_folder / BFL_FILE):
        c = load_components(path, dtype=torch.bfloat16, device="cuda")
        assert all(t.is_cuda for m in c.modules() for t in [*m.parameters(), *m.buffers()])
        assert_equals_disk(c, real_folder)


def test_the_bfl_file_needs_no_transformer_config(real_folder, tmp_path):
    folder = copy(real_folder, tmp_path)
    shutil.rmtree(folder / "transformer")
    assert config_from_shapes(shapes(folder / BFL_FILE)) == TRANSFORMER
    c = load_components(folder / BFL_FILE)
    assert c.preset.transformer == TRANSFORMER and c.transformer.dtype == torch.float32


def test_the_real_transformer_config_comes_from_the_shapes_of_bfl_names():
    from engine.model.bfl import to_bfl

    with torch.device("meta"):
        from diffusers import FluxTransformer2DModel

        real = FluxTransformer2DModel(**KONTEXT_DEV_TRANSFORMER.to_diffusers())
    bfl_shapes = {k: tuple(v.shape) for k, v in to_bfl(real.state_dict()).items()}
    assert config_from_shapes(bfl_shapes) == KONTEXT_DEV_TRANSFORMER


def test_axes_dims_rope_defaults_as_in_diffusers():
    config = {k: v for k, v in KONTEXT_DEV_TRANSFORMER.to_diffusers().items() if k != "axes_dims_rope"}
    assert TransformerConfig.from_diffusers(config).axes_dims_rope == (16, 56, 56)


def test_a_cache_snapshot_loads_through_its_links_and_is_recorded_as_given(real_snapshot, from_folder):
    c = load_components(real_snapshot, dtype=torch.bfloat16)
    assert c.source == str(real_snapshot) and "blobs" not in c.source
    assert c.weights_id == from_folder.weights_id  # the same files, reached through symlinks
    again = load_components(c.source)  # what a build's manifest hands back to the runtime
    assert again.source == c.source
    bfl = load_components(real_snapshot / BFL_FILE)
    assert bfl.source == str(real_snapshot / BFL_FILE)


# ----------------------------------------------------------------------------- broken downloads


def copy(folder: Path, tmp: Path) -> Path:
    out = tmp / "kontext-dev"
    shutil.copytree(folder, out)
    return out


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


T5_SHARD = "text_encoder_2/model-00002-of-00002.safetensors"
BROKEN: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # case: (break it, what to break, what stderr must name)
    "no text_encoder_2/": (remove, "text_encoder_2", "text_encoder_2/"),
    "no tokenizer_2/": (remove, "tokenizer_2", "tokenizer_2/"),
    "no vae/": (remove, "vae", "vae/"),
    "truncated T5 shard": (truncate, T5_SHARD, T5_SHARD),
    "truncated CLIP weights": (truncate, "text_encoder/model.safetensors", "text_encoder/model.safetensors"),
    "truncated VAE weights": (
        truncate,
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model",
    ),
    "truncated vocab.json": (truncate, "tokenizer/vocab.json", "tokenizer/vocab.json"),
    "truncated merges.txt": (
        lambda p: p.write_text("#version: 0.2\nab"),
        "tokenizer/merges.txt",
        "merges.txt",
    ),
    "truncated tokenizer.json": (truncate, "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer.json"),
    "truncated spiece.model": (truncate, "tokenizer_2/spiece.model", "tokenizer_2/spiece.model"),
    "truncated T5 index": (
        truncate,
        "text_encoder_2/model.safetensors.index.json",
        "model.safetensors.index.json",
    ),
    "missing transformer shard": (
        remove,
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    ),
    "no CLIP config": (remove, "text_encoder/config.json", "text_encoder/config.json"),
}


ROUTES = [(case, bfl) for case in BROKEN for bfl in (False, True)]
ROUTES.remove(("missing transformer shard", True))  # the BFL route never reads transformer/ shards


@pytest.mark.parametrize(("case", "bfl"), ROUTES, ids=[f"{c}-{'bfl' if b else 'folder'}" for c, b in ROUTES])
def test_a_broken_download_is_one_line_naming_the_file(case, bfl, real_folder, tmp_path, capsys):
    breaks, rel, named = BROKEN[case]
    folder = copy(real_folder, tmp_path)
    breaks(folder / rel)
    model = folder / BFL_FILE if bfl else folder
    code = cli.main(
        [
            "edit",
            "--model",
            str(model),
            "-o",
            str(tmp_path / "out.png"),
            "--steps",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("kontext edit: error:")]
    assert len(errors) == 1 and named in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out.png").exists()


def test_a_machine_without_room_is_refused_before_anything_is_read(
    real_folder, tmp_path, monkeypatch, capsys
):
    import engine.model.checkpoints as checkpoints

    monkeypatch.setattr(random_weights, "CPU_LIMIT_BYTES", 1000)

    def never(*args, **kwargs):
        raise AssertionError("tensors were read before the room check")

    monkeypatch.setattr(checkpoints, "load_tensors", never)
    with pytest.raises(
        BackendUnavailableError, match=re.escape(f"the checkpoint {real_folder} (0.0 GB of weights)")
    ):
        load_components(real_folder)
    code = cli.main(["edit", "--model", str(real_folder), "-o", str(tmp_path / "o.png"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "runs on a CUDA GPU" in err[0]


# ----------------------------------------------------------------------------- builds


def request(model: str, **options) -> str:
    opts = BuildOptions(**options).resolved()
    versions = {"torch": torch.__version__}
    return request_hash(model, None, ("fp32",), None, Target.of("onnxruntime"), versions, [], opts)


def test_a_path_and_its_spellings_are_one_build(real_folder, monkeypatch):
    monkeypatch.chdir(real_folder.parent)
    up = f"../{real_folder.parent.name}/kontext-dev"  # (a bare "kontext-dev" names the preset)
    spellings = ["./kontext-dev", "./kontext-dev/", up, str(real_folder), str(real_folder) + "/"]
    assert len({request(s) for s in spellings}) == 1
    assert {default_out_dir(s) for s in spellings} == {Path("build/kontext-dev")}


def test_builds_are_named_after_the_model(real_folder, real_snapshot):
    assert default_out_dir(str(real_folder / BFL_FILE)) == Path("build/kontext-dev-bfl")
    assert default_out_dir(str(real_snapshot)) == Path("build") / REPO_DIR.split("--")[-1]
    assert default_out_dir(str(real_snapshot / BFL_FILE)) == Path("build/FLUX.1-Kontext-dev-bfl")
    assert default_out_dir("tiny") == Path("build/tiny")
    assert model_name(real_folder) == "kontext-dev"


def test_source_signatures_cover_what_each_route_reads(real_folder, tmp_path):
    folder = copy(real_folder, tmp_path)
    as_folder, as_bfl = source_signature(folder), source_signature(folder / BFL_FILE)

    def touched(rel: str) -> tuple[bool, bool]:
        path = folder / rel
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        now = source_signature(folder), source_signature(folder / BFL_FILE)
        return now[0] != as_folder, now[1] != as_bfl

    assert touched("ae.safetensors") == (False, False)  # nobody reads BFL's autoencoder
    assert touched(BFL_FILE) == (False, True)
    as_bfl = source_signature(folder / BFL_FILE)
    assert touched("text_encoder_2/model-00001-of-00002.safetensors") == (True, True)
    as_folder, as_bfl = source_signature(folder), source_signature(folder / BFL_FILE)
    assert touched("vae/config.json") == (True, True)
    as_folder, as_bfl = source_signature(folder), source_signature(folder / BFL_FILE)
    assert touched("tokenizer/vocab.json") == (True, True)
    as_folder, as_bfl = source_signature(folder), source_signature(folder / BFL_FILE)
    assert touched("transformer/diffusion_pytorch_model-00003-of-00003.safetensors") == (True, False)
    as_folder, as_bfl = source_signature(folder), source_signature(folder / BFL_FILE)
    assert touched(".cache/huggingface/download/model_index.json.metadata") == (False, False)


def test_the_build_runs_on_the_gpu_in_bf16_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (BuildOptions().resolved().device, BuildOptions().resolved().dtype) == ("cuda", "bf16")
    assert BuildOptions(dtype="fp32").resolved().dtype == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (BuildOptions().resolved().device, BuildOptions().resolved().dtype) == ("cpu", "fp32")
    with pytest.raises(BuildError, match="bf16 or fp32"):
        BuildOptions(dtype="fp16")
    # the CPU's fp32 keeps the request hash of builds made before the option existed
    assert request("tiny") == request("tiny", device="cpu", dtype="fp32") != request("tiny", dtype="bf16")


def test_the_build_cli_defaults_to_the_machines_device():
    args = build_parser().parse_args(["build"])
    assert args.device is None


def test_a_base_install_without_accelerate_loads_both_routes(real_folder):
    """`pip install -e .` brings neither accelerate nor peft (the lora extra): both routes still load.
    A fresh interpreter where neither is importable nor found (sys.modules None: find_spec says absent,
    so diffusers and transformers take their no-accelerate paths)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['accelerate'] = sys.modules['peft'] = None\n"
        "from engine.model.load import load_components\n"
        f"load_components({str(real_folder)!r})\n"
        f"load_components({str(real_folder / BFL_FILE)!r})\n"
        "print('loaded')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("loaded"), out.stderr[-2000:]


# --------------------------------------------------------------------------- the real files' key names

# Names the real repository's files hold, written down from the libraries that wrote them, not from
# today's modules (tests/real_layout.py states the source of each): a few that must be there and a few
# that must not, per file.
REAL_NAMES = {
    "text_encoder": (  # transformers 4.43.3 CLIPTextModel: every tensor under its `text_model` wrapper
        [
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
            "text_model.final_layer_norm.weight",
        ],
        ["embeddings.token_embedding.weight", "text_model.embeddings.position_ids"],
    ),
    "text_encoder_2": (  # transformers 4.43.3 T5EncoderModel: the tied embedding saved once, as `shared`
        [
            "shared.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
            "encoder.final_layer_norm.weight",
        ],
        ["encoder.embed_tokens.weight"],
    ),
    "transformer": (  # diffusers FluxTransformer2DModel
        [
            "x_embedder.weight",
            "transformer_blocks.0.attn.to_q.weight",
            "single_transformer_blocks.1.proj_mlp.weight",
            "norm_out.linear.weight",
        ],
        ["img_in.weight"],
    ),
    "vae": (  # diffusers AutoencoderKL (to_q, not the pre-0.14 `query`)
        ["encoder.conv_in.weight", "encoder.mid_block.attentions.0.to_q.weight", "decoder.conv_out.weight"],
        ["encoder.mid_block.attentions.0.query.weight"],
    ),
    BFL_FILE: (  # black-forest-labs/flux src/flux/model.py, unprefixed
        [
            "img_in.weight",
            "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.1.linear1.weight",
            "final_layer.adaLN_modulation.1.weight",
        ],
        ["x_embedder.weight", "model.diffusion_model.img_in.weight"],
    ),
}


def disk_keys(root: Path, rel: str) -> set[str]:
    from safetensors import safe_open

    files = [root / rel] if rel.endswith(".safetensors") else sorted((root / rel).glob("*.safetensors"))
    keys: set[str] = set()
    for f in files:
        with safe_open(f, "pt") as sf:
            keys.update(sf.keys())
    return keys


def todays_names(root: Path, rel: str) -> set[str]:
    """The state_dict() names of the class that reads `rel` today (built on meta from its config)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        if rel == "text_encoder":
            module = CLIPTextModel(CLIPTextConfig.from_pretrained(root / rel))
        elif rel == "text_encoder_2":
            module = T5EncoderModel(T5Config.from_pretrained(root / rel))
        elif rel == "vae":
            module = AutoencoderKL.from_config(AutoencoderKL.load_config(root / rel))
        else:
            module = FluxTransformer2DModel(**TRANSFORMER.to_diffusers())
    return set(module.state_dict())


@pytest.mark.parametrize("rel", list(REAL_NAMES))
def test_every_fixture_file_has_the_real_files_key_names(rel, real_folder):
    """Fails on a fixture written from today's state_dict() where the real file's names differ (CLIP's
    `text_model.` prefix, T5's untied embedding, BFL's names)."""
    keys = disk_keys(real_folder, rel)
    present, absent = REAL_NAMES[rel]
    assert set(present) <= keys, (rel, sorted(set(present) - keys))
    assert not set(absent) & keys, (rel, sorted(set(absent) & keys))
    today = todays_names(real_folder, rel)
    if rel in ("transformer", "vae"):  # diffusers has not renamed these since the real files were written
        assert keys == today
    else:
        assert keys != today
        if rel == "text_encoder":
            assert not keys & today  # not one CLIP name is today's


def test_each_encoder_loads_as_its_librarys_own_from_pretrained_loads_it(from_folder, real_folder):
    """The oracle is the library itself: transformers' and diffusers' from_pretrained on the same files
    give every module the same names and bytes our meta-device load gives it."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    theirs = {
        "text_encoder": CLIPTextModel.from_pretrained(real_folder / "text_encoder", dtype=torch.bfloat16),
        "text_encoder_2": T5EncoderModel.from_pretrained(
            real_folder / "text_encoder_2", dtype=torch.bfloat16
        ),
        "vae": AutoencoderKL.from_pretrained(real_folder / "vae", torch_dtype=torch.bfloat16),
        "transformer": FluxTransformer2DModel.from_pretrained(
            real_folder / "transformer", torch_dtype=torch.bfloat16
        ),
    }
    ours = {
        "text_encoder": from_folder.text_encoder,
        "text_encoder_2": from_folder.text_encoder_2,
        "vae": from_folder.vae,
        "transformer": from_folder.transformer,
    }
    for sub, module in theirs.items():
        a, b = module.state_dict(), ours[sub].state_dict()
        assert a.keys() == b.keys(), sub
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_a_clip_file_under_names_no_loader_knows_is_refused_in_one_line(real_folder, tmp_path):
    """Negative control for the renaming: a prefix transformers does not map stays unmatched."""
    from safetensors.torch import load_file, save_file

    folder = copy(real_folder, tmp_path)
    path = folder / "text_encoder/model.safetensors"
    tensors = load_file(path)
    save_file({k.replace("text_model.", "clip_model.", 1): v for k, v in tensors.items()}, path)
    with pytest.raises(WeightsError, match=r"text_encoder: 20 tensors do not fit its config.json") as e:
        load_components(folder)
    assert "\n" not in str(e.value)


def test_a_key_needing_a_transformers_tensor_conversion_is_refused(real_folder, monkeypatch):
    """A format whose tensors transformers would split or merge (a WeightConverter) is named, not loaded
    under a wrong shape."""
    import transformers.conversion_mapping as mapping
    from transformers.core_model_loading import Chunk, WeightConverter

    from engine.model.key_names import transformers_names

    fuse = WeightConverter(
        source_patterns="self_attn.qkv_proj.weight",
        target_patterns=["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
        operations=[Chunk(dim=0)],
    )
    monkeypatch.setattr(mapping, "get_checkpoint_conversion_mapping", lambda name: [fuse] if name else None)
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(real_folder / "text_encoder"))
    keys = ["encoder.layers.0.self_attn.qkv_proj.weight"]
    with pytest.raises(WeightsError, match=r"qkv_proj\.weight needs transformers' tensor conversion"):
        transformers_names(clip, keys, "text_encoder")
    assert transformers_names(clip, ["final_layer_norm.weight"], "x") == {
        "final_layer_norm.weight": "final_layer_norm.weight"
    }
