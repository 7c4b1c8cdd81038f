"""A reduced-width FLUX.1-Kontext-dev download, file for file as the Hugging Face repository holds it
(docs/checkpoints.md, "The real download's files and key names"): sharded transformer (3) and T5 (2)
with their index files, CLIP's vocab.json/merges.txt without tokenizer.json, T5's spiece.model (a
unigram model trained here) and tokenizer.json, model_index.json, the scheduler config, the VAE config
with its factors, BFL's `flux1-kontext-dev.safetensors` and `ae.safetensors`, and
`.cache/huggingface/`. Weights are bf16 on disk (ae.safetensors fp32), CLIP's config says bos 0 / eos 2
/ pad 1.

Every file carries the key names and metadata of the library that wrote the real one, not today's
`state_dict()` names (see REAL_KEYS below for the source of each):
- text_encoder/: transformers 4.43.3 (its config.json says so). That release's `CLIPTextModel.__init__`
  sets `self.text_model = CLIPTextTransformer(config)`, so every key starts `text_model.`; its
  `position_ids` buffer is non-persistent (not in the file). transformers 5.x's CLIPTextModel has no
  wrapper and renames on load (conversion_mapping.py: `PrefixChange(prefix_to_remove="text_model")`).
- text_encoder_2/: transformers 4.43.3 `T5EncoderModel`: `encoder.embed_tokens` is tied to `shared`
  (`_tied_weights_keys`), and save_pretrained writes the tied tensor once, as `shared.weight`.
- config.json files of both: written by 4.43.3, so `torch_dtype` (5.x writes `dtype`) and
  `transformers_version: 4.43.3`.
- transformer/ and vae/: diffusers' names (FluxTransformer2DModel, AutoencoderKL with `to_q`...), which
  diffusers has not changed since the real files were written (0.34/0.30).
- flux1-kontext-dev.safetensors: BFL's names (black-forest-labs/flux src/flux/model.py:
  `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...), unprefixed.
- safetensors metadata: `{"format": "pt"}`, what save_pretrained (both libraries) writes.

The transformer keeps the real head size (128) and rotary axes (16, 56, 56), so BFL's file names its
own config from its shapes; everything else is a few thousand parameters. `snapshot()` turns a folder
into a Hugging Face cache snapshot (every file a relative symlink into blobs/).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import string
from pathlib import Path

import pytest
import torch

from engine.config import ModelPreset, TextEncoderConfig, TransformerConfig, VaeConfig
from engine.model.bfl import BFL_FILE, to_bfl
from engine.model.components import SCHEDULER_CONFIG
from engine.model.synthetic import build_modules

REPO_DIR = "models--black-forest-labs--FLUX.1-Kontext-dev"
COMMIT = "af58063aa431f4d2bbc11ae46f57451d4416a170"  # any 40 hex digits

TRANSFORMER = TransformerConfig(
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=128,
    num_attention_heads=1,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(16, 56, 56),
)
PRESET = ModelPreset(
    name="real-layout",
    transformer=TRANSFORMER,
    vae=VaeConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
    text=TextEncoderConfig(
        clip_hidden=32,
        clip_layers=1,
        clip_heads=2,
        t5_d_model=32,
        t5_layers=2,
        t5_heads=2,
        t5_d_ff=64,
        t5_vocab=224,  # more embedding rows than tokenizer entries, as T5-v1.1 (32128 for 32100)
    ),
    bucket_family="1mp",
    max_sequence_length=512,
)

# every file of the download, relative to its root (docs/checkpoints.md, "The real download's files")
FILES = sorted(
    [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        BFL_FILE,
        "ae.safetensors",
        ".cache/huggingface/.gitignore",
        ".cache/huggingface/download/model_index.json.metadata",
    ]
)

_CORPUS = [
    "add a red hat to the cat",
    "make the sky blue and the grass green",
    "turn it into a watercolor painting",
    "remove the person on the left",
    " ".join(string.ascii_letters),
    " ".join(string.digits + string.punctuation),
]


@pytest.fixture(scope="session")
def real_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reduced-width download as `hf download ... --local-dir` leaves it (read it, never change it:
    tests that break files copy it first)."""
    return write_download(tmp_path_factory.mktemp("real") / "kontext-dev")


@pytest.fixture(scope="session")
def real_snapshot(real_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same download as a cache snapshot (`hf download` without --local-dir)."""
    return snapshot(real_folder, tmp_path_factory.mktemp("hf-cache"))


def write_download(root: Path) -> Path:
    clip_tok, t5_tok, spiece = _tokenizers(root)
    with torch.random.fork_rng(devices=[]):
        transformer, vae, clip, t5 = build_modules(PRESET, clip_tok, t5_tok, seed=1234)
    for m in (transformer, vae, clip, t5):
        m.eval().requires_grad_(False)
        for p in m.parameters():  # visible weights: a zero-initialised tensor would match anything
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    _json(
        root / "model_index.json",
        {
            "_class_name": "FluxKontextPipeline",
            "_diffusers_version": "0.35.0.dev0",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    _json(
        root / "scheduler/scheduler_config.json",
        {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": "0.34.0.dev0",
            **SCHEDULER_CONFIG,
        },
    )
    # CLIP-L's config keeps bos 0 / eos 2 / pad 1 (the legacy pooling at the highest id)
    clip.config.bos_token_id, clip.config.eos_token_id, clip.config.pad_token_id = 0, 2, 1
    _json(root / "text_encoder/config.json", _clip_config_4_43(clip.config))
    _safetensors(root / "text_encoder/model.safetensors", _clip_4_43(_bf16(clip.state_dict())))
    _json(root / "text_encoder_2/config.json", _t5_config_4_43(t5.config))
    _shards(root / "text_encoder_2", "model", _t5_4_43(_bf16(t5.state_dict())), 2)
    _json(
        root / "transformer/config.json",
        {
            "_class_name": "FluxTransformer2DModel",
            "_diffusers_version": "0.34.0.dev0",
            **TRANSFORMER.to_diffusers(),
            "out_channels": None,
        },
    )
    transformer_state = REAL_KEYS["transformer"](_bf16(transformer.state_dict()))
    _shards(root / "transformer", "diffusion_pytorch_model", transformer_state, 3)
    vae.save_config(root / "vae")
    _safetensors(root / "vae/diffusion_pytorch_model.safetensors", REAL_KEYS["vae"](_bf16(vae.state_dict())))
    _safetensors(root / BFL_FILE, to_bfl(transformer_state))
    vae_fp32 = {k: v.float() for k, v in vae.state_dict().items()}  # BFL's ae: fp32, LDM names (unread)
    _safetensors(
        root / "ae.safetensors",
        {
            "encoder.conv_in.weight": vae_fp32["encoder.conv_in.weight"],
            "decoder.conv_out.weight": vae_fp32["decoder.conv_out.weight"],
            "encoder.mid.attn_1.q.weight": vae_fp32["encoder.mid_block.attentions.0.to_q.weight"][..., None],
        },
    )
    _write(root / "tokenizer_2/spiece.model", spiece)
    (root / ".cache/huggingface/download").mkdir(parents=True)
    _write(root / ".cache/huggingface/.gitignore", b"*\n")
    _write(root / ".cache/huggingface/download/model_index.json.metadata", f"{COMMIT}\n0\n0.0\n".encode())
    return root


def _clip_4_43(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4.43.3's CLIPTextModel names: its CLIPTextTransformer is `self.text_model`
    (models/clip/modeling_clip.py), and position_ids is a non-persistent buffer (not saved)."""
    return {f"text_model.{k}": v for k, v in state.items() if not k.endswith("position_ids")}


def _t5_4_43(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4.43.3's T5EncoderModel file: `encoder.embed_tokens.weight` is tied to
    `shared.weight` (`_tied_weights_keys`) and save_pretrained keeps only `shared.weight`."""
    return {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def _same(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' names: the real transformer/ and vae/ files were written by diffusers 0.34/0.30,
    whose FluxTransformer2DModel and AutoencoderKL name every tensor as today's do."""
    return dict(state)


# each file's names as the library that wrote the real file gives them, from today's state_dict()
# (BFL's single file: engine.model.bfl.to_bfl, checked against BFL's strict load_state_dict)
REAL_KEYS = {"text_encoder": _clip_4_43, "text_encoder_2": _t5_4_43, "transformer": _same, "vae": _same}


def _clip_config_4_43(config: object) -> dict[str, object]:
    """text_encoder/config.json as transformers 4.43.3 writes it for FLUX's CLIP-L (its fields, at
    this fixture's sizes): `torch_dtype`, not 5.x's `dtype`."""
    c = config.to_dict()  # type: ignore[attr-defined]
    fields = [
        "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
        "initializer_factor", "initializer_range", "intermediate_size", "layer_norm_eps",
        "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
        "pad_token_id", "projection_dim", "vocab_size",
    ]  # fmt: skip
    return {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        **{k: c[k] for k in fields},
        "dropout": 0.0,  # 4.43.3's field (5.x's CLIPTextConfig has none)
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.3",
    }


def _t5_config_4_43(config: object) -> dict[str, object]:
    """text_encoder_2/config.json as transformers 4.43.3 writes it for T5-v1.1-XXL (its fields, at this
    fixture's sizes)."""
    c = config.to_dict()  # type: ignore[attr-defined]
    fields = [
        "classifier_dropout", "d_ff", "d_kv", "d_model", "dense_act_fn", "dropout_rate", "eos_token_id",
        "feed_forward_proj", "initializer_factor", "is_gated_act", "layer_norm_epsilon", "model_type",
        "num_heads", "num_layers", "pad_token_id", "relative_attention_max_distance",
        "relative_attention_num_buckets", "vocab_size",
    ]  # fmt: skip
    return {
        "_name_or_path": "google/t5-v1_1-xxl",
        "architectures": ["T5EncoderModel"],
        **{k: c[k] for k in fields},
        "decoder_start_token_id": 0,
        "is_encoder_decoder": True,
        "num_decoder_layers": c["num_layers"],
        "output_past": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.3",
        "use_cache": True,
    }


def _tokenizers(root: Path) -> tuple[object, object, bytes]:
    """CLIP: byte-level BPE written as vocab.json + merges.txt (no tokenizer.json); T5: a unigram
    sentencepiece model trained here on a few sentences, loaded as the real repository's files are."""
    import sentencepiece as spm
    from transformers import CLIPTokenizer, T5Tokenizer

    from engine.model.tokenizers import build_tokenizers

    clip_mem, _ = build_tokenizers()
    clip_dir = root / "tokenizer"
    _json(clip_dir / "vocab.json", clip_mem.get_vocab())
    _write(clip_dir / "merges.txt", b"#version: 0.2\n")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    _json(clip_dir / "special_tokens_map.json", specials)
    clip_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}
    _json(clip_dir / "tokenizer_config.json", {**clip_config, "errors": "replace", **specials})
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=model,
        vocab_size=120,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    t5_dir = root / "tokenizer_2"
    _write(t5_dir / "spiece.model", model.getvalue())
    t5_specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _json(t5_dir / "special_tokens_map.json", t5_specials)
    t5_config = {"tokenizer_class": "T5Tokenizer", "legacy": True, "extra_ids": 100, "model_max_length": 512}
    _json(t5_dir / "tokenizer_config.json", {**t5_config, **t5_specials})
    t5 = T5Tokenizer.from_pretrained(t5_dir)  # converted from spiece.model, then saved as tokenizer.json
    scratch = root.parent / f".{root.name}-t5"
    t5.save_pretrained(scratch)
    shutil.move(scratch / "tokenizer.json", t5_dir / "tokenizer.json")
    shutil.rmtree(scratch)
    return CLIPTokenizer.from_pretrained(clip_dir), T5Tokenizer.from_pretrained(t5_dir), model.getvalue()


def snapshot(folder: Path, cache: Path) -> Path:
    """`folder` as a Hugging Face cache entry: blobs/<sha256>, refs/main, snapshots/<commit>/<file> ->
    ../../blobs/<sha256> (relative links, as huggingface_hub makes them). The .cache folder stays out."""
    repo = cache / REPO_DIR
    snap = repo / "snapshots" / COMMIT
    for rel in FILES:
        if rel.startswith(".cache/"):
            continue
        data = (folder / rel).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    _write(repo / "refs" / "main", COMMIT.encode())
    return snap


def disk_tensors(root: Path, sub: str) -> dict[str, torch.Tensor]:
    """Every tensor stored under root/sub (all shards), as safetensors reads them."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted((root / sub).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


def _shards(folder: Path, stem: str, state: dict[str, torch.Tensor], n: int) -> None:
    """`state` in n shards of about equal bytes, named and indexed as save_pretrained does."""
    keys = sorted(state)
    total = sum(state[k].numel() * state[k].element_size() for k in keys)
    groups: list[list[str]] = [[] for _ in range(n)]
    running = 0
    for k in keys:
        groups[min(n - 1, running * n // total)].append(k)
        running += state[k].numel() * state[k].element_size()
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        _safetensors(folder / name, {k: state[k] for k in group})
        weight_map |= dict.fromkeys(group, name)
    _json(
        folder / f"{stem}.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def _safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _json(path: Path, data: object) -> None:
    _write(path, (json.dumps(data, indent=2) + "\n").encode())


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
