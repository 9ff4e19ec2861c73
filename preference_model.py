"""The step-aware preference model (SPM) of SPO, and plain PickScore, as image scorers.

SPO compares candidate images at every denoising step, so its judge must score noisy images. The
SPM (paper section 4.1) is PickScore's CLIP ViT-H/14 with time conditioning: a sinusoidal embedding
of the step t and an MLP, DiT-style adaLN modulation (shift, scale, gate for attention and MLP) in
every vision encoder layer, and a (shift, scale) modulation of the pooled image feature. The score
is CLIP's: logit_scale.exp() * cos(image_features(x, t), text_features(prompt)).

The state-dict keys are exactly those of the authors' checkpoints, so their released .bin files
load as they are. Look at scores with

    python preference_model.py score --prompt "a red cat" --image a.png --image b.png --timestep 0
    python preference_model.py score --model tiny --prompt "a red cat" --image a.png  # offline
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import PRESETS, UserError, atomic_write, build_once, cannot_load, quiet_libraries, resolve_file, write_tiny_tokenizer

NUM_TRAIN_TIMESTEPS = 1000  # the SPM is trained on DDPM steps t in [0, 999]

# ----------------------------------------------------------------------------------------------
# The tiny offline SPM: same code path as the real one, only smaller, built once with no downloads.

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the image settings of every CLIP processor here
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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

    torch.manual_seed(0)
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
    with torch.no_grad():  # as the golden model: perturb the time conditioning away from the identity
        for name, p in spm.named_parameters():
            if "adaLN_modulation" in name or "t_embedder" in name:
                p.add_(0.3 * torch.randn_like(p))
    save_checkpoint(spm, Path(folder) / "spm.safetensors")


def tiny_spm_paths():
    """(base, processor, checkpoint) of the tiny SPM, built on first use."""
    folder = build_once("tiny-spm-v2", build_tiny_spm)
    return str(folder / "model"), str(folder / "processor"), str(folder / "spm.safetensors")


# ----------------------------------------------------------------------------------------------
# Time conditioning: the modules the SPM adds to CLIP, named as in the official checkpoints.


class TimestepEmbedder(nn.Module):
    """t -> (b, D): sinusoidal features [cos(t f), sin(t f)] with f = 10000^(-k/128), then an MLP (as in DiT)."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        # Always in fp32: in bf16, t = 951 would round to 952 before the sin/cos ever see it.
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (b, 128)
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (b, 256), cos first
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
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------
# The scorers. PickScore is CLIP; the SPM is PickScore plus time conditioning in the image tower.


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
                        flag_prefix="--"):
        """base: a saved CLIPModel, processor: a saved CLIP processor or tokenizer + preprocessor_config.json
        (hub ids or local folders; "tiny" builds the tiny ones). checkpoint: an official .bin or our
        .safetensors. flag_prefix names the caller's flags in error messages (spo.py may pass "--spm-")."""
        from transformers import AutoTokenizer, CLIPModel
        from transformers.image_processing_base import ImageProcessingMixin

        tiny = tiny_spm_paths() if "tiny" in (base, processor, checkpoint) else (None,) * 3
        base, processor, checkpoint = [t if spec == "tiny" else spec for spec, t in zip((base, processor, checkpoint), tiny)]
        for spec, flag in [(base, "base"), (processor, "processor")]:  # a local path, not a hub id
            if str(spec).startswith(("/", ".", "~")) and not Path(spec).expanduser().is_dir():
                raise UserError(f"{flag_prefix}{flag}: no such folder: {spec}")
        try:
            clip = CLIPModel.from_pretrained(base)
        except Exception as err:
            raise cannot_load("preference model", base, err, f"{flag_prefix}base") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(processor)
            # Only size and mean/std are used, so read the settings rather than build an image processor.
            settings, _ = ImageProcessingMixin.get_image_processor_dict(processor)
        except Exception as err:
            raise cannot_load("preference model processor", processor, err, f"{flag_prefix}processor") from None
        size = settings["size"]["shortest_edge"] if isinstance(settings["size"], dict) else settings["size"]
        model = cls(clip, tokenizer, size, settings["image_mean"], settings["image_std"])
        if checkpoint is not None:
            load_checkpoint(model, checkpoint, f"{flag_prefix}checkpoint")
        return model.requires_grad_(False).eval().to(device=device, dtype=dtype)

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
        pooled = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).pooler_output
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
        image_features = self.image_features(self.preprocess(images.to(self.device)), timesteps)
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
        # We drive CLIP's vision layers ourselves, so that each one is modulated by t (DiT's adaLN-Zero block).
        vision = self.model.vision_model
        t_emb = self.model.t_embedder(timesteps)  # (b, D)
        h = vision.pre_layrnorm(vision.embeddings(pixels.to(self.model.dtype)))  # (b, 1 + patches, D)
        for layer in vision.encoder.layers:
            modulation = layer.adaLN_modulation(t_emb)[:, None, :]  # (b, 1, 6D), broadcast over tokens
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
            attn = layer.self_attn(hidden_states=modulate(layer.layer_norm1(h), shift_msa, scale_msa))[0]
            h = h + gate_msa * attn
            h = h + gate_mlp * layer.mlp(modulate(layer.layer_norm2(h), shift_mlp, scale_mlp))
        shift, scale = vision.adaLN_modulation(t_emb).chunk(2, dim=-1)  # (b, D) each
        pooled = modulate(vision.post_layernorm(h[:, 0]), shift, scale)  # the CLS token
        return self.model.visual_projection(pooled)


def load_preference_model(kind, base, processor, checkpoint, device="cpu", dtype=torch.float32, flag_prefix="--"):
    """The judge for SPO ("spm") or for evaluation and the ablation ("pickscore"); both score(images, ids, t)."""
    classes = {"spm": StepAwarePreferenceModel, "pickscore": PickScoreModel}
    if kind not in classes:
        raise UserError(f"unknown preference model '{kind}' (choose from {', '.join(classes)})")
    return classes[kind].from_pretrained(base, processor, checkpoint, device=device, dtype=dtype,
                                         flag_prefix=flag_prefix)


# ----------------------------------------------------------------------------------------------
# Checkpoints: the official .bin (read with weights_only, never unpickled freely) and our .safetensors.


def load_checkpoint(model, spec, flag="--checkpoint"):
    """Load a local file or 'owner/repo/filename' on the hub into model, requiring every key to fit."""
    from safetensors.torch import load_file

    path = resolve_file(str(spec), flag)
    try:
        if str(path).endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # first sentence only: torch's weights_only message goes on to advise unsafe loading
        reason = str(err).strip().splitlines()[0].split(". ")[0]
        raise UserError(f"{flag}: cannot read {spec} as .safetensors or weights-only .bin: {reason}") from None
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
# Command line.


def load_image(path):
    """A PNG/JPEG file -> (1, 3, H, W) in [-1, 1], the range the decoder produces."""
    from PIL import Image

    if not Path(path).is_file():
        raise UserError(f"--image: no such file: {path}")
    try:
        image = Image.open(path).convert("RGB")
    except Exception as err:
        raise UserError(f"--image: cannot read {path}: {str(err).strip().splitlines()[0]}") from None
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return x.permute(2, 0, 1)[None].float() / 127.5 - 1


def score_command(args):
    preset = PRESETS[args.model]
    model = load_preference_model(
        args.kind, args.base or preset["spm_base"], args.processor or preset["spm_processor"],
        args.checkpoint or (preset["spm_checkpoint"] if args.kind == "spm" else None), device=args.device)
    with torch.no_grad():
        text_features = model.encode_text(model.tokenize(args.prompt))  # once, reused for every image
        for path in args.image:  # one at a time: the images may differ in size
            score = model.score(load_image(path), None, args.timestep, text_features=text_features)
            print(f"{score.item():.4f}\t{path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    args = parser.parse_args(argv)
    quiet_libraries()  # stderr keeps to one line per error
    try:
        score_command(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
