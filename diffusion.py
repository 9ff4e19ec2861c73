"""The pieces that spo.py, sample.py and preference_model.py all need, in one flat module.

Model presets and loading, the tiny offline models, hand-rolled LoRA, and the DDIM step with its
log-probability. Imports run one way: this file imports none of the three scripts.
"""
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import time
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
        spm_checkpoint="tiny",
    ),
}


def quiet_libraries():
    """Silence diffusers' and transformers' info logs and loading bars: our own progress bars say what happens."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        # transformers writes weights only on rank 0 of a process group: rank 0 builds, the others wait for it
        # (a shared cache folder, as on one machine; the tiny models are for tests, not multi-node runs).
        while not final.exists():
            time.sleep(0.2)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(tmp)
        os.rename(tmp, final)  # atomic; fails if another process won the race
        print(f"built {final}", file=sys.stderr)
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
    looks_local = str(spec).startswith(("/", ".", "~")) or Path(spec).parent.exists()
    if looks_local or len(parts) < 3:
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

        quiet_libraries()
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


# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021), hand-rolled: wrap each target nn.Linear, add a low-rank branch.

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, as the official SPO LoRA


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * up(down(x)). The frozen base Linear is kept untouched, so switching the
    branch off gives back the base model exactly: that is how spo.py gets its frozen reference."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.lora = nn.Module()  # parameter names become `<module>.lora.down.weight`, the diffusers layout
        self.lora.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)  # (r, in)
        self.lora.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)  # (out, r)
        nn.init.normal_(self.lora.down.weight, std=1 / rank)  # PEFT's "gaussian" init
        nn.init.zeros_(self.lora.up.weight)  # zero up: training starts exactly at the base model

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        w = self.lora.down.weight  # LoRA weights stay fp32 while the base may be fp16/bf16
        return y + (self.lora.up(self.lora.down(x.to(w.dtype))) * self.scale).to(y.dtype)


def inject_lora(unet, rank, alpha, targets=LORA_TARGETS):
    """Replace every target Linear of the UNet by a LoRALinear; returns the LoRA parameters (fp32)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple("." + t for t in targets))]
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return [p for n, p in unet.named_parameters() if ".lora." in n]


def lora_layers(unet):
    return [m for m in unet.modules() if isinstance(m, LoRALinear)]


class lora_disabled:
    """`with lora_disabled(unet):` runs the frozen base model: the SPO reference (scale 0 *is* the reference)."""

    def __init__(self, unet):
        self.layers = lora_layers(unet)

    def __enter__(self):
        for m in self.layers:
            m.enabled = False

    def __exit__(self, *exc):
        for m in self.layers:
            m.enabled = True


def lora_state_dict(unet):
    """{'unet.<module>.lora.down.weight': (r, in), '...lora.up.weight': (out, r)}: the official SPO file layout."""
    return {f"unet.{n}": p.detach().float().cpu().contiguous() for n, p in unet.named_parameters() if ".lora." in n}


def save_lora(unet, path):
    """Write the LoRA as diffusers' `pytorch_lora_weights.safetensors`, atomically. With alpha != rank the
    alpha goes into diffusers' `lora_adapter_metadata` header entry (a `.alpha` tensor would make diffusers
    reject the file; with alpha = rank the file is byte-for-byte the official layout)."""
    from safetensors.torch import save_file

    layers = lora_layers(unet)
    rank = layers[0].lora.down.out_features
    alpha = layers[0].scale * rank
    metadata = {"format": "pt"}
    if alpha != rank:
        cfg = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": list(LORA_TARGETS)}
        metadata["lora_adapter_metadata"] = json.dumps(cfg, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(lora_state_dict(unet), tmp, metadata=metadata))


def load_lora(unet, path_or_state):
    """Load our/official (`unet.<m>.lora.down/up.weight`) or PEFT (`<m>.lora_A/lora_B.weight`) LoRA weights
    into an injected UNet. Every key must land somewhere: unknown keys are an error, never a silent no-op."""
    state = path_or_state if isinstance(path_or_state, dict) else load_safetensors(path_or_state)
    own = dict(unet.named_parameters())
    mapped, unknown = {}, []
    for key, value in state.items():
        name = key.removeprefix("unet.").replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        name = name.replace(".default.", ".")  # PEFT adapter name
        if name not in own:
            unknown.append(key)
        elif own[name].shape != value.shape:
            raise UserError(f"LoRA key {key} has shape {tuple(value.shape)}, the model expects {tuple(own[name].shape)}"
                            " (another rank or another model family?)")
        else:
            mapped[name] = value
    if unknown:
        raise UserError(f"{len(unknown)} LoRA keys match no module of this UNet, e.g. {', '.join(unknown[:3])}")
    missing = [n for n in own if ".lora." in n and n not in mapped]
    if missing:
        raise UserError(f"LoRA file lacks {len(missing)} of the model's LoRA weights, e.g. {', '.join(missing[:3])}")
    with torch.no_grad():
        for name, value in mapped.items():
            own[name].copy_(value)


# ----------------------------------------------------------------------------------------------
# Files: safetensors everywhere, written atomically, errors reported by path.

def atomic_write(path, write):
    """write(tmp_path) then rename into place: a crash mid-write never leaves a half file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_safetensors(path):
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UserError(f"no such file: {path}")
    try:
        return load_file(str(path))
    except Exception as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


# ----------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021) with the log-probability SPO needs. Symbols, as in the DDIM paper:
#   a_t = alphas_cumprod[t] (alpha_t in DDIM),  x0 = pred_original_sample,  eps = pred_epsilon,
#   std = sigma_t of eq. (16) times eta,  mean = the x_{t-1} of eq. (12) without the noise term.

def ddim_timesteps(num_steps, num_train_timesteps=1000, steps_offset=1):
    """'leading' spacing, as diffusers and the official code: 951, 901, ..., 1 for 20 steps."""
    step_ratio = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1) * step_ratio + steps_offset


def ddim_step(model_output, t, x_t, alphas_cumprod, step_ratio, eta, prediction_type="epsilon"):
    """One DDIM step from x_t: returns (x0, eps, mean, std) with x_{t-1} = mean + std * z, z ~ N(0, I).

    Scheduler coefficients are formed in float32 from the float32 alphas_cumprod, then cast to the sample's
    dtype, exactly as the official code does (golden README N4). t is an int64 tensor, () or (B,)."""
    t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
    prev_t = (t - step_ratio).clamp(0, len(alphas_cumprod) - 1)  # N2: clamp, so t=1 -> 0, never "alpha=1"
    a_t, a_prev = alphas_cumprod[t], alphas_cumprod[prev_t]  # (B,) float32
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)  # sigma_t^2 / eta^2, eq. (16)
    std = eta * variance ** 0.5
    c = lambda v: v.view(-1, 1, 1, 1).to(x_t.dtype)  # (B,) -> (B, 1, 1, 1)
    if prediction_type == "epsilon":
        x0, eps = (x_t - c((1 - a_t) ** 0.5) * model_output) / c(a_t ** 0.5), model_output
    elif prediction_type == "v_prediction":
        x0 = c(a_t ** 0.5) * x_t - c((1 - a_t) ** 0.5) * model_output
        eps = c(a_t ** 0.5) * model_output + c((1 - a_t) ** 0.5) * x_t
    elif prediction_type == "sample":
        x0, eps = model_output, (x_t - c(a_t ** 0.5) * model_output) / c((1 - a_t) ** 0.5)
    else:
        raise UserError(f"unsupported prediction_type {prediction_type!r}")
    mean = c(a_prev ** 0.5) * x0 + c((1 - a_prev - std ** 2) ** 0.5) * eps  # eq. (12)
    return x0, eps, mean, std


LOG_SQRT_2PI = torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))  # float32, as the official code forms it


def ddim_log_prob(x_prev, mean, std):
    """log N(x_prev; mean, std^2 I) per sample, a MEAN over C, H, W as in the official code (N1), not a sum."""
    s = std.view(-1, 1, 1, 1)
    dt = mean.dtype
    log_prob = -((x_prev.detach() - mean) ** 2) / (2 * s ** 2).to(dt) - torch.log(s).to(dt) - LOG_SQRT_2PI.to(dt)
    return log_prob.mean(dim=(1, 2, 3))


def predict_noise(unet, x, t, cond, uncond, cfg):
    """Classifier-free guidance (Ho & Salimans 2022) in one batched UNet call: eps_u + cfg * (eps_c - eps_u).
    x (n, c, h, w), t (n,), cond/uncond (n, L, D). Inputs go in the UNet's dtype, so this works with or without
    autocast (LoRALinear keeps its own branch in fp32); latents and the result stay float32."""
    dt = next(unet.parameters()).dtype  # the frozen weights' dtype (conv_in); also for DDP/compiled wrappers
    if cfg <= 1:  # as the official pipeline: guidance only when cfg > 1
        return unet(x.to(dt), t, cond.to(dt)).sample.float()
    x2, c2 = torch.cat([x, x]).to(dt), torch.cat([uncond, cond]).to(dt)
    eps_uncond, eps_cond = unet(x2, torch.cat([t, t]), c2).sample.float().chunk(2)
    return eps_uncond + cfg * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample(pipe, unet, cond, uncond, latents, steps, cfg, eta=0.0, generator=None):
    """Plain DDIM sampling from initial latents (b, 4, h, w); returns the final latents."""
    step_ratio = pipe.num_train_timesteps // steps
    for t in ddim_timesteps(steps, pipe.num_train_timesteps, pipe.steps_offset).tolist():
        tt = torch.full((latents.shape[0],), t, device=latents.device)
        eps = predict_noise(unet, latents, tt, cond, uncond, cfg)
        _, _, mean, std = ddim_step(eps, tt, latents, pipe.alphas_cumprod, step_ratio, eta, pipe.prediction_type)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device) if eta > 0 else 0
        latents = mean + std.view(-1, 1, 1, 1) * noise
    return latents


# ----------------------------------------------------------------------------------------------
# Images.

def to_pil(images):
    """(n, 3, H, W) in [-1, 1] -> list of PIL images."""
    from PIL import Image

    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def save_grid(images, path, cols):
    """Save images (n, 3, H, W) in [-1, 1] as one PNG grid, row-major, written atomically."""
    from PIL import Image

    tiles = to_pil(images)
    w, h = tiles[0].size
    rows = math.ceil(len(tiles) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * w, (i // cols) * h))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
