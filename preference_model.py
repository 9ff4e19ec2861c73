"""The step-aware preference model (SPM) of SPO and plain PickScore: image scorers, and the SPM's training.

SPO compares candidate images at every denoising step, so its judge must score noisy images. The
SPM (paper section 4.1) is PickScore's CLIP ViT-H/14 with time conditioning: a sinusoidal embedding
of the step t and an MLP, DiT-style adaLN modulation (shift, scale, gate for attention and MLP) in
every vision encoder layer, and a (shift, scale) modulation of the pooled image feature. The score
is CLIP's: logit_scale.exp() * cos(image_features(x, t), text_features(prompt)).

The state-dict keys are exactly those of the authors' checkpoints, so their released .bin files
load as they are. The second half of the file trains an SPM as the authors did, on Pick-a-Pic pairs noised
to a random t (train), and measures its accuracy at fixed t (eval).

    python preference_model.py score --prompt "a red cat" --image a.png --image b.png --timestep 0
    python preference_model.py score --model tiny --prompt "a red cat" --image a.png  # offline
    python preference_model.py train --data pickapic_v1 --out runs/spm     # a local copy; needs the pyarrow extra
    python preference_model.py eval --data pickapic_v1 --checkpoint runs/spm/spm.safetensors
"""
import contextlib
import io
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from diffusion import (DTYPES, LOCAL_ONLY, MAX_SEED, PRESETS, ArgumentParser, Pipeline, StopSignal, TrainingAborted,
                       UserError, all_ranks_sum, atomic_folder, atomic_write, build_once, cannot_load, check_text,
                       checkpoint_folders, cleared_if_it_fails, ddim_step, device_problem, file_problem, finite_float,
                       first_line, holds_files, load_optimizer_state, offline_if_hub_unreachable, output_problem,
                       path_errors_refused, predict_noise, quiet_libraries, read_json, read_metrics, remove_unfinished,
                       resolve_file, run_folder_lock, seeded_weights, setup_distributed, size_problem, stop_together,
                       take, write_tiny_tokenizer)

NUM_TRAIN_TIMESTEPS = 1000  # the SPM is trained on DDPM steps t in [0, 999]
MAX_BAD_STEPS = 10  # training stops after this many non-finite steps in a row, as spo.py's default
PREFERENCE_FLAGS = ("--preference-model", "--preference-processor", "--preference-checkpoint")  # in spo/sample
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the image settings of every CLIP processor here
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# Time conditioning: the modules the SPM adds to CLIP, named as in the official checkpoints.


class TimestepEmbedder(nn.Module):
    """t -> (b, D): sinusoidal features [cos(t f_k), sin(t f_k)] with f_k = 10000^(-k / half), k < half =
    frequency_size / 2 (128 for DiT's 256 features, what the SPM uses), then an MLP (as in DiT)."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        # Always in fp32, autocast or not (in_own_dtype keeps these weights fp32 too): in bf16, t = 951 would round
        # to 952 before the sin/cos ever see it, and neighbouring steps would share one embedding. The official
        # code casts t to the pixels' dtype, which is the same for its fp32 judge and differs only in 16-bit ones.
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (b, 128)
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (b, 256), cos first
        with torch.autocast(t.device.type, enabled=False):
            return self.mlp(features.to(self.mlp[0].weight.dtype))


def add_time_conditioning(clip):
    """Attach the SPM's modules to a transformers CLIPModel, where the official key layout expects them."""
    dim = clip.config.vision_config.hidden_size
    clip.t_embedder = TimestepEmbedder(dim)
    for layer in clip.vision_model.encoder.layers:  # (shift, scale, gate) for attention, then for the MLP
        layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
    # (shift, scale) of the pooled CLS feature
    clip.vision_model.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


@torch.no_grad()
def init_time_conditioning(clip):
    """The reference training's init from PickScore: zero shifts and scales, unit gates, t-MLP weights N(0, 0.02).
    Every modulation is then the identity, so a fresh SPM scores exactly like PickScore at every t. (The
    official constructor alone leaves all gates at 0, golden README N8; training re-initialises like this.)"""
    dim = clip.config.vision_config.hidden_size
    for layer in clip.vision_model.encoder.layers:
        linear = layer.adaLN_modulation[1]
        linear.weight.zero_()
        linear.bias.zero_()
        linear.bias[2 * dim:3 * dim] = 1  # gate_msa
        linear.bias[5 * dim:] = 1  # gate_mlp
    clip.vision_model.adaLN_modulation[1].weight.zero_()
    clip.vision_model.adaLN_modulation[1].bias.zero_()
    for linear in (clip.t_embedder.mlp[0], clip.t_embedder.mlp[2]):
        nn.init.normal_(linear.weight, std=0.02)
        linear.bias.zero_()


def modulate(x, shift, scale):
    """DiT's adaLN modulation (Peebles and Xie 2023): scale and shift a normalised feature by the step's."""
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------
# The scorers. PickScore is CLIP; the SPM is PickScore plus time conditioning in the image tower.


def local_specs(base, processor, checkpoint):
    """The preference model's base, processor and checkpoint as given, but "tiny" -> the tiny SPM's files, built
    once, and a quoted '~/...' -> the home folder (a hub id stays as it is)."""
    tiny = tiny_spm_paths() if "tiny" in (base, processor, checkpoint) else (None,) * 3
    specs = (base, processor, checkpoint)
    return [t if spec == "tiny" else spec and os.path.expanduser(spec) for spec, t in zip(specs, tiny)]


class PickScoreModel(nn.Module):
    """A CLIP preference model with its own tokenizer and the official preprocessing. Timesteps are ignored."""

    def __init__(self, clip, tokenizer, image_size, mean, std):
        super().__init__()
        self.model = clip  # the "model." prefix of the official state-dict keys
        self.tokenizer = tokenizer  # the preference model's own (the laion CLIP-H one pads with "!"), never SD's
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, base, processor, checkpoint=None, device="cpu", dtype=torch.float32,
                        flags=("--base", "--processor", "--checkpoint")):
        """base: a saved CLIPModel, processor: a saved CLIP processor or tokenizer + preprocessor_config.json
        (hub ids or local folders; "tiny" builds the tiny ones). checkpoint: an official .bin or our
        .safetensors. flags: the caller's names of base, processor and checkpoint, for error messages."""
        from transformers import AutoTokenizer, CLIPModel
        from transformers.image_processing_base import ImageProcessingMixin

        base, processor, checkpoint = local_specs(base, processor, checkpoint)
        for spec, flag in zip((base, processor), flags):
            if spec.startswith(("/", ".")) and not Path(spec).is_dir():  # a local path (expanded above), not a hub id
                raise UserError(f"{flag}: no such folder: {spec}")
            offline_if_hub_unreachable(spec)
        try:
            clip = CLIPModel.from_pretrained(base)
        except Exception as err:
            raise cannot_load("preference model", base, err, flags[0]) from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(processor)
            # Only size and mean/std are used, so read the settings rather than build an image processor.
            settings, _ = ImageProcessingMixin.get_image_processor_dict(processor)
            size = settings["size"]["shortest_edge"] if isinstance(settings["size"], dict) else settings["size"]
            mean, std = settings["image_mean"], settings["image_std"]
        except Exception as err:
            raise cannot_load("preference model processor", processor, err, flags[1]) from None
        if size != clip.config.vision_config.image_size:  # else the first image fails deep inside CLIP
            raise UserError(f"{flags[1]}: {processor} crops images to {size} px, but the preference model {base} "
                            f"takes {clip.config.vision_config.image_size} px")
        model = cls(clip, tokenizer, size, mean, std)
        if checkpoint is not None:
            load_checkpoint(model, checkpoint, flags[2])
        return in_own_dtype(model.requires_grad_(False).eval(), device, dtype)

    @property
    def device(self):
        return self.model.logit_scale.device

    def tokenize(self, prompts):
        """Prompts -> (b, L) input ids, padded to the tokenizer's max length, as the official dataset does."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    def encode_text(self, input_ids):
        """(b, L) ids -> (b, proj) unnormalised text features. They do not depend on t: compute once per prompt."""
        # Stock CLIP text tower, no attention mask (causal only), pooled at the first eos, as the official code.
        pooled = self.model.text_model(input_ids=input_ids.to(self.device)).pooler_output
        return self.model.text_projection(pooled)

    def preprocess(self, images):
        """(b, 3, H, W) in [-1, 1] -> (b, 3, S, S) CLIP pixels, exactly as the official get_preference_score.
        Not the HF image processor path (golden README N9): bicubic without antialias, then crop, then clamp."""
        size = self.image_size
        h, w = images.shape[-2:]
        scale = size / min(h, w)
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
        # Interpolate in fp32 (the official code does it in the decoder's dtype): the same for fp32 input.
        x = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", align_corners=False)
        if new_h != new_w:  # the center crop; Python's round() is half-to-even like torchvision's: round(6.5) = 6
            top, left = round((new_h - size) / 2), round((new_w - size) / 2)
            x = x[..., top:top + size, left:left + size]
        x = (x / 2 + 0.5).clamp(0, 1)  # clamp only after the resize: decoded x0 predictions overshoot [-1, 1]
        return (x - self.mean) / self.std

    def image_features(self, pixels, timesteps):
        """(b, 3, S, S) pixels -> (b, proj) unnormalised image features. PickScore ignores timesteps."""
        pooled = self.model.vision_model(pixel_values=pixels.to(self.model.vision_model.dtype)).pooler_output
        return self.model.visual_projection(pooled)

    def score(self, images, input_ids, timesteps, text_features=None):
        """Images (b, 3, H, W) in [-1, 1], any size; input_ids (b, L) from tokenize(), or text_features (b or 1,
        proj) from encode_text() instead; timesteps: int or (b,) in [0, 999]. Returns (b,) fp32 scores."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise UserError(f"preference model: images must be (batch, 3, height, width), "
                            f"got shape {tuple(images.shape)}")
        b = images.shape[0]
        timesteps = torch.as_tensor(timesteps, device=self.device)
        timesteps = timesteps.expand(b) if timesteps.dim() == 0 else timesteps
        if timesteps.shape != (b,):
            raise UserError(f"preference model: need one timestep per image ({b}), "
                            f"got shape {tuple(timesteps.shape)}")
        if ((timesteps < 0) | (timesteps > NUM_TRAIN_TIMESTEPS - 1)).any():
            raise UserError(f"preference model: timesteps must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], "
                            f"got {timesteps.min().item()}..{timesteps.max().item()}")
        if text_features is None:
            text_features = self.encode_text(input_ids)
        if text_features.shape[0] not in (1, b):
            raise UserError(f"preference model: {text_features.shape[0]} prompts for {b} images")
        return self.judge(images, timesteps, text_features)

    def judge(self, images, timesteps, text_features):
        """score() without its checks, for SPO's step loop, where the timestep check would make the host wait for
        the device at every pool. timesteps: (b,), text_features: (b or 1, proj)."""
        return self.score_pixels(self.preprocess(images.to(self.device)), timesteps, text_features)

    def score_pixels(self, pixels, timesteps, text_features):
        """(b, 3, S, S) CLIP pixels, (b,) timesteps, (b or 1, proj) text features -> (b,) fp32 scores."""
        image_features = self.image_features(pixels, timesteps)
        # Plain norms, no eps, as the official code; in fp32 whatever the model dtype.
        img = image_features.float() / image_features.float().norm(dim=-1, keepdim=True)
        txt = text_features.float() / text_features.float().norm(dim=-1, keepdim=True)
        return self.model.logit_scale.float().exp() * (img * txt).sum(dim=-1)


class StepAwarePreferenceModel(PickScoreModel):
    """PickScore whose image tower is conditioned on the denoising step t (the SPM, paper section 4.1)."""

    def __init__(self, clip, tokenizer, image_size, mean, std):
        super().__init__(clip, tokenizer, image_size, mean, std)
        add_time_conditioning(clip)
        init_time_conditioning(clip)  # overwritten when a checkpoint is loaded

    def image_features(self, pixels, timesteps):
        # We drive CLIP's vision layers ourselves, so that each one is modulated by t: DiT's adaLN block (shift and
        # scale before attention and MLP, a gate on each residual), whose gates start at 1, not at 0 as in
        # adaLN-Zero, so that an untrained SPM is PickScore (init_time_conditioning).
        vision = self.model.vision_model
        t_emb = self.model.t_embedder(timesteps).to(vision.dtype)  # (b, D), computed in fp32
        h = vision.pre_layrnorm(vision.embeddings(pixels.to(vision.dtype)))  # (b, 1 + patches, D)
        for layer in vision.encoder.layers:
            modulation = layer.adaLN_modulation(t_emb)[:, None, :]  # (b, 1, 6D), broadcast over tokens
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
            attn = layer.self_attn(hidden_states=modulate(layer.layer_norm1(h), shift_msa, scale_msa))[0]
            h = h + gate_msa * attn
            h = h + gate_mlp * layer.mlp(modulate(layer.layer_norm2(h), shift_mlp, scale_mlp))
        shift, scale = vision.adaLN_modulation(t_emb).chunk(2, dim=-1)  # (b, D) each
        pooled = modulate(vision.post_layernorm(h[:, 0]), shift, scale)  # the CLS token
        return self.model.visual_projection(pooled)


# PickScore's CLIP ViT-H/14 (its config.json), for --random-init: the full-size judge with random weights.
PICKSCORE_ARCHITECTURE = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024)


def in_own_dtype(model, device, dtype):
    """The preference model on device, its two towers and projections in dtype (the image tower's adaLN
    modulations included). The rest stays fp32 whatever dtype: the SPM's timestep embedding (TimestepEmbedder
    says why), logit_scale (it is exponentiated: bf16 would shrink PickScore's 100 by 1.1%) and the pixel
    mean/std."""
    model.to(device=device, dtype=torch.float32)
    clip = model.model
    for tower in (clip.text_model, clip.vision_model, clip.text_projection, clip.visual_projection):
        tower.to(dtype)
    return model


def load_preference_model(kind, base, processor, checkpoint, device="cpu", dtype=torch.float32,
                          flags=("--base", "--processor", "--checkpoint"), random_init=False):
    """The judge for SPO ("spm") or for evaluation and the ablation ("pickscore"); both score(images, ids, t).
    random_init: PickScore's architecture with random weights and the tiny tokenizer, no download."""
    classes = {"spm": StepAwarePreferenceModel, "pickscore": PickScoreModel}
    if kind not in classes:
        raise UserError(f"unknown preference model '{kind}' (choose from {', '.join(classes)})")
    if not random_init:
        return classes[kind].from_pretrained(base, processor, checkpoint, device=device, dtype=dtype, flags=flags)
    from transformers import CLIPConfig, CLIPModel

    with tempfile.TemporaryDirectory() as folder:  # the tokenizer is read into memory
        tokenizer = write_tiny_tokenizer(folder, pad_token="!", max_length=77)
    with torch.device(device), seeded_weights(device):  # seeded, so CLIP's and the t-MLP's random start repeat
        model = classes[kind](CLIPModel(CLIPConfig(**PICKSCORE_ARCHITECTURE)), tokenizer, 224, OPENAI_CLIP_MEAN,
                              OPENAI_CLIP_STD)
    return in_own_dtype(model.requires_grad_(False).eval(), device, dtype)


class PickScoreOnImages:
    """PickScore exactly as PickScore's authors compute it (github.com/yuvalkirstain/PickScore): their CLIP
    processor on PIL images (resize the shortest side, center crop, normalise), then logit_scale.exp() *
    cosine(image, text). Comparable with published numbers; also the reference's pseudo-labeller for SDXL SPMs."""

    def __init__(self, base, processor, device="cpu", flags=("--base", "--processor", "--checkpoint")):
        from transformers import CLIPImageProcessorPil  # the PIL one, as PickScore's code ran; needs no torchvision

        self.model = load_preference_model("pickscore", base, processor, None, device=device, flags=flags)
        processor = local_specs(base, processor, None)[1]
        try:
            self.processor = CLIPImageProcessorPil.from_pretrained(processor)
        except Exception as err:
            raise cannot_load("image processor", processor, err, flags[1]) from None

    @torch.no_grad()
    def __call__(self, images, prompts):
        """PIL images, and a list of one prompt for all of them or of one each -> (b,) scores."""
        clip, tok, device = self.model.model, self.model.tokenizer, self.model.device
        # their tokenizer call (padding to the longest, with the attention mask), not our fixed-length one
        text = tok(list(prompts), padding=True, truncation=True, max_length=tok.model_max_length, return_tensors="pt")
        text_features = clip.text_projection(clip.text_model(**text.to(device)).pooler_output)  # (1 or b, proj)
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(device)  # (b, 3, S, S)
        return self.model.score_pixels(pixels, None, text_features)


# ----------------------------------------------------------------------------------------------
# Checkpoints: the official .bin (read with weights_only, never unpickled freely) and our .safetensors.


def load_checkpoint(model, spec, flag):
    """Load a local file or 'owner/repo/filename' on the hub into model, requiring every key to fit."""
    from safetensors.torch import load_file

    path = resolve_file(str(spec), flag)
    try:
        if str(path).endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # first sentence only: torch's weights_only message goes on to advise unsafe loading
        reason = first_line(err).split(". ")[0]
        raise UserError(f"{flag}: cannot read {spec} as .safetensors or weights-only .bin: {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag}: {spec} holds a {type(state).__name__}, not a state dict of tensors")
    own = model.state_dict()
    # Old checkpoints may carry buffers newer transformers no longer save (position_ids); like the official
    # loader, accept an extra key when it equals what the model already holds.
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not _equals_buffer(model, k, state[k])]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    kinds = [("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)]
    problems = [f"{what} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in kinds if keys]
    if problems:
        raise UserError(f"{flag}: {spec} does not fit the base model: {'; '.join(problems)}")
    model.load_state_dict({k: state[k] for k in own})


def _equals_buffer(model, key, value):
    try:
        return torch.equal(model.get_buffer(key).cpu(), value)
    except AttributeError:
        return False


def save_checkpoint(model, path):
    """Write model's state dict as .safetensors in the official key layout, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


# ----------------------------------------------------------------------------------------------
# The tiny offline SPM: same code path as the real one, only smaller, built once with no downloads.

def write_image_processor_settings(folder, size, mean, std):
    """An ordinary preprocessor_config.json. The SPM only reads size and mean/std from it (see preprocess)."""
    settings = dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": size},
                    crop_size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std),
                    do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, resample=3)
    Path(folder, "preprocessor_config.json").write_text(json.dumps(settings, indent=2))


def build_tiny_spm(folder):
    """A seeded tiny CLIP saved as a transformers model folder plus a processor folder (tokenizer + settings),
    and a "trained" SPM checkpoint whose time conditioning is random, so tiny runs really depend on t."""
    from transformers import CLIPConfig, CLIPModel

    with seeded_weights("cpu"):  # from seed 0, the caller's RNG untouched
        tokenizer = write_tiny_tokenizer(Path(folder) / "processor", pad_token="!")  # as the laion CLIP-H one pads
        write_image_processor_settings(Path(folder) / "processor", 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     hidden_act="quick_gelu")
        config = CLIPConfig(
            text_config=dict(**tower, vocab_size=len(tokenizer), max_position_embeddings=16,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(**tower, image_size=32, patch_size=4), projection_dim=16)
        clip = CLIPModel(config)
        clip.save_pretrained(Path(folder) / "model")
        spm = StepAwarePreferenceModel(clip, tokenizer, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        with torch.no_grad():  # as the golden model's 0.3 * N(0, 1) on the time conditioning: not the identity
            for name, p in spm.named_parameters():
                if "adaLN_modulation" in name or "t_embedder" in name:
                    p.add_(0.3 * torch.randn_like(p))
        save_checkpoint(spm, Path(folder) / "spm.safetensors")


def tiny_spm_paths():
    """(base, processor, checkpoint) of the tiny SPM, built on first use."""
    folder = build_once("tiny-spm-v2", build_tiny_spm)
    return str(folder / "model"), str(folder / "processor"), str(folder / "spm.safetensors")


# ----------------------------------------------------------------------------------------------
# Training data: Pick-a-Pic v1 parquet shards (Kirstain et al. 2023), streamed one row group at a time.
# A local folder holds DATA/train-*.parquet and DATA/validation_unique-*.parquet (or the hub's DATA/data/...).

SPLITS = {"train": "train", "validation": "validation_unique"}  # the reference's train and valid split names
COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "num_example_per_prompt")


def find_shards(data, split):
    """The split's parquet files in a local folder, or in a hub dataset (downloaded once into the HF cache)."""
    folder = Path(os.path.expanduser(data))
    if not folder.is_dir():
        if str(data).startswith(LOCAL_ONLY) or str(data).count("/") != 1:
            raise UserError(f"--data: no such folder: {data}")
        from huggingface_hub import snapshot_download
        try:
            folder = Path(snapshot_download(data, repo_type="dataset", allow_patterns=[f"data/{split}-*.parquet"]))
        except Exception as err:
            raise cannot_load("dataset", data, err, "--data") from None
    shards = sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob(f"data/{split}-*.parquet"))
    if not shards:
        raise UserError(f"--data {data}: no {split}-*.parquet files (expected {data}/{split}-*.parquet)")
    return shards


def row_groups(shards):
    """[(file, row group, first row of the group in its file, rows)] from the parquet footers alone."""
    import pyarrow.parquet as pq

    units = []
    for path in shards:
        try:
            meta = pq.ParquetFile(path)
        except Exception as err:
            raise UserError(f"{path}: not a readable parquet file ({first_line(err)})") from None
        missing = [c for c in COLUMNS if c not in meta.schema_arrow.names]
        if missing:
            raise UserError(f"{path}: missing Pick-a-Pic columns {', '.join(missing)}")
        first = 0
        for g in range(meta.num_row_groups):
            rows = meta.metadata.row_group(g).num_rows
            units.append((path, g, first, rows))
            first += rows
    return units


def pil_to_tensor(image):
    """A PIL image -> (3, H, W) float in [-1, 1]."""
    x = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return x.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1  # (H, W, 3) -> (3, H, W)


def open_image(value, where):
    """JPEG bytes (or the {"bytes": ...} of a hub dataset) -> an RGB PIL image."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(value["bytes"] if isinstance(value, dict) else value)).convert("RGB")
    except Exception as err:
        raise UserError(f"{where}: not a readable image ({first_line(err)})") from None


def resize_crop(image, resolution):
    """A PIL image -> (3, R, R) in [-1, 1] as the reference dataset: shortest edge to R (PIL bicubic), then
    the centre crop. The long edge is int(R * long / short), transformers' rounding (784 x 1568 at R = 512 gives
    1024; int(long * (R / short)) would give 1023)."""
    from PIL import Image

    short = min(image.size)
    w, h = (int(resolution * side / short) for side in image.size)
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return pil_to_tensor(image.crop((left, top, left + resolution, top + resolution)))


def check_row(row, where):
    """A Pick-a-Pic row's labels, caption and prompt count, or a one-line error naming the row."""
    labels = (row["label_0"], row["label_1"])
    if any(v not in (0, 0.5, 1) for v in labels):  # None and NaN fail here too
        raise UserError(f"{where}: labels ({labels[0]}, {labels[1]}) must each be 0, 0.5 or 1")
    if row["has_label"] and sum(labels) != 1:
        raise UserError(f"{where}: labels ({labels[0]}, {labels[1]}) must sum to 1: (1, 0), (0, 1) or (0.5, 0.5)")
    n = row["num_example_per_prompt"]
    if not isinstance(n, (int, float)) or not 1 <= n <= 2**24:  # a string or None: a shard of another format
        raise UserError(f"{where}: num_example_per_prompt must be a count in [1, 2^24], got {n!r}")
    if not isinstance(row["caption"], str):
        raise UserError(f"{where}: caption must be a string, got {row['caption']!r}")


def read_rows(units, resolution, labelled_only, seed=None, skip=0, rank=0, world=1, block=1, labeller=None):
    """Yield pairs (caption, image_0, image_1, label_0, label_1, n) from the units in order, or, with a seed,
    forever in a fresh shuffle per epoch. labeller(caption, image_0, image_1) -> (label_0, label_1) replaces the
    human labels (pickscore_labeller); it sees the full-size images. A 190 GB dataset cannot be shuffled globally
    without random access, so we shuffle the order of row groups and the rows inside each (the reference shuffles
    all rows).
    Several ranks share one stream: number the pairs it keeps 0, 1, 2, ... (across epochs); rank r takes the
    blocks of `block` consecutive pairs whose index is r modulo world, so the ranks' shares are disjoint, cover
    the stream and never run dry before one another. Every rank reads each row group's bytes but decodes only
    its own images. `skip` pairs of the stream (all ranks' together) are passed over without decoding them:
    that is how --resume finds its place."""
    import pyarrow.parquet as pq

    epoch, position = 0, 0  # position: the stream index of the next pair kept
    while True:
        order = list(range(len(units)))
        if seed is not None:
            order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for u in order:
            path, group, first, n_rows = units[u]
            if not labelled_only and position + n_rows <= skip:  # every row is a pair: pass over unread
                position += n_rows
                continue
            columns = pq.ParquetFile(path).read_row_group(group, columns=list(COLUMNS)).to_pydict()
            rows = range(n_rows)
            if seed is not None:
                # one permutation per (seed, epoch, row group); the prime factors keep different triples apart
                gen = torch.Generator().manual_seed(seed * 7919 + epoch * 104729 + u)
                rows = torch.randperm(n_rows, generator=gen).tolist()
            for i in rows:
                if labelled_only and not columns["has_label"][i]:
                    continue  # as the reference, which keeps only labelled pairs outside training
                position += 1
                if position - 1 < skip or (position - 1) // block % world != rank:
                    continue
                row = {c: columns[c][i] for c in COLUMNS}
                where = f"{path}, row {first + i}"
                check_row(row, where)
                image_0, image_1 = (open_image(row[c], f"{where}, {c}") for c in ("jpg_0", "jpg_1"))
                labels = labeller(row["caption"], image_0, image_1) if labeller else (row["label_0"], row["label_1"])
                yield (row["caption"], resize_crop(image_0, resolution), resize_crop(image_1, resolution),
                       float(labels[0]), float(labels[1]), float(row["num_example_per_prompt"]))
        epoch += 1
        if seed is None:
            return


def pickscore_labeller(pickscore, threshold):
    """Labels as the reference's SDXL SPM training makes them (spm_task.update_as_pickscore_label): PickScore on
    the two clean images; (1, 0) or (0, 1) where its softmax preference p_0 - p_1 exceeds the threshold, else a
    tie (0.5, 0.5). pickscore: a PickScoreOnImages."""
    def label(caption, image_0, image_1):
        p_0, p_1 = torch.softmax(pickscore([image_0, image_1], [caption]).float(), dim=0).tolist()
        return (1.0, 0.0) if p_0 - p_1 > threshold else (0.0, 1.0) if p_1 - p_0 > threshold else (0.5, 0.5)
    return label


def make_labeller(args, device):
    """PickScore (--base and --processor, by default the preset's) as the labeller, if --pickscore-labels asks."""
    if args.pickscore_labels is None:
        return None
    return pickscore_labeller(PickScoreOnImages(args.base, args.processor, device), args.pickscore_labels)


def batches(rows, batch_size, device):
    """Group pairs into (captions, images_0 (b, 3, R, R), images_1, label_0 (b,), label_1, n) on device."""
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, batch_size)):
        captions, im0, im1, l0, l1, n = zip(*chunk)
        t = lambda v: torch.tensor(v, device=device)
        yield list(captions), torch.stack(im0).to(device), torch.stack(im1).to(device), t(l0), t(l1), t(n)


def in_lockstep(batches, world):
    """The micro-batches of a training stream, with one all-reduce each so that a row only one rank reads (an
    unreadable JPEG, bad labels) stops every rank before the same micro-batch (stop_together)."""
    while True:
        try:
            batch, problem = next(batches), None
        except UserError as err:
            batch, problem = None, err
        stop_together(problem, world)
        yield batch


# ----------------------------------------------------------------------------------------------
# SPM training (paper section 4.1): both images of a pair are noised to one t with ONE shared noise, denoised
# in one step to the frozen SD's x0-prediction, and the SPM learns to rank those at t as humans ranked the
# clean images. Evaluation measures that ranking at fixed t; at t = 0 it scores the clean images.

# SPM training defaults: the reference's SD1.5 run (its configs and DeepSpeed settings) on 4 GPUs with batch 16
# each (--batch-size's default). Its DeepSpeed config asks for 16 accumulation steps, but the accelerate it pins
# (commit d1aa558, 0.18.dev) overwrites them with the Accelerator's 1 ("Updating DeepSpeed's gradient accumulation
# steps to 1 from 16"): 8000 updates of 4 x 16 = 64 pairs, about one pass over Pick-a-Pic v1. Batch and
# accumulation are per GPU here as there: one GPU needs --grad-accum 4 for the same 64.
TRAIN_DEFAULTS = {
    "sd15": dict(max_steps=8000, eval_every=1000, grad_accum=1, lr=3e-6, weight_decay=0.3, warmup_steps=500),
    "tiny": dict(max_steps=60, eval_every=30, grad_accum=1, lr=1e-3, weight_decay=0.0, warmup_steps=5),  # a demo
}
# SDXL's SPM (the reference's sdxl_spm task): 1024 px, lr 1e-6 for 7000 steps, otherwise as SD1.5.
TRAIN_DEFAULTS["sdxl"] = dict(TRAIN_DEFAULTS["sd15"], max_steps=7000, lr=1e-6)
TRAIN_DEFAULTS["tiny-sdxl"] = TRAIN_DEFAULTS["tiny"]
EVAL_TIMESTEPS = (0, 251, 501, 701, 951)  # the reference's evaluation_timesteps
# The reference trains SDXL's SPM on PickScore's labels of the Pick-a-Pic pairs (its sdxl_spm task), not the humans'.
PICKSCORE_LABELS = {"sdxl": 0.1, "tiny-sdxl": 0.1}


def encode_images(pipe, images, generator):
    """(n, 3, R, R) in [-1, 1] -> SD latents (n, 4, R/8, R/8): a sample of the VAE posterior, scaled."""
    posterior = pipe.vae.encode(images.to(pipe.vae.dtype)).latent_dist
    return posterior.sample(generator=generator).float() * pipe.vae.config.scaling_factor


@torch.no_grad()
def denoised_pair(pipe, images_0, images_1, cond, uncond_1, t, generator, cfg_scale):
    """The decoded one-step x0-predictions of both images at t (b,): what SPO's sampler shows the SPM.
    cond: the captions' conditioning (b rows), uncond_1: the negative one (1 row)."""
    latents = encode_images(pipe, torch.cat([images_0, images_1]), generator)  # (2b, c, h, w)
    tt = t.repeat(2)  # (2b,): both images of a pair at one t
    noise = torch.randn((len(t), *latents.shape[1:]), generator=generator, device=latents.device)  # (b, c, h, w)
    noise = noise.repeat(2, 1, 1, 1)  # (2b, c, h, w): pair p's two images get the same noise
    a = pipe.alphas_cumprod[tt].view(-1, 1, 1, 1)  # (2b, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise  # the forward process q(x_t | x_0), one noise per pair
    rows = torch.arange(len(t)).repeat(2)  # both images of pair p see caption p
    eps = predict_noise(pipe.unet, x_t, tt, take(cond, rows), take(uncond_1, torch.zeros_like(rows)), cfg_scale)
    x0 = ddim_step(eps, tt, x_t, pipe.alphas_cumprod, 1, 0.0, pipe.prediction_type)[0]  # only x0: eta, step moot
    return pipe.decode(x0).chunk(2)  # (b, 3, H, W) each: images_0's, then images_1's


def training_pixels(model, images):
    """Images in [-1, 1] -> SPM pixels as the reference SPM training: clamp, bicubic resize straight to S x S
    (no crop, unlike SPO-time preprocessing), clamp again, normalise."""
    size = model.image_size
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x - model.mean) / model.std


def pair_scores(model, images_0, images_1, input_ids, t):
    """(scores_0, scores_1), each (b,): both images against their captions at t, in one SPM image pass."""
    text_features = model.encode_text(input_ids).repeat(2, 1)  # (b, proj) -> (2b, proj): once per image
    pixels = training_pixels(model, torch.cat([images_0, images_1]))  # (2b, 3, S, S): the images_0, then images_1
    return model.score_pixels(pixels, torch.cat([t, t]), text_features).chunk(2)  # (2b,) -> two (b,)


class PairScores(nn.Module):
    """pair_scores as a forward(): DistributedDataParallel all-reduces gradients only for what runs through one."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images_0, images_1, input_ids, t):
        return pair_scores(self.model, images_0, images_1, input_ids, t)


def preference_loss(scores_0, scores_1, label_0, label_1, num_per_prompt):
    """PickScore's loss (Kirstain et al. 2023), as the SPM is trained: cross-entropy of softmax([s_0, s_1])
    against the labels (human, or PickScore's with --pickscore-labels), plus log(0.5) on ties so that a perfect
    tie costs 0 instead of log 2. Each pair is weighted by w = 1 / (pairs of its prompt), so busy prompts do not
    dominate. Returns (sum of w * loss, sum of w): the loss is their ratio over ALL the pairs of an update, since
    the reference all-gathers every GPU's pairs before it normalises the weights."""
    # in fp32: the reference's DeepSpeed bf16 run had bf16 scores (logit_scale.exp() about 98.9 there, not 100)
    log_p = torch.stack([scores_0, scores_1], dim=-1).float().log_softmax(dim=-1)  # (b, 2)
    loss = -(label_0 * log_p[:, 0] + label_1 * log_p[:, 1]) + (label_0 == label_1) * math.log(0.5)
    weight = 1 / num_per_prompt
    return (weight * loss).sum(), weight.sum()


def lr_factor(step, warmup, total):
    """The learning rate of optimizer update `step` (from 0), as a fraction of --lr, as the reference's DeepSpeed
    0.12.3 WarmupDecayLR sets it: a *logarithmic* warmup log(i + 1) / log(warmup) over iterations i < warmup (its
    default warmup_type), then linear decay (total - i) / (total - warmup) towards 0. The scheduler steps after
    each update, so update k >= 1 runs at iteration i = k - 1; update 0 runs at the optimizer's own lr, as that
    version sets none before its first step (later ones start at the minimum, 0). total is --max-steps: the
    reference passes max_steps * world_size, which accelerate divides by the number of processes again."""
    warmup = max(2, warmup)  # as DeepSpeed
    if step == 0:
        return 1.0
    i = step - 1
    if i < warmup:
        return math.log(i + 1) / math.log(warmup)
    return max(0.0, (total - i) / max(1, total - warmup))


@torch.no_grad()
def evaluate(model, pipe, units, args, autocast, rank=0, world=1, labeller=None):
    """Pairwise accuracy on the labelled validation pairs at each t; a human tie counts half when the model
    prefers either image (the reference's rule). With PickScore's labels (labeller) the pairs it calls a tie are
    left out, as the reference does. Noise is seeded by the batch, so the numbers are repeatable.
    Several ranks split the whole validation set by batches (batch b on rank b mod world, with the noise of
    batch b) and sum their counts: the same numbers as one process."""
    device = model.device
    correct, count = {t: 0.0 for t in args.eval_timesteps}, 0
    size = (args.resolution, args.resolution)
    uncond = pipe.encode_negative(1, size) if pipe else None
    rows = read_rows(units, args.resolution, True, rank=rank, world=world, block=args.batch_size, labeller=labeller)
    problem = []

    def share():  # this rank's batches; a row it cannot use ends them, and every rank stops before the sums below
        try:
            yield from batches(rows, args.batch_size, device)
        except UserError as err:
            problem.append(err)

    for k, (captions, im0, im1, l0, l1, _) in enumerate(share()):
        counted = (l0 != 0.5) if labeller else torch.ones_like(l0, dtype=torch.bool)
        b = k * world + rank  # the batch's index in the whole validation set
        ids = model.tokenize(captions)
        cond = pipe.encode_prompts(captions, size) if pipe else None
        for t in args.eval_timesteps:
            tt = torch.full((len(captions),), t, device=device)
            gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + b * 1000 + t)
            x0, x1 = (im0, im1) if t == 0 else denoised_pair(pipe, im0, im1, cond, uncond, tt, gen, args.cfg)
            with autocast:
                s0, s1 = pair_scores(model, x0, x1, ids, tt)
            correct[t] += ((s0 > s1) * l0 + (s0 < s1) * l1)[counted].sum().item()
        count += int(counted.sum())
    stop_together(problem[0] if problem else None, world)
    *sums, count = all_ranks_sum([*correct.values(), count], world)  # halves and wholes: exact
    correct, count = dict(zip(correct, sums)), int(count)
    if count == 0:
        raise UserError("validation: no labelled pairs (has_label) in the validation_unique shards")
    return {t: c / count for t, c in correct.items()}, count


def print_accuracy(accuracy, count, title):
    lines = [f"{title}: accuracy on {count} validation pairs", "     t  accuracy"]
    tqdm.write("\n".join(lines + [f"{t:6d}  {acc:8.3f}" for t, acc in accuracy.items()]))  # above the progress bar


def precision_setup(args, world=1):
    """(device, dtype of the frozen SD weights, autocast for the fp32 SPM weights, nanoGPT style). --precision is
    the SPM's; in a half-precision run the frozen SD is fp16 whichever half, as the reference (its SD in fp16, its
    SPM in DeepSpeed bf16). Under torchrun each rank takes the GPU of its LOCAL_RANK."""
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dtype = DTYPES[args.precision]
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    return device, torch.float16 if dtype != torch.float32 else dtype, autocast


def save_training_checkpoint(out, model, optimizer, scaler, progress):
    """checkpoints/step-N/: the SPM (official key layout), AdamW and GradScaler state, progress. Written under a
    temporary name and renamed; only the newest is kept, as CLIP-H weights plus AdamW state take ~12 GB."""
    final = out / "checkpoints" / f"step-{progress['step']}"
    with atomic_folder(final) as tmp:
        save_checkpoint(model, tmp / "spm.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "progress.json").write_text(json.dumps(progress))
    remove_unfinished(out / "checkpoints")
    for old in (out / "checkpoints").glob("step-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old)


def training_checkpoints(out):
    """checkpoints/step-N, oldest first ("step-N" only)."""
    found = [d for d in checkpoint_folders(out, "step-") if d.name.removeprefix("step-").isdigit()]
    return sorted(found, key=lambda d: int(d.name.removeprefix("step-")))


def resume_training(out, model, optimizer, scaler, device, world):
    """--resume: the newest checkpoint into the SPM, AdamW and GradScaler (every rank loads the same one). Returns
    its progress, {} when the run stopped before its first checkpoint."""
    ckpts = training_checkpoints(out)
    if not ckpts:
        return {}
    progress = read_json(ckpts[-1] / "progress.json", "--resume")
    if not all(isinstance(progress.get(k), int) and progress[k] >= 0 for k in ("step", "micro")):
        raise UserError(f"--resume: {ckpts[-1]}/progress.json lacks its step and micro-batch counts")
    if progress.get("world_size", 1) != world:
        raise UserError(f"--resume: the run in {out} used {progress.get('world_size', 1)} ranks, not {world}")
    load_checkpoint(model, ckpts[-1] / "spm.safetensors", "--resume")
    load_optimizer_state(ckpts[-1] / "optimizer.pt", optimizer, scaler, device)
    return progress


def train_command(args, rank=0, world=1):
    """Train on one rank of `world` (torchrun): each rank reads its own share of the pairs (read_rows), the
    gradients are all-reduced over ranks (DDP) on the last micro-batch of each accumulation group and rescaled to
    those of sum(w * loss) / sum(w) over every rank's and micro-batch's pairs (preference_loss), every rank runs
    the same optimizer steps, and only rank 0 writes files. Returns the SPM, or None when a signal stopped the run."""
    out, main_rank = Path(args.out), rank == 0
    train_units = row_groups(find_shards(args.data, SPLITS["train"]))
    valid_units = row_groups(find_shards(args.data, SPLITS["validation"]))
    if sum(u[3] for u in train_units) == 0:
        raise UserError(f"--data {args.data}: the train shards hold no rows")
    device, dtype, autocast = precision_setup(args, world)
    # --max-steps may change, to extend a run; note that it also moves where the learning rate reaches 0
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "max_steps", "eval_every", "device")}
    if args.resume:
        saved = read_json(out / "config.json", "--resume")
        if saved.get("command") != "train":
            raise UserError(f"--resume: {out} is not a preference_model.py train run (its config.json holds other "
                            "settings)")
        changed = [k for k in settings if k != "out" and saved.get(k) != settings[k]]  # the folder may have moved
        if changed:
            raise UserError(f"--resume: these settings differ from the run in {out}: {', '.join(changed)}")

    # Models: the frozen SD that makes the noisy x0-predictions, and the SPM, all of whose weights train.
    pipe = Pipeline(args.pretrained, device, dtype, vae=args.vae)
    labeller = make_labeller(args, device)
    model = StepAwarePreferenceModel.from_pretrained(args.base, args.processor, args.init_checkpoint,
                                                     flags=("--base", "--processor", "--init-checkpoint"))
    if args.init_checkpoint is None:  # again, from our seed: loading the CLIP may draw from the global RNG
        torch.manual_seed(args.seed)
        init_time_conditioning(model.model)
    model = model.to(device).requires_grad_(True).train()
    params = list(model.parameters())
    # One parameter group, weight decay on everything (logit scale included), as the reference's DeepSpeed AdamW.
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # the SPM's precision

    progress = resume_training(out, model, optimizer, scaler, device, world) if args.resume else {}
    step, micro = progress.get("step", 0), progress.get("micro", 0)  # optimizer steps, micro-batches (each rank's)
    if args.resume and main_rank:
        print(f"resuming {out} at step {step}" if progress else
              f"--resume: {out} holds no checkpoint yet: the run starts from the beginning")
    metrics_path = out / "metrics.jsonl"
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(vars(args), indent=2)))
        if metrics_path.exists():  # drop what was logged after the checkpoint we resume from
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(metrics_path)
                           if 0 < r["step"] <= step or (step > 0 and r["step"] == 0))
            atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(kept))
    # Several ranks: DDP over all the SPM's weights; it starts every rank from rank 0's (they are equal anyway).
    scorer = PairScores(model)
    if world > 1:
        scorer = DistributedDataParallel(scorer, device_ids=[device.index] if device.type == "cuda" else None,
                                         broadcast_buffers=False)

    def log(record):
        if main_rank:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate_and_log():  # every rank evaluates its share of the validation batches
        model.eval()
        accuracy, count = evaluate(model, pipe, valid_units, args, autocast, rank, world, labeller)
        model.train()
        if main_rank:
            print_accuracy(accuracy, count, f"step {step}")
        log(dict(step=step, accuracy={str(t): a for t, a in accuracy.items()}, pairs=count))

    def evaluated(at):  # whether metrics.jsonl holds the accuracy at step `at` (every rank reads the same file)
        return any("accuracy" in r and r["step"] == at for r in read_metrics(metrics_path))

    def checkpoint(evaluate_next=False):
        save_training_checkpoint(out, model, optimizer, scaler, {"step": step, "micro": micro, "world_size": world,
                                                                 "evaluate": evaluate_next})

    if main_rank:
        print(f"{sum(u[3] for u in train_units)} training pairs; {args.batch_size} pairs x {args.grad_accum} "
              f"accumulation x {world} {'rank' if world == 1 else 'ranks'} = "
              f"{args.batch_size * args.grad_accum * world} pairs per update; steps {step}..{args.max_steps}")
    size = (args.resolution, args.resolution)
    uncond = pipe.encode_negative(1, size)  # one row: the empty negative prompt of CFG
    # Each rank's share of one endless shuffled stream (epochs repeat): no rank ever runs out before another.
    rows = read_rows(train_units, args.resolution, False, seed=args.seed, skip=micro * args.batch_size * world,
                     rank=rank, world=world, labeller=labeller)
    data = in_lockstep(batches(rows, args.batch_size, device), world)
    bad_steps = 0
    # The bar closes on the way out, so that an error starts on a line of its own (reports go above it: tqdm.write).
    progress_bar = tqdm(desc="step", initial=step, total=args.max_steps, disable=not main_rank)
    with StopSignal() as stop, progress_bar:
        if step == 0:
            evaluate_and_log()  # the starting point, as the reference's eval_on_start
        elif progress.get("evaluate") and not evaluated(step):
            evaluate_and_log()  # the run stopped during the evaluation that follows its checkpoint
        while step < args.max_steps:
            # A signal to any rank stops all of them before the same step (one all-reduce per step).
            if any(all_ranks_sum([stop.signum is not None], world)):
                if main_rank:
                    checkpoint()
                    tqdm.write(f"stopped by a signal: checkpoint {out / 'checkpoints' / f'step-{step}'}; continue with "
                               f"the same command plus --resume")
                return None
            lr = args.lr * lr_factor(step, args.warmup_steps, args.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = weight_sum = 0.0  # of this rank's pairs in the update
            pairs = args.batch_size * args.grad_accum  # a fixed divisor keeps fp16 backward values at loss size
            for i in range(args.grad_accum):
                captions, im0, im1, l0, l1, n = next(data)
                # Seeded by the micro-batch's index over all ranks: ranks draw differently, resume draws the same.
                gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + micro * world + rank)
                t = torch.randint(0, pipe.num_train_timesteps, (len(captions),), generator=gen, device=device)
                x0, x1 = denoised_pair(pipe, im0, im1, pipe.encode_prompts(captions, size), uncond, t, gen, args.cfg)
                sync = world == 1 or i == args.grad_accum - 1  # all-reduce the gradients on the last micro-batch only
                with contextlib.nullcontext() if sync else scorer.no_sync():
                    with autocast:
                        s0, s1 = scorer(x0, x1, model.tokenize(captions), t)
                    weighted, weights = preference_loss(s0, s1, l0, l1, n)
                    scaler.scale(weighted / pairs).backward()  # normalised once the update is whole
                sums = torch.stack([weighted.detach(), weights.float()]).tolist()  # one transfer
                loss_sum, weight_sum = loss_sum + sums[0], weight_sum + sums[1]
                micro += 1
            loss_sum, weight_sum = all_ranks_sum([loss_sum, weight_sum], world)
            scaler.unscale_(optimizer)
            # DDP averaged the ranks' sums of w * gradient / pairs; the reference's loss is sum(w * loss) / sum(w)
            # over the pairs of every rank and micro-batch (one all-gathered batch): times world * pairs / sum(w).
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(world * pairs / weight_sum)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
            record = dict(step=step + 1, loss=loss_sum / weight_sum, lr=lr, grad_norm=grad_norm)
            if math.isfinite(grad_norm):  # the same on every rank: the gradients are all-reduced
                scaler.step(optimizer)
                bad_steps = 0
            else:  # fp16 overflow (the GradScaler lowers its scale) or a NaN: skip the update, as spo.py does
                record["skipped"], bad_steps = "non-finite gradient", bad_steps + 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress_bar.update()
            log(record)
            if bad_steps >= MAX_BAD_STEPS:
                raise TrainingAborted(f"{bad_steps} non-finite steps in a row (last at step {step}); checkpoints "
                                      f"from before them, if any, are in {out / 'checkpoints'}")
            if step % args.eval_every == 0 or step == args.max_steps:
                if main_rank:  # first, as the evaluation can outlast a preemption's grace period at SD1.5 size
                    checkpoint(evaluate_next=True)
                evaluate_and_log()
    if main_rank:
        save_checkpoint(model, out / "spm.safetensors")
        print(f"SPM written to {out / 'spm.safetensors'} (use it with spo.py --preference-checkpoint)")
    return model


def eval_command(args, rank=0, world=1):
    units = row_groups(find_shards(args.data, SPLITS["validation"]))
    device, dtype, autocast = precision_setup(args, world)
    pipe = Pipeline(args.pretrained, device, dtype, vae=args.vae) if any(t > 0 for t in args.eval_timesteps) else None
    model = load_preference_model(args.kind, args.base, args.processor, args.checkpoint, device=device)
    accuracy, count = evaluate(model, pipe, units, args, autocast, rank, world, make_labeller(args, device))
    if rank == 0:
        print_accuracy(accuracy, count, args.checkpoint or args.kind)
    return accuracy


# ----------------------------------------------------------------------------------------------
# Command line.

def per_model(key):
    """A training flag's defaults for --help: ' (default: sd15 8000, tiny 60, sdxl 7000, tiny-sdxl 60)'."""
    return " (default: " + ", ".join(f"{m} {d[key]}" for m, d in TRAIN_DEFAULTS.items()) + ")"


def load_image(path, decode=True):
    """A PNG/JPEG file -> (1, 3, H, W) in [-1, 1], the range the decoder produces. decode=False only opens it (its
    header) and returns None."""
    from PIL import Image

    if problem := file_problem(path, "--image"):
        raise UserError(problem)
    try:
        image = Image.open(os.path.expanduser(path))
        if not decode:
            image.close()
            return None
        image.load()
    except Exception as err:
        raise UserError(f"--image: cannot read {path}: {first_line(err)}") from None
    return pil_to_tensor(image)[None]


def score_command(args):
    check_text([args.prompt], "--prompt")
    if not 0 <= args.timestep < NUM_TRAIN_TIMESTEPS:
        raise UserError(f"--timestep must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {args.timestep}")
    if problem := device_problem(args.device):
        raise UserError(problem)
    for path in args.image:  # a bad file is named before the model loads; each is decoded when it is scored
        load_image(path, decode=False)
    preset = PRESETS[args.model]
    model = load_preference_model(
        args.kind, args.base or preset["spm_base"], args.processor or preset["spm_processor"],
        args.checkpoint or (preset["spm_checkpoint"] if args.kind == "spm" else None), device=args.device)
    with torch.no_grad():
        text_features = model.encode_text(model.tokenize(args.prompt))  # once, reused for every image
        for path in args.image:  # one at a time: the images may differ in size
            score = model.score(load_image(path), None, args.timestep, text_features=text_features)
            print(f"{score.item():.4f}\t{path}")


def fill_defaults(args):
    """For train and eval: flags, then the --model preset, the first that gives a value wins; then every check
    that needs no model, all problems in one UserError, so a typo costs seconds and writes nothing."""
    preset = PRESETS[args.model]
    if args.pickscore_labels is ...:  # not given: the preset's
        args.pickscore_labels = PICKSCORE_LABELS.get(args.model)
    for key, value in dict(pretrained=preset["pretrained"], vae=preset["vae"], resolution=preset["resolution"],
                           base=preset["spm_base"], processor=preset["spm_processor"],
                           **TRAIN_DEFAULTS[args.model] if args.command == "train" else {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.command == "eval" and args.checkpoint is None and args.kind == "spm":
        args.checkpoint = preset["spm_checkpoint"]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    positive = ["batch_size"] + (["max_steps", "eval_every", "grad_accum", "lr", "max_grad_norm"]
                                 if args.command == "train" else [])
    flag = lambda k: "--" + k.replace("_", "-")
    problems = [f"{flag(k)} must be > 0, got {getattr(args, k)}" for k in positive if getattr(args, k) <= 0]
    problems += [f"--eval-timesteps must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {t}"
                 for t in args.eval_timesteps if not 0 <= t < NUM_TRAIN_TIMESTEPS]
    if len(set(args.eval_timesteps)) < len(args.eval_timesteps):
        problems.append(f"--eval-timesteps names a t twice: {' '.join(map(str, args.eval_timesteps))}")
    if args.cfg < 1:  # predict_noise, as diffusers, turns guidance off at <= 1; the reference applies it whatever
        problems.append(f"--cfg must be >= 1 (1: no guidance), got {args.cfg}")
    if problem := size_problem(args.resolution, "--resolution"):
        problems.append(problem)
    if not 0 <= args.seed <= MAX_SEED:
        problems.append(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if args.pickscore_labels is not None and not 0 <= args.pickscore_labels < 1:
        problems.append(f"--pickscore-labels must be in [0, 1) or none, got {args.pickscore_labels}")
    if problem := device_problem(args.device):
        problems.append(problem)
    if args.command == "train":
        problems += [f"{flag(k)} must be >= 0, got {getattr(args, k)}"
                     for k in ("weight_decay", "warmup_steps") if getattr(args, k) < 0]
        out = Path(args.out)
        if problem := output_problem(args.out, "--out", is_file=False):
            problems.append(problem)
        elif args.resume and not (out / "config.json").is_file():
            problems.append(f"--resume: {out} holds no run to resume (no config.json)")
        elif args.resume:
            training_checkpoints(out)  # a checkpoints folder we may not read is refused now (as a path error)
        elif out.is_dir() and holds_files(out):
            problems.append(f"--out {out} already holds files: pass --resume to continue that run")
    if problems:
        raise UserError("; ".join(problems))
    try:
        import pyarrow  # noqa: F401 -- the optional extra, needed only by train and eval
    except ImportError:
        raise UserError(f"'{args.command}' reads parquet shards with pyarrow: pip install pyarrow") from None


def threshold_or_none(value):
    return None if value == "none" else finite_float(value)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="print one preference score per image")
    score.add_argument("--prompt", required=True)
    score.add_argument("--image", action="append", required=True, help="repeat for several images")
    score.add_argument("--timestep", type=int, default=0, help="denoising step t in [0, 999]; 0 = a clean image")
    score.add_argument("--model", choices=list(PRESETS), default="sd15", help="preset that supplies the defaults")
    score.add_argument("--kind", choices=["spm", "pickscore"], default="spm", help="step-aware or plain PickScore")
    score.add_argument("--base", help="CLIP model: hub id or folder (default: the preset's)")
    score.add_argument("--processor", help="tokenizer + image settings: hub id or folder (default: the preset's)")
    score.add_argument("--checkpoint", help="SPM weights: .bin/.safetensors file or owner/repo/filename")
    score.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    train = commands.add_parser("train", help="train an SPM on Pick-a-Pic-format preference pairs")
    evaluate = commands.add_parser("eval", help="print an SPM's validation accuracy at each t")
    for p in (train, evaluate):
        p.add_argument("--data", required=True, help="folder of train-*/validation_unique-*.parquet, or a hub id")
        p.add_argument("--model", choices=list(PRESETS), default="sd15", help="preset that supplies the defaults")
        p.add_argument("--pretrained", help="SD model for the noisy x0-predictions: hub id or folder")
        p.add_argument("--vae", help="another VAE (hub id or folder) for the SD model, none for its own; default from "
                       "the preset")
        p.add_argument("--base", help="the SPM's CLIP (default: the preset's PickScore)")
        p.add_argument("--processor", help="the SPM's tokenizer + image settings (default: the preset's)")
        p.add_argument("--resolution", type=int, help="SD resolution the images are resized to (default: preset)")
        p.add_argument("--batch-size", type=int, default=16, help="pairs per forward, per GPU (16)")
        p.add_argument("--cfg", type=finite_float, default=5.0,
                       help="CFG scale (>= 1) of the x0-prediction, with the empty negative prompt (5.0)")
        p.add_argument("--eval-timesteps", type=int, nargs="+", default=list(EVAL_TIMESTEPS))
        p.add_argument("--pickscore-labels", metavar="THRESHOLD", default=..., type=threshold_or_none,
                       help="replace the human labels by PickScore's preference where it exceeds THRESHOLD, "
                            "else a tie; 'none' keeps the human labels (default: sdxl and tiny-sdxl 0.1, else none)")
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--device", help="default: cuda if available")
        p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                       help="the SPM's autocast; in half precision the frozen SD runs in fp16, as the reference's "
                            "(default: bf16 on CUDA, fp32 on CPU)")
    evaluate.add_argument("--kind", choices=["spm", "pickscore"], default="spm", help="SPM or plain PickScore")
    evaluate.add_argument("--checkpoint", help="SPM weights (default: the preset's released SPM)")
    train.add_argument("--out", required=True, help="run folder: spm.safetensors, metrics.jsonl, checkpoints/")
    train.add_argument("--init-checkpoint", help="start from these SPM weights (default: PickScore + identity init)")
    train.add_argument("--max-steps", type=int, help="optimizer steps" + per_model("max_steps"))
    train.add_argument("--eval-every", type=int, help="evaluate and checkpoint every N steps" + per_model("eval_every"))
    train.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step, per GPU; pairs per update = "
                       "batch size x this x GPUs" + per_model("grad_accum"))
    train.add_argument("--lr", type=finite_float, help="AdamW peak learning rate" + per_model("lr"))
    train.add_argument("--weight-decay", type=finite_float, help="AdamW weight decay" + per_model("weight_decay"))
    train.add_argument("--warmup-steps", type=int,
                       help="log-rate warmup steps, then linear decay" + per_model("warmup_steps"))
    train.add_argument("--max-grad-norm", type=finite_float, default=1.0)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    try:
        with path_errors_refused(), contextlib.ExitStack() as held:
            args = parser.parse_args(argv)
            quiet_libraries()  # stderr keeps to one line per error
            if args.command == "score":
                score_command(args)
                return 0
            rank, world = setup_distributed()  # under torchrun: one process per GPU
            fill_defaults(args)  # every rank checks the same flags before any rank writes anything
            if args.command == "train":  # validation found --out empty or absent, unless resuming
                out = Path(args.out)
                created = not out.exists()
                held.enter_context(run_folder_lock(out, rank, world))  # before this run reads or writes there
                if not args.resume and rank == 0:  # bad data shows only once read
                    held.enter_context(cleared_if_it_fails(out, created))
            if world > 1:
                dist.barrier()
            if args.command == "train":
                train_command(args, rank, world)
            else:
                eval_command(args, rank, world)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingAborted as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
