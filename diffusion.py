"""The pieces that spo.py, sample.py and preference_model.py all need, in one flat module.

Model presets and loading, the tiny offline models, hand-rolled LoRA, and the DDIM step with its
log-probability. Imports run one way: this file imports none of the three scripts.
"""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

# ----------------------------------------------------------------------------------------------
# Presets: everything that differs between base models. Defaults of the scripts come from here.

SPM_HUB_REPO = "SPO-Diffusion-Models/Step-Aware_Preference_Models"  # the authors' released SPMs
PRESETS = {
    "sd15": dict(
        pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5",
        resolution=512,
        spm_base="yuvalkirstain/PickScore_v1",
        spm_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        spm_checkpoint=f"{SPM_HUB_REPO}/sd-v1-5_step-aware_preference_model.bin",
    ),
    # Random weights, built on first use: proves the machinery, not image quality.
    "tiny": dict(
        pretrained="tiny",  # resolved by tiny_pipeline_path()
        resolution=32,
        spm_base="tiny",  # resolved by preference_model.tiny_spm_paths()
        spm_processor="tiny",
        spm_checkpoint=None,
    ),
}


class UserError(Exception):
    """A problem with the user's input: the scripts print its message on one line and exit 2."""


# ----------------------------------------------------------------------------------------------
# The project's cache folder, where the tiny models are built once.

def cache_dir():
    return Path(os.environ.get("SPO_CACHE", Path.home() / ".cache" / "spo"))


def build_once(name, build):
    """Return cache_dir()/name, calling build(folder) the first time.

    The folder is built under a temporary name and renamed into place, so a concurrent process
    either sees nothing or a complete folder, never a half-written one. `name` carries a version
    so a changed recipe never loads stale files.
    """
    final = cache_dir() / name
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(tmp)
        os.rename(tmp, final)  # atomic; fails if another process won the race
        print(f"built {final}")
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _bytes_to_unicode():
    # CLIP's byte-level BPE alphabet: every byte maps to a printable unicode character.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


TINY_WORDS = ["a", "photo", "of", "the", "cat", "dog", "lake", "red", "on", "an", "beautiful", "image"]


def write_tiny_tokenizer(folder, pad_token):
    """A real CLIP BPE tokenizer with a tiny vocabulary: 256 bytes, 256 word-final bytes, a few
    merges that spell TINY_WORDS, then bos and eos (the last id, like CLIP's). Written as the
    ordinary vocab.json/merges.txt pair and loaded by transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in TINY_WORDS:  # merge left to right: p h -> ph, ph o -> pho, ..., phot o</w>
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if merged not in vocab:
                merges.append(f"{symbols[0]} {symbols[1]}")
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=16)
    tok.save_pretrained(folder)
    return tok


def build_tiny_pipeline(folder):
    """A tiny SD1.5-shaped pipeline with seeded random weights, saved as an ordinary diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = write_tiny_tokenizer(Path(folder) / "tokenizer", pad_token="<|endoftext|>")  # as SD's pads
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="quick_gelu", projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(  # SD1.5's noise schedule
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)


def tiny_pipeline_path():
    return build_once("tiny-sd-v1", build_tiny_pipeline)


# ----------------------------------------------------------------------------------------------
# Loading: hub ids and local folders go through the same from_pretrained calls.

def cannot_load(what, name, err, flag):
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load {what} from '{name}': {reason} (download it and pass a local folder or file with {flag})")


def resolve_file(spec, flag):
    """A local file, or 'owner/repo/filename' on the hub (downloaded once into the HF cache)."""
    if spec is None or Path(spec).is_file():
        return spec
    parts = str(spec).split("/")
    if Path(spec).exists() or len(parts) < 3:
        raise UserError(f"{flag}: no such file: {spec}")
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    except Exception as err:  # offline, missing, gated: all end the same way
        raise cannot_load("file", spec, err, flag) from None


class Pipeline:
    """The parts of a Stable Diffusion checkpoint that SPO uses (no diffusers pipeline object)."""

    def __init__(self, pretrained, device="cpu", dtype=torch.float32):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = str(tiny_pipeline_path()) if pretrained == "tiny" else pretrained
        parts = [("tokenizer", CLIPTokenizer), ("text_encoder", CLIPTextModel), ("vae", AutoencoderKL),
                 ("unet", UNet2DConditionModel), ("scheduler", DDIMScheduler)]
        for sub, cls in parts:
            try:
                setattr(self, sub, cls.from_pretrained(path, subfolder=sub))
            except Exception as err:
                raise cannot_load(sub, pretrained, err, "--pretrained") from None
        for m in (self.text_encoder, self.vae, self.unet):
            m.requires_grad_(False).eval().to(device, dtype)
        self.source = pretrained
        sched = self.scheduler.config
        # DDIM as the official code configures it (DDIMScheduler.from_config of the checkpoint's scheduler).
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)  # float32, (num_train_timesteps,)
        self.num_train_timesteps = sched.num_train_timesteps
        self.steps_offset = sched.steps_offset
        self.prediction_type = sched.prediction_type
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """SD text embeddings (b, L, D), from the SD tokenizer (never the preference model's)."""
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def decode(self, latents, chunk=8):
        """Latents -> images in [-1, 1] (not clamped), in chunks so VAE memory stays bounded."""
        out = [self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
               for z in latents.split(chunk)]
        return torch.cat(out).float()
