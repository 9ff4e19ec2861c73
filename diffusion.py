"""The pieces that spo.py, sample.py and preference_model.py all need, in one flat module.

In reading order: the model presets; the paper's machinery, hand-rolled: LoRA, and the DDIM step with its
log-probability; LoRA files in every layout; loading models from hub ids and local folders; the architectures
(the tiny offline models, --random-init); and what every command line needs (input checks, atomic files, several
GPUs, image grids).
Imports run one way: this file imports none of the three scripts.
"""
import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# Presets: where each base model, its VAE and its judge come from, and the resolution. (Each script keeps its own
# per-model settings next to its defaults: spo.PRESET_OVERRIDES, sample.SAMPLING, preference_model.TRAIN_DEFAULTS.)

SPM_HUB_REPO = "SPO-Diffusion-Models/Step-Aware_Preference_Models"  # the authors' released SPMs
PRESETS = {
    "sd15": dict(
        pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5",
        vae=None,  # the pipeline's own
        resolution=512,
        spm_base="yuvalkirstain/PickScore_v1",
        spm_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        spm_checkpoint=f"{SPM_HUB_REPO}/sd-v1-5_step-aware_preference_model.bin",
    ),
    "sdxl": dict(
        pretrained="stabilityai/stable-diffusion-xl-base-1.0",
        vae="madebyollin/sdxl-vae-fp16-fix",  # as the official run: SDXL's own VAE overflows in fp16
        resolution=1024,
        spm_base="yuvalkirstain/PickScore_v1",
        spm_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        spm_checkpoint=f"{SPM_HUB_REPO}/sdxl_step-aware_preference_model.bin",
    ),
    # Random weights, built on first use: they prove the machinery, not image quality.
    "tiny": dict(
        pretrained="tiny",  # these sentinels are resolved by tiny_pipeline_path() and preference_model.tiny_spm_paths()
        vae=None,
        resolution=32,
        spm_base="tiny",
        spm_processor="tiny",
        spm_checkpoint="tiny",
    ),
    "tiny-sdxl": dict(pretrained="tiny-sdxl", vae=None, resolution=32, spm_base="tiny", spm_processor="tiny",
                      spm_checkpoint="tiny"),
}
TINY_MODELS = ("tiny", "tiny-sdxl")


# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021), hand-rolled: wrap each target nn.Linear, add a low-rank branch.

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, as the official SPO LoRA


class LoRALinear(nn.Module):
    """y = W x + scale * up(down(x)), scale = alpha / r (apply_lora may weight it). The frozen base Linear is kept
    untouched, so switching the branch off gives back the base model exactly: that is how spo.py gets its frozen
    reference, unless training started from a LoRA (--init-lora: spo.as_reference copies that LoRA's weights in)."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        # rank and alpha are kept as given: alpha = scale * rank does not round-trip in floats (rank 7, alpha 29)
        self.base, self.rank, self.alpha, self.scale, self.enabled = base, rank, alpha, alpha / rank, True
        self.lora = nn.Module()  # parameter names become `<module>.lora.down.weight`, the diffusers layout
        self.lora.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)  # (r, in)
        self.lora.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)  # (out, r)
        nn.init.normal_(self.lora.down.weight, std=1 / rank)  # PEFT's "gaussian" init
        nn.init.zeros_(self.lora.up.weight)  # zero up: training starts exactly at the base model
        self.initial = None  # spo.py's reference LoRA weights (down, up) when training starts from a LoRA

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        # LoRA weights stay fp32 while the base may be fp16/bf16. x.to(w.dtype) serves runs without autocast (an
        # fp16 base with the fp32 LoRA, e.g. sample.py); under autocast F.linear casts back to the half dtype
        # (standard AMP, as the official run's accelerate autocast), so the activations saved stay half.
        w = self.lora.down.weight
        return y + (self.lora.up(self.lora.down(x.to(w.dtype))) * self.scale).to(y.dtype)


def inject_lora(unet, rank, alpha):
    """Replace every target Linear of the UNet by a LoRALinear; returns the LoRA parameters (fp32)."""
    suffixes = tuple("." + t for t in LORA_TARGETS)
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return [p for n, p in unet.named_parameters() if ".lora." in n]


def lora_layers(unet):
    return [m for m in unet.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(unet):
    """`with lora_disabled(unet):` runs the frozen base model, which is the SPO reference unless training started
    from a LoRA (spo.as_reference): with the LoRA branch off, every LoRALinear is exactly its base Linear."""
    layers = lora_layers(unet)
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


def lora_state_dict(unet):
    """{'unet.<module>.lora.down.weight': (r, in), '...lora.up.weight': (out, r)}: the official SPO file layout."""
    return {f"unet.{n}": p.detach().float().cpu().contiguous() for n, p in unet.named_parameters() if ".lora." in n}


def save_lora(unet, path):
    """Write the LoRA as diffusers' `pytorch_lora_weights.safetensors`, atomically. With alpha != rank the
    alpha goes into diffusers' `lora_adapter_metadata` header entry (a `.alpha` tensor would make diffusers
    reject the file; with alpha = rank the file is byte-for-byte the official layout)."""
    from safetensors.torch import save_file

    first = lora_layers(unet)[0]  # one rank and alpha for all layers: inject_lora's
    rank, alpha = first.rank, first.alpha
    metadata = {"format": "pt"}
    if alpha != rank:
        cfg = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": list(LORA_TARGETS)}
        metadata["lora_adapter_metadata"] = json.dumps(cfg, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(lora_state_dict(unet), tmp, metadata=metadata))


# ----------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021) with the log-probability SPO needs. Symbols, as in the DDIM paper:
#   a_t = alphas_cumprod[t] (alpha_t in DDIM),  x0 = pred_original_sample,  eps = pred_epsilon,
#   std = sigma_t(eta) of eq. (16),  mean = the x_{t-1} of eq. (12) without the noise term.

def ddim_timesteps(num_steps, num_train_timesteps=1000, steps_offset=1):
    """'leading' spacing, as diffusers and the official code: 951, 901, ..., 1 for 20 steps."""
    step_ratio = num_train_timesteps // num_steps
    # 1000 steps of 1000 would start at t = 1000; more steps than timesteps would all be t = steps_offset
    if step_ratio == 0 or (num_steps - 1) * step_ratio + steps_offset >= num_train_timesteps:
        raise UserError(f"--steps {num_steps} is too many: its DDIM timesteps do not fit the scheduler's "
                        f"{num_train_timesteps} (steps_offset {steps_offset})")
    return torch.arange(num_steps - 1, -1, -1) * step_ratio + steps_offset


def ddim_step(model_output, t, x_t, alphas_cumprod, step_ratio, eta, prediction_type="epsilon"):
    """One DDIM step from x_t: returns (x0, mean, std) with x_{t-1} = mean + std * z, z ~ N(0, I).

    Scheduler coefficients are formed in float32 from the float32 alphas_cumprod, as the official code does
    (golden README N4), then cast to the sample's dtype: a no-op for our float32 latents, an upcast for the
    golden float64 (f64_) vectors. t is an int64 tensor, () or (B,)."""
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
    return x0, mean, std


LOG_SQRT_2PI = torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))  # float32, as the official code forms it


def ddim_log_prob(x_prev, mean, std):
    """log N(x_prev; mean, std^2 I) per sample, a MEAN over C, H, W as in the official code (N1), not a sum."""
    s = std.view(-1, 1, 1, 1)
    dt = mean.dtype
    log_prob = -((x_prev.detach() - mean) ** 2) / (2 * s ** 2).to(dt) - torch.log(s).to(dt) - LOG_SQRT_2PI.to(dt)
    return log_prob.mean(dim=(1, 2, 3))


def predict_noise(unet, x, t, cond, uncond, cfg):
    """Classifier-free guidance (Ho & Salimans 2022) in one batched UNet call: eps_u + cfg * (eps_c - eps_u).
    x (n, c, h, w), t (n,), cond/uncond: conditioning dicts of n rows (Pipeline.encode_prompts). Inputs go in the
    UNet's dtype, so this works with or without autocast (LoRALinear keeps its weights in fp32); latents and
    the result stay float32 (a deliberate difference: the official fp16 run rounds its latents to fp16 at every
    step, see README)."""
    dt = next(unet.parameters()).dtype  # the frozen weights' dtype (conv_in); also for DDP/compiled wrappers

    def unet_call(x, t, c):
        added = {"text_embeds": c["pooled"].to(dt), "time_ids": c["time_ids"].to(dt)} if "pooled" in c else None
        return unet(x.to(dt), t, c["text"].to(dt), added_cond_kwargs=added).sample.float()

    if cfg <= 1:  # as the official pipeline: guidance only when cfg > 1
        return unet_call(x, t, cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    eps_uncond, eps_cond = unet_call(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return eps_uncond + cfg * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample(pipe, cond, uncond, latents, steps, cfg, eta=0.0, generator=None):
    """Plain DDIM sampling from initial latents (b, 4, h, w) with conditioning dicts of b rows; returns the final
    latents. With eta > 0 each step draws noise from `generator`, or from generator[i] for image i when it is a
    list (as diffusers does with a list of generators), so an image's noise does not depend on its batch."""
    step_ratio = pipe.num_train_timesteps // steps
    for t in ddim_timesteps(steps, pipe.num_train_timesteps, pipe.steps_offset).tolist():
        tt = torch.full((latents.shape[0],), t, device=latents.device)
        eps = predict_noise(pipe.unet, latents, tt, cond, uncond, cfg)
        _, mean, std = ddim_step(eps, tt, latents, pipe.alphas_cumprod, step_ratio, eta, pipe.prediction_type)
        if eta == 0:
            noise = 0
        elif isinstance(generator, list):
            noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g, device=latents.device)
                               for g in generator])
        else:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        latents = mean + std.view(-1, 1, 1, 1) * noise
    return latents


# ----------------------------------------------------------------------------------------------
# LoRA files, in each layout SPO LoRAs come in: ours and the official one (`unet.<m>.lora.down/up.weight`), PEFT
# (`<m>.lora_A/lora_B.weight`) and webui/kohya (`lora_unet_<m with dots as underscores>.lora_down/lora_up.weight` and
# `.alpha`, where <m> is the diffusers name or the original SGM/LDM one, see sgm_name). Whatever the layout, a
# module's LoRA becomes one entry {module name: (down (r, in), up (out, r), alpha)}: W' = W + alpha/r * up @ down.

LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # what a LoRA folder holds


def resolve_lora(spec, flag):
    """A LoRA file: a file; in a folder (a spo.py run, a PEFT adapter) its pytorch_lora_weights.safetensors,
    adapter_model.safetensors or only .safetensors; on the hub 'owner/repo' (its pytorch_lora_weights.safetensors)
    or 'owner/repo/file'."""
    spec = spec.rstrip("/") or spec  # 'owner/repo/' is 'owner/repo'
    path = Path(os.path.expanduser(spec))  # os.path: pathlib raises on an unknown ~user
    if path.is_dir():
        found = [path / f for f in LORA_FILES if (path / f).is_file()] or sorted(path.glob("*.safetensors"))
        if len(found) == 1 or (found and found[0].name in LORA_FILES):
            return found[0]
        raise UserError(f"{flag}: {spec} holds no single LoRA file ({', '.join(LORA_FILES)} or one .safetensors)")
    if missing_local_path(spec):
        raise UserError(f"{flag}: no such file or folder: {spec}")
    return Path(resolve_file(spec if path.is_file() or spec.count("/") > 1 else f"{spec}/{LORA_FILES[0]}", flag))


LORA_KEY_PARTS = [(".lora.down.weight", "down"), (".lora.up.weight", "up"),  # ours / official
                  (".lora_A.weight", "down"), (".lora_B.weight", "up"),  # PEFT
                  (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),  # PEFT, adapter name kept
                  (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")]  # webui / kohya
LORA_DOWN_KEYS = tuple(suffix for suffix, part in LORA_KEY_PARTS if part == "down")
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
# What only SDXL has: its second text encoder, its added embedding of the pooled prompt and the image size
# (diffusers' add_embedding, SGM's label_emb), its 2048-wide text context (the in-features of attn2.to_k/to_v).
# Block names do not tell the families apart: some SD1.x webui LoRAs use the SGM names too.
SDXL_ONLY_NAMES = ("lora_te2_", "text_encoder_2.", "add_embedding", "label_emb")
SDXL_CONTEXT_WIDTH = 2048
SD1_CONTEXT_WIDTH = 768  # SD1.x's text context (CLIP ViT-L)


def is_sdxl_unet(unet):
    """SDXL's UNet is the one with the "text_time" added embedding; not its width (the tiny SDXL's context is 64)."""
    return unet.config.addition_embed_type == "text_time"


def sgm_name(name, layers_per_block):
    """The original (SGM, and SD1.x's LDM) name of a diffusers UNet module inside an attention block, else None.
    That UNet's down path is one flat list, input_blocks: conv_in first, then per level L = layers_per_block layers
    and a downsampler; output_blocks has L + 1 layers per level. In each layer .0 is the ResNet, .1 the attention
    block, whose inner names (transformer_blocks.0.attn1.to_q, proj_in, ...) diffusers kept."""
    if not isinstance(layers_per_block, int):
        return None  # a count per level: SD1.x and SDXL have one count, which the numbering below assumes
    per_level = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        return f"input_blocks.{per_level * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"  # + 1: input_blocks.0 is conv_in
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        return f"output_blocks.{per_level * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"  # the middle block is ResNet, attention, ResNet
    return None


def unet_lora_ranks(spec, flag):
    """The ranks of the UNet LoRA that resolve_lora finds at `spec`, read from the file's header alone: a missing or
    non-LoRA file is refused before any model loads. Which layers it fits is for lora_modules, with the UNet."""
    from safetensors import safe_open

    path = resolve_lora(spec, flag)
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except Exception as err:
        raise UserError(f"{flag} {spec}: {path} is not a readable safetensors file ({first_line(err)})") from None
    ranks = {shape[0] for key, shape in shapes.items()
             if key.endswith(LORA_DOWN_KEYS) and not key.startswith(TEXT_ENCODER_PREFIXES)}
    if not ranks:
        raise UserError(f"{flag} {spec} holds no UNet LoRA weights (no lora.down, lora_A or lora_down keys)")
    return ranks


def read_lora_file(path):
    """A LoRA .safetensors file -> (tensors, declared): `declared` holds what the file says about alpha outside its
    tensors: diffusers' `lora_adapter_metadata` header (`unet.lora_alpha`, `unet.alpha_pattern`), or for PEFT's
    adapter_model.safetensors its adapter_config.json. For the official files, which store no alpha:
    {"alpha": None, "alpha_pattern": {}}."""
    from safetensors import safe_open

    tensors = load_safetensors(path)
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    peft_config = Path(path).with_name("adapter_config.json")
    try:
        if "lora_adapter_metadata" in header:
            config = json.loads(header["lora_adapter_metadata"])
        elif Path(path).name == "adapter_model.safetensors" and peft_config.is_file():
            config = json.loads(peft_config.read_text())
        else:
            config = {}
    except (ValueError, RecursionError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError, unreadable
        raise UserError(f"{path}: its LoRA settings are not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: its LoRA settings are not a JSON object")
    config = {k.removeprefix("unet."): v for k, v in config.items()}
    if config.get("use_rslora"):  # PEFT's rank-stabilised LoRA: read as alpha / r, it would act at another strength
        raise UserError(f"{path}: an rsLoRA (use_rslora, scaled by alpha / sqrt(r)) is not supported, only alpha / r")
    alpha, patterns = config.get("lora_alpha"), config.get("alpha_pattern") or {}
    if not (alpha is None or positive_number(alpha)) or not isinstance(patterns, dict) or not all(
            positive_number(a) and regex_compiles(pat) for pat, a in patterns.items()):
        raise UserError(f"{path}: its LoRA settings need lora_alpha > 0 and alpha_pattern mapping module patterns to "
                        f"alphas > 0, got {alpha!r} and {patterns!r}")
    return tensors, {"alpha": alpha, "alpha_pattern": patterns}


def positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def regex_compiles(pattern):
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


def lora_family_problem(tensors, unet):
    """A sentence if the LoRA was made for another model than this UNet: the other family (SDXL or SD1.x), or any
    model whose text context has another width; else None."""
    widths = {k: v.shape[1] for k, v in tensors.items() if v.dim() == 2 and (".attn2.to_k." in k or "_attn2_to_k." in k)
              and k.endswith(("down.weight", "lora_A.weight", "lora_A.default.weight"))}  # down is (r, context width)
    ours = unet.config.cross_attention_dim
    if not is_sdxl_unet(unet):
        signs = [k for k in tensors if any(s in k for s in SDXL_ONLY_NAMES)]
        signs += [k for k, width in widths.items() if width == SDXL_CONTEXT_WIDTH]
        if signs:
            return (f"this is an SDXL LoRA (e.g. {signs[0]}), but the model is SD1.5-style (cross-attention width "
                    f"{ours}); use it with an SDXL base model")
    elif signs := [k for k, width in widths.items() if width == SD1_CONTEXT_WIDTH]:
        return (f"this is an SD1.x LoRA ({signs[0]} reads a {SD1_CONTEXT_WIDTH}-wide text context), but the model is "
                f"SDXL (cross-attention width {ours}); use it with an SD1.5 base model")
    # e.g. the tiny models' 32 and 64 (a UNet may give each block its own width: then only the families are told)
    other = [(k, width) for k, width in widths.items() if isinstance(ours, int) and width != ours]
    return (f"this LoRA was made for another model: {other[0][0]} reads a {other[0][1]}-wide text context, this "
            f"model's cross-attention is {ours} wide") if other else None


def lora_modules(tensors, declared, unet):
    """Tensors of any layout -> {module name: (down (r, in), up (out, r), alpha)}, checked against the UNet. Every
    key must land on one of its Linear layers with fitting shapes; anything else is an error, never a no-op.
    Webui names are mapped back by looking them up among the UNet's own module names (`to_out_0` could be
    `to_out.0` or `to_out_0`: only the model knows), never by guessing where the dots were."""
    family = lora_family_problem(tensors, unet)
    if family:
        raise UserError(family)
    modules = dict(unet.named_modules())
    by_underscored = {name.replace(".", "_"): name for name in modules}  # diffusers' names and the SGM/LDM ones
    by_underscored |= {sgm.replace(".", "_"): name for name in modules
                       if (sgm := sgm_name(name, unet.config.layers_per_block))}
    parts, unknown = {}, []
    for key, value in tensors.items():
        stem, part = next(((key[:-len(s)], p) for s, p in LORA_KEY_PARTS if key.endswith(s)), (key, None))
        if stem.startswith("lora_unet_"):
            name = by_underscored.get(stem.removeprefix("lora_unet_"))
        else:
            name = stem.removeprefix("base_model.model.").removeprefix("unet.")
        if part is None or name not in modules:
            unknown.append(key)
        else:
            parts.setdefault(name, {})[part] = value
    if unknown:
        hint = " (text-encoder LoRA weights are not supported: SPO trains the UNet only)" if any(
            k.startswith(TEXT_ENCODER_PREFIXES) for k in unknown) else ""
        raise UserError(f"{len(unknown)} LoRA keys match no module of this UNet, e.g. {', '.join(unknown[:3])}{hint}")
    if not parts:
        raise UserError("the LoRA file holds no LoRA weights")
    result = {}
    for name, p in parts.items():
        layer = modules[name]
        layer = layer.base if isinstance(layer, LoRALinear) else layer  # an injected UNet (load_lora)
        if not isinstance(layer, nn.Linear):
            raise UserError(f"the LoRA targets {name}, a {type(layer).__name__}; only Linear layers are supported")
        if missing := [w for w in ("down", "up") if w not in p]:
            raise UserError(f"the LoRA for {name} lacks its {' and '.join(missing)} weight")
        down, up = p["down"], p["up"]
        if (down.dim(), up.dim()) != (2, 2) or down.shape[0] != up.shape[1] or down.shape[0] == 0 or (
                down.shape[1], up.shape[0]) != (layer.in_features, layer.out_features):
            raise UserError(f"the LoRA for {name} has down {tuple(down.shape)} and up {tuple(up.shape)} shapes, which "
                            f"do not fit its Linear({layer.in_features} -> {layer.out_features}) with one rank r: "
                            f"down must be (r, {layer.in_features}) and up ({layer.out_features}, r)")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise UserError(f"the LoRA for {name} holds non-finite weights (NaN or inf)")
        if "alpha" in p and not (p["alpha"].numel() == 1 and positive_number(p["alpha"].item())):
            raise UserError(f"the LoRA's .alpha for {name} must be one number > 0, got {p['alpha'].tolist()}")
        rank = down.shape[0]
        patterns = declared["alpha_pattern"]  # PEFT's per-module alphas, matched on the module path's end
        pattern = next((a for pat, a in patterns.items() if re.fullmatch(rf"(.*\.)?({pat})", name)), None)
        alpha = p["alpha"].item() if "alpha" in p else pattern or declared["alpha"] or rank  # default: alpha = r
        result[name] = (down.float(), up.float(), float(alpha))
    return result


def load_lora(unet, path):
    """Load a LoRA file in any layout lora_modules reads into the LoRALinear layers of an injected UNet (--init-lora,
    resume). It must cover the same layers with the same rank and alpha (a file that declares none has alpha = r):
    a LoRA loaded at another alpha would silently act at another strength."""
    modules = lora_modules(*read_lora_file(path), unet)
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}
    missing, extra = [n for n in layers if n not in modules], [n for n in modules if n not in layers]
    if missing or extra:
        raise UserError(f"{path} does not cover this run's LoRA layers: lacks {len(missing)} (e.g. "
                        f"{', '.join(missing[:2]) or '-'}), "
                        f"has {len(extra)} others (e.g. {', '.join(extra[:2]) or '-'})")
    for name, (down, up, alpha) in modules.items():
        layer = layers[name]
        # isclose: files written before LoRALinear kept alpha hold alpha = scale * rank, e.g. 29.000000000000004
        if down.shape[0] != layer.rank or not math.isclose(alpha, layer.alpha, rel_tol=1e-9):
            raise UserError(f"{path} was trained with LoRA rank {down.shape[0]} and alpha {alpha:g}, this run uses "
                            f"--lora-rank {layer.rank} --lora-alpha {layer.alpha:g}")
    with torch.no_grad():
        for name, (down, up, _) in modules.items():
            layers[name].lora.down.weight.copy_(down)
            layers[name].lora.up.weight.copy_(up)


def apply_lora(unet, modules, scale=1.0):
    """Wrap each module of `modules` (from lora_modules) in a LoRALinear holding its weights, with the branch scaled
    by scale * alpha / r. Ranks may differ between modules. lora_disabled(unet) switches them all off again."""
    for name, (down, up, alpha) in modules.items():
        parent, _, child = name.rpartition(".")
        layer = LoRALinear(unet.get_submodule(name), down.shape[0], alpha)
        layer.scale = scale * alpha / down.shape[0]  # as lora_merged forms it; .alpha stays the LoRA's own
        with torch.no_grad():
            layer.lora.down.weight.copy_(down)
            layer.lora.up.weight.copy_(up)
        setattr(unet.get_submodule(parent), child, layer)


@contextlib.contextmanager
def lora_merged(unet, modules, scale=1.0):
    """Inside: each module's weight is W + scale * alpha/r * up @ down, formed in fp32 and cast to W's dtype. On exit
    the original weights come back exactly (a copy of the touched layers is kept, not undone by subtraction)."""
    originals = {}
    try:  # a merge that fails midway (out of memory) restores the layers it changed so far
        with torch.no_grad():
            for name, (down, up, alpha) in modules.items():
                w = unet.get_submodule(name).weight
                originals[name] = w.detach().clone()
                delta = (scale * alpha / down.shape[0]) * (up.to(w.device) @ down.to(w.device))  # (out, r) @ (r, in)
                w.copy_(w.float() + delta)
        yield unet
    finally:
        with torch.no_grad():
            for name, w in originals.items():
                unet.get_submodule(name).weight.copy_(w)


def save_lora_webui(modules, path, unet):
    """Write the LoRA in the webui/kohya layout, atomically: `lora_unet_<module, dots as underscores>` with
    `.lora_down.weight` (r, in), `.lora_up.weight` (out, r) and `.alpha` (a 0-dim tensor), with the module names
    kohya's sd-scripts gives: SD1.x's diffusers names, SDXL's original SGM names (it trains SDXL on that UNet).
    stable-diffusion-webui and diffusers' load_lora_weights both read it."""
    from safetensors.torch import save_file

    state = {}
    for name, (down, up, alpha) in modules.items():
        webui_name = sgm_name(name, unet.config.layers_per_block) if is_sdxl_unet(unet) else name
        if webui_name is None:
            raise UserError(f"the webui layout of an SDXL LoRA is written for attention-block layers only, not {name}")
        stem = "lora_unet_" + webui_name.replace(".", "_")
        state[stem + ".lora_down.weight"] = down.float().contiguous()
        state[stem + ".lora_up.weight"] = up.float().contiguous()
        state[stem + ".alpha"] = torch.tensor(float(alpha))
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}  # what sd-scripts writes, for webui's UI
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


# ----------------------------------------------------------------------------------------------
# Loading: hub ids and local folders go through the same from_pretrained calls.

def quiet_libraries():
    """Silence diffusers' and transformers' info logs and loading bars: our own progress bars say what happens.
    Also two warnings that would read as a second error line: huggingface_hub's and DDP's (below)."""
    import diffusers
    import transformers

    # diffusers' hub calls pass an argument huggingface_hub deprecated: its warning would be a second error line
    warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
    # torch 2.13 renames DDP's broadcast_buffers=False (no buffer sync each forward), which torch < 2.13 needs
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def first_line(err):
    """An exception's first line: library messages can go on for pages (torch's weights-only one goes on to
    advise unsafe loading)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


LOCAL_ONLY = ("/", ".", "~")  # how a path starts that can only be local: a hub id never does


def cannot_load(what, name, err, flag):
    """The one line for a model, file or dataset that does not load. Offline, the hub's libraries blame a missing
    file ("does not appear to have a file named model_index.json"), so the line says what was searched."""
    from huggingface_hub import constants

    if str(name).startswith(LOCAL_ONLY) and not os.path.exists(os.path.expanduser(name)):  # not a hub problem
        return UserError(f"{flag}: no such file or folder: {name}")
    reason = first_line(err)
    if constants.HF_HUB_OFFLINE and not str(name).startswith(LOCAL_ONLY) and not os.path.exists(name):
        searched = "the hub is unreachable or HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched"
        reason = f"{reason.rstrip('.')}; {searched}"
    return UserError(f"cannot load {what} from '{name}': {reason} "
                     f"(download it and pass a local folder or file with {flag})")


def offline_if_hub_unreachable(name):
    """Without a network huggingface_hub retries every file for minutes before it fails. So when `name` is not a
    local path and the hub does not answer within 3 s, switch it to offline mode: models in the local HF cache
    still load, anything else fails at once with a message that names the flag for a local folder."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if str(name).startswith(LOCAL_ONLY) or os.path.exists(os.path.expanduser(name)) or constants.HF_HUB_OFFLINE:
        return
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=3).close()
    except OSError:
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"


def missing_local_path(spec):
    """Whether `spec` names a local file or folder that is not there, rather than something on the hub: it starts
    with /, . or ~, or its parent folder exists (runs/sd15x: a typo). expanduser: a quoted '~/...' reaches us as is."""
    path = os.path.expanduser(spec)  # os.path: no error on an unknown ~user or an overlong name
    parent = os.path.dirname(path) or "."
    return not os.path.exists(path) and (str(spec).startswith(LOCAL_ONLY) or os.path.exists(parent))


def resolve_file(spec, flag):
    """A local file, or 'owner/repo/filename' on the hub (downloaded once into the HF cache)."""
    if os.path.isfile(path := os.path.expanduser(spec)):
        return path
    parts = str(spec).split("/")
    if os.path.exists(path) or missing_local_path(spec) or len(parts) < 3:  # a folder is no file
        raise UserError(f"{flag}: no such file: {spec}")
    from huggingface_hub import hf_hub_download
    offline_if_hub_unreachable(spec)
    try:
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    except Exception as err:  # offline, missing, gated: all end the same way
        raise cannot_load("file", spec, err, flag) from None


def checkpoint_scheduler_class(index, pretrained):
    """The diffusers scheduler class that a checkpoint's model_index.json names (SD1.5: PNDM, SDXL: Euler)."""
    import diffusers

    entry = index.get("scheduler")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    scheduler = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin)):
        raise UserError(f"--scheduler checkpoint: {pretrained}'s model_index.json names no diffusers scheduler that "
                        f"this installation has ({entry!r}; some need an extra package, e.g. torchsde)")
    return scheduler


class Pipeline:
    """The parts of a Stable Diffusion (1.x or XL) checkpoint that SPO uses (no diffusers pipeline object)."""

    def __init__(self, pretrained, device="cpu", dtype=torch.float32, random_init=None, vae=None, ddim=True):
        """pretrained: hub id, local folder or a TINY_MODELS name; random_init: an ARCHITECTURES name to build
        instead; vae: another VAE (hub id or folder) in place of the checkpoint's own; ddim: whether our DDIM will
        sample it (sample.py --scheduler checkpoint does not)."""
        from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        quiet_libraries()
        # SDXL's model_index.json says whether an empty negative prompt is all zeros (diffusers' default: yes)
        self.force_zeros = True
        if random_init:
            with seeded_weights(device), tempfile.TemporaryDirectory() as tokenizers:  # loaded into memory
                self.__dict__.update(random_pipeline_parts(random_init, tokenizers, device))
        else:
            path = str(tiny_pipeline_path(pretrained)) if pretrained in TINY_MODELS else os.path.expanduser(pretrained)
            if Path(path).is_file():
                raise UserError(f"--pretrained {pretrained} is a file: it takes a diffusers folder (with "
                                "model_index.json) or a hub id")
            offline_if_hub_unreachable(path)
            try:  # model_index.json says which parts the checkpoint has: SDXL's include a second text encoder
                index = DiffusionPipeline.load_config(path)
                if not isinstance(index, dict):
                    raise ValueError("model_index.json is not a JSON object")
            except Exception as err:
                raise cannot_load("the pipeline", pretrained, err, "--pretrained") from None
            self.force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
            # DDIM configured from the checkpoint's scheduler config, or (sample.py --scheduler checkpoint) its own
            scheduler = DDIMScheduler if ddim else checkpoint_scheduler_class(index, pretrained)
            parts = [("tokenizer", CLIPTokenizer), ("text_encoder", CLIPTextModel), ("vae", AutoencoderKL),
                     ("unet", UNet2DConditionModel), ("scheduler", scheduler)]
            if "text_encoder_2" in index:
                parts += [("tokenizer_2", CLIPTokenizer), ("text_encoder_2", CLIPTextModelWithProjection)]
            for sub, cls in parts:
                try:
                    setattr(self, sub, cls.from_pretrained(path, subfolder=sub))
                except Exception as err:
                    raise cannot_load(sub, pretrained, err, "--pretrained") from None
        vae_flag = f"--pretrained {pretrained}"  # where the VAE comes from
        if vae not in (None, "none") and not random_init:  # random-init builds the preset's VAE (SDXL: fp16-fix)
            vae_flag = f"--vae {vae}"
            offline_if_hub_unreachable(vae)
            try:
                self.vae = AutoencoderKL.from_pretrained(os.path.expanduser(vae))
            except Exception as err:
                raise cannot_load("the VAE", vae, err, "--vae") from None
        vae_extras = [k for k in ("latents_mean", "latents_std", "shift_factor") if self.vae.config.get(k) is not None]
        if vae_extras:  # SD3 / Playground-style latents; decode and the SPM's encode apply only scaling_factor
            raise UserError(f"{vae_flag}: its VAE sets {', '.join(vae_extras)}, which SD1.5 and SDXL VAEs do not and "
                            "this code does not apply")
        self.is_sdxl = hasattr(self, "text_encoder_2")
        self.encoders = [(self.tokenizer, self.text_encoder)] + (
            [(self.tokenizer_2, self.text_encoder_2)] if self.is_sdxl else [])
        for m in (*(enc for _, enc in self.encoders), self.vae, self.unet):
            m.requires_grad_(False).eval().to(device, dtype)
        # SDXL's original VAE overflows in fp16: fp32 in any precision, as the official SDXL training keeps it
        # (diffusers upcasts it only in fp16); the fp16-fix VAE (force_upcast off) runs in the run's dtype
        if self.is_sdxl and self.vae.config.force_upcast:
            self.vae.float()
        if not self.is_sdxl:  # diffusers' StableDiffusionPipeline, which the official SD1.5 code loads, corrects
            # an outdated SD1.x scheduler config to steps_offset 1 and clip_sample off, in place: so do we
            if getattr(self.scheduler.config, "steps_offset", 1) != 1:
                self.scheduler.register_to_config(steps_offset=1)
            if getattr(self.scheduler.config, "clip_sample", False) is True:
                self.scheduler.register_to_config(clip_sample=False)
        # DDIM as the official code configures it: DDIMScheduler.from_config of the checkpoint's scheduler.
        ddim_scheduler = DDIMScheduler.from_config(self.scheduler.config)
        sched = ddim_scheduler.config
        # Options of diffusers' DDIM that ddim_step does not implement: refuse rather than ignore them.
        # (set_alpha_to_one is ignored on purpose: the official code clamps the last step instead, N2. SD1.5's and
        # SDXL's configs set it False; where one sets True, our DDIM's last step differs from diffusers'.)
        wrong = [f"{k}={sched[k]!r}" for k, ours in (("clip_sample", False), ("thresholding", False),
                                                     ("timestep_spacing", "leading")) if sched[k] != ours]
        n = len(ddim_scheduler.alphas_cumprod)  # trained_betas may give another length than num_train_timesteps
        if n != sched.num_train_timesteps or not 0 <= sched.steps_offset < n:
            wrong.append(f"trained_betas for {n} steps, steps_offset={sched.steps_offset}")
        if ddim and wrong:  # with --scheduler checkpoint, diffusers steps the checkpoint's own scheduler
            raise UserError(f"--pretrained {pretrained}: its scheduler asks DDIM for {', '.join(wrong)}, which this "
                            "DDIM does not implement (SD1.5 and SDXL ask for none of them)")
        self.alphas_cumprod = ddim_scheduler.alphas_cumprod.to(device)  # float32, (num_train_timesteps,)
        self.num_train_timesteps = sched.num_train_timesteps
        self.steps_offset = sched.steps_offset
        self.prediction_type = sched.prediction_type
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts, size):
        """The UNet's conditioning for each prompt, a dict of tensors with the prompt as first dimension:
        "text" (b, L, D), and for SDXL also "pooled" (b, 1280) and "time_ids" (b, 6). size: (height, width) in
        pixels. Always the pipeline's own tokenizers, never the preference model's."""
        hidden, pooled = [], None
        for tokenizer, encoder in self.encoders:
            ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=self.is_sdxl)
            # SD1.x reads the last layer; SDXL the penultimate layer of both encoders, side by side (Podell et al.
            # 2023, Sec. 2.1)
            hidden.append(out.hidden_states[-2] if self.is_sdxl else out.last_hidden_state)
            pooled = getattr(out, "text_embeds", None)  # SDXL: the second encoder's projected end-of-text token
        cond = {"text": torch.cat(hidden, dim=-1)}
        if self.is_sdxl:
            h, w = size  # SDXL's size conditioning: original size, crop top-left (0, 0), target size
            cond["pooled"] = pooled
            size_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=pooled.device)
            cond["time_ids"] = size_ids.expand(len(prompts), 6)  # (1, 6) -> (b, 6)
        return cond

    @torch.no_grad()
    def encode_negative(self, n, size, prompt=""):
        """The conditioning CFG pushes away from, for n prompts. SDXL checkpoints set force_zeros_for_empty_prompt
        (SDXL base does): without a negative prompt the embeddings are zeros, as in diffusers and the official
        SDXL training."""
        cond = self.encode_prompts([prompt], size)
        if self.is_sdxl and self.force_zeros and not prompt:
            cond = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond.items()}
        return take(cond, torch.zeros(n, dtype=torch.long))

    @torch.no_grad()
    def decode(self, latents, chunk=8):
        """Latents -> images in [-1, 1] (not clamped), in chunks so VAE memory stays bounded. The VAE runs in its
        own dtype, outside any autocast: an fp32 VAE (SDXL's own) would overflow in fp16."""
        with torch.autocast(latents.device.type, enabled=False):
            out = [self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
                   for z in latents.split(chunk)]
        return torch.cat(out).float()


def take(cond, index):
    """Rows of a conditioning dict: cond[index] for each tensor. index may repeat rows (a pool's k copies)."""
    return {k: v[index.to(v.device) if torch.is_tensor(index) else index] for k, v in cond.items()}


# ----------------------------------------------------------------------------------------------
# The architectures: the tiny offline models, built once into the project's cache folder, and the real ones with
# random weights (--random-init).

def cache_dir():
    return Path(os.environ.get("SPO_CACHE") or Path.home() / ".cache" / "spo")  # set but empty: the default


def build_once(name, build):
    """Return cache_dir()/name, calling build(folder) the first time.

    The folder is built under a temporary name and renamed into place, so a concurrent process
    either sees nothing or a complete folder, never a half-written one. `name` carries a version
    so a changed recipe never loads stale files.
    """
    final = cache_dir() / name
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        # transformers writes weights only on rank 0 of a process group: rank 0 builds, the others wait for it
        # (a shared cache folder, as on one machine; the tiny models are for tests, not multi-node runs).
        while not final.exists():
            time.sleep(0.2)
    if final.exists():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    except OSError as err:  # e.g. SPO_CACHE names a file, or a folder we may not write
        where = " (SPO_CACHE)" if os.environ.get("SPO_CACHE") else ""
        raise UserError(f"the model cache {final.parent}{where} cannot be written: {err.strerror}") from None
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
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
          *range(ord("\u00ae"), ord("\u00ff") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the other bytes (control characters, space) map to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


TINY_WORDS = ["a", "photo", "of", "the", "cat", "dog", "lake", "red", "on", "an", "beautiful", "image"]


def write_tiny_tokenizer(folder, pad_token, max_length=16):
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
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                        model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


# The architectures, as the released checkpoints' config.json files give them. The tiny ones are built, seeded and
# saved once (the offline test models); every entry can also be built with random weights (--random-init), to
# measure speed and memory at full size without a download. SDXL adds a second text encoder (OpenCLIP bigG) and
# the UNet's "text_time" embedding of the pooled prompt and the image size (Podell et al. 2023, Sec. 2.2).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, hidden_act="quick_gelu", projection_dim=32)
TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
ARCHITECTURES = {
    "tiny": dict(
        text_encoder=TINY_CLIP,
        unet=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=TINY_VAE),
    "sd15": dict(
        text_encoder=CLIP_L,
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(SD_VAE, sample_size=512)),
    # SDXL's block layout in miniature: layers_per_block 2 keeps the webui (SGM) block numbers of SDXL itself.
    "tiny-sdxl": dict(
        text_encoder=TINY_CLIP,
        text_encoder_2=dict(TINY_CLIP, hidden_act="gelu"),
        unet=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2, transformer_layers_per_block=(1, 2),
                  attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        vae=dict(TINY_VAE, scaling_factor=0.13025, force_upcast=False)),
    "sdxl": dict(
        text_encoder=CLIP_L,
        text_encoder_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
        unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816,  # 6 size numbers x 256 + the pooled 1280
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False)),  # the fp16-fix VAE's config
}


@contextlib.contextmanager
def seeded_weights(device):
    """Random weights drawn from seed 0, the caller's RNG state untouched: every torchrun rank, a resumed run and
    a PNG's own command build the same random-init model."""
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):  # restores the CPU's and this device's RNG
        torch.default_generator.manual_seed(0)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(0)  # this device's generator only
        yield


def random_pipeline_parts(model, folder, device="cpu"):
    """Tokenizer(s), text encoder(s), UNet, VAE and DDIM scheduler of ARCHITECTURES[model], with random weights.
    The tokenizers are the tiny one (its ids are a subset of CLIP's): the cost of a text forward does not depend
    on it. They are written to folder/tokenizer(_2) and loaded from there."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = ARCHITECTURES[model]
    folder = Path(folder)
    parts = {}
    # SD's tokenizer pads with its end token, SDXL's second one with "!" (id 0), as the released ones do.
    for suffix, pad, cls in (("", "<|endoftext|>", CLIPTextModel), ("_2", "!", CLIPTextModelWithProjection)):
        if "text_encoder" + suffix not in arch:
            continue
        config = arch["text_encoder" + suffix]
        tokenizer = write_tiny_tokenizer(folder / f"tokenizer{suffix}", pad, config["max_position_embeddings"])
        vocab = len(tokenizer) if model in TINY_MODELS else 49408  # CLIP's vocabulary size
        with torch.device(device):  # initialise where the weights will live: much faster on a GPU
            parts["text_encoder" + suffix] = cls(CLIPTextConfig(
                vocab_size=vocab, **config, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        parts["tokenizer" + suffix] = tokenizer
    with torch.device(device):
        parts["unet"] = UNet2DConditionModel(**arch["unet"])
        parts["vae"] = AutoencoderKL(**arch["vae"])
    parts["scheduler"] = DDIMScheduler(  # the noise schedule SD1.5 and SDXL share
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1)
    return parts


def build_tiny_pipeline(folder, model):
    """A tiny pipeline with seeded random weights, saved as an ordinary diffusers folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    with seeded_weights("cpu"):
        parts = random_pipeline_parts(model, folder)
    if model == "tiny-sdxl":
        StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True).save_pretrained(folder)
    else:
        StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(folder)


def tiny_pipeline_path(model="tiny"):
    return build_once({"tiny": "tiny-sd-v1", "tiny-sdxl": "tiny-sdxl-v1"}[model],
                      lambda folder: build_tiny_pipeline(folder, model))


# ----------------------------------------------------------------------------------------------
# Command lines: errors, checks of flags, prompts and output folders, the files a run reads back.

class UserError(Exception):
    """A problem with the user's input: the scripts print its message on one line and exit 2."""


# errno values of an OSError that a path the user gave causes (pathlib raises them where os.path says "not there")
PATH_ERRNOS = (errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP)


@contextlib.contextmanager
def path_errors_refused():
    """Inside, an OSError caused by a path (too long, not allowed, a file where a folder belongs, a link loop) is a
    UserError that names it: such a path fails wherever it is first looked at, in any of a dozen places."""
    try:
        yield
    except OSError as err:
        if err.errno not in PATH_ERRNOS or err.filename is None:
            raise
        reason = err.strerror or os.strerror(err.errno)
        raise UserError(f"{reason[0].lower()}{reason[1:]}: {err.filename}") from None


class TrainingAborted(Exception):
    """Too many non-finite steps in a row: the run stops with exit code 1, keeping its last good checkpoint."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag like every other bad input: one line and exit code 2, no usage dump. An
    empty value is refused too (`--lora=$LORA` with the variable unset gave base-model images), except for text."""

    def error(self, message):
        raise UserError(message)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for name, value in vars(parsed).items():
            if value == "" and name not in ("prompt", "negative_prompt"):
                raise UserError(f"--{name.replace('_', '-')} is empty: give it a value or leave the flag out")
        return parsed


def finite_float(text):
    """argparse type for every float setting: nan or inf would not fail, it would train a NaN model to the end."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def size_problem(pixels, flag):
    """Why `pixels` cannot be an image side, or None. Past 16384 (32 times SD1.5's 512) no memory holds the run,
    and past 2^63 torch cannot even take the size: both once ended in a traceback."""
    if not (pixels > 0 and pixels % 8 == 0):
        return f"{flag} must be a positive multiple of 8, got {pixels}"
    return f"{flag} must be at most 16384 pixels, got {pixels}" if pixels > 16384 else None


MAX_SEED = 2**32 - 1  # seeds are mixed into derived seeds; torch's generators take at most 64 bits
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # the --precision flags


WRITE_PROBE = ".spo-write-test-"


def can_create_in(folder):
    """Whether a file can be made in `folder`: made, then removed."""
    try:
        fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE, dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def holds_files(folder):
    """Whether an existing folder holds anything but another process's write probe."""
    return any(not p.name.startswith(WRITE_PROBE) for p in Path(folder).iterdir())


def output_problem(path, flag, is_file):
    """Why `path` cannot be written (as a file, or as a folder), or None: checked before anything is written."""
    if not str(path).strip():
        return f"{flag} is empty: name a {'file' if is_file else 'folder'}"
    path = Path(path)
    # 255 bytes a name on Linux filesystems, and the temporary names of atomic_write add 12 to the last one
    if any(len(os.fsencode(part)) > 255 for part in path.parts) or len(os.fsencode(path.name)) > 255 - 12:
        return f"{flag} {str(path)[:60]}...: a name in it is too long (255 bytes at most, 243 for the last)"
    try:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # those are for the checks below
            os.stat(path)  # a loop of links fails only here (named by the except below): Path.exists says "not there"
        if path.is_symlink() and not path.exists():
            return f"{flag} {path} is a broken link"
        if is_file and path.is_dir():
            return f"{flag} {path} is a folder, not a file"
        if not is_file and path.exists() and not path.is_dir():
            return f"{flag} {path} is a file, not a folder"
        # an existing folder is written into; otherwise the nearest existing ancestor must let us create the rest
        where = path if path.is_dir() else next(p for p in path.absolute().parents if p.exists())
        # A real write, as os.access says yes to root even in /proc (holds_files overlooks the probe, which another
        # torchrun rank may be making while this one checks that the folder is empty)
        writable = where.is_dir() and can_create_in(where)
        if not writable or (path.is_file() and not os.access(path, os.W_OK)):
            return f"{flag} {path} cannot be written: {where} is not a writable folder"
    except OSError as err:  # e.g. a folder we may not even look into
        return f"{flag} {path}: {err.strerror or err}"
    return None


def device_problem(device):
    """Why --device cannot be used on this machine, or None."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        return f"--device must be cpu or cuda[:N], got {device}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device}, but no CUDA device is available"
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        return f"--device {device}, but this machine has {torch.cuda.device_count()} CUDA devices"
    return None


def check_text(texts, flag):
    """Text that UTF-8 cannot encode (a lone surrogate, or undecodable bytes on the command line) would reach the
    tokenizer as an error that names nothing."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{flag}: not valid Unicode text: {text.encode('utf-8', 'replace').decode()!r}") from None


def read_json(path, flag):
    """A JSON object a run wrote (config.json, progress.json); a damaged file is a UserError that names it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:  # ValueError: also JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{flag}: {path} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag}: {path} is not a JSON object")
    return value


def read_metrics(path):
    """The records of a run's metrics.jsonl, each with its "step". A last line cut short (the run was killed while
    writing it) is dropped; damage anywhere else is a UserError."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines() if Path(path).exists() else []
    except OSError as err:
        raise UserError(f"--resume: {path}: {err.strerror or err}") from None
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if i == len(lines) - 1:
                break
            raise UserError(f"--resume: {path} line {i + 1} is not a metrics record")
        records.append(record)
    return records


@contextlib.contextmanager
def run_folder_lock(out, rank=0, world=1):
    """Inside, the run holds an exclusive lock on its folder (made if need be): a second run into the same --out (a
    --resume or --overwrite while the first still runs, or a twin started at once) stops with one line instead of
    mixing its metrics and checkpoints with the first's. Rank 0 holds it (flock on the folder itself, no lock file:
    the system drops it when the process ends, however it ends), and every rank learns whether it got it, so that
    all stop alike. A filesystem without such locks (some NFS mounts) runs without one, and says so."""
    import fcntl

    fd, busy = None, False
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = True
        except OSError as err:
            print(f"note: --out {out} cannot be locked ({err.strerror}): a second run into it would not be stopped",
                  file=sys.stderr)
    try:
        if any(all_ranks_sum([busy], world)):
            raise UserError(f"--out {out} is in use by another run that is still going")
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def cleared_if_it_fails(out, created):
    """Inside, a fresh run (validation found --out empty or absent; created: this run made it). If it fails before
    its first checkpoint (bad data found once read, memory that runs out, Ctrl-C), what it wrote goes, so that the
    same command can run again. A run stopped by non-finite steps keeps its metrics: they show what went wrong."""
    try:
        yield
    except TrainingAborted:
        raise
    except BaseException:
        remove_unstarted_run(out, created)
        raise


def remove_unstarted_run(out, created):
    """What a fresh run wrote before its first checkpoint (validation found --out empty or absent): the folder if
    the run made it, else what is in it."""
    if not out.is_dir() or ((out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())):
        return
    try:
        for path in [out] if created and not out.is_symlink() else list(out.iterdir()):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    except OSError:  # cleaning up must not hide the error that stopped the run
        pass


def file_problem(path, flag):
    """Why `path` is no file to read, or None. A folder, pipe or device is none (a pipe reads only once)."""
    try:
        mode = os.stat(os.path.expanduser(path)).st_mode
    except OSError as err:  # not there (a broken link neither), not allowed, too long
        return f"{flag}: no such file: {path}" if err.errno == errno.ENOENT else f"{flag}: {path}: {err.strerror}"
    if stat.S_ISDIR(mode):
        return f"{flag}: {path} is a folder, not a file"
    if not stat.S_ISREG(mode):
        return f"{flag}: {path} is not a regular file (a pipe or a device): save it to a file"
    return None


def read_prompts(path, flag):
    """A JSON list of {"caption": ...} objects (the official prompt files) or of strings, or a text file with
    one prompt a line (UTF-8, a byte-order mark allowed). Empty prompts are dropped, and said so."""
    if problem := file_problem(path, flag):
        raise UserError(problem)
    try:
        # -sig: Windows editors start files with a byte-order mark
        text = Path(os.path.expanduser(path)).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{flag} {path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise UserError(f"{flag} {path}: {err.strerror or err}") from None
    if text.lstrip().startswith(("[", "{")):  # JSON; any other text is one prompt a line
        try:
            items = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:  # refused, not guessed: JSON Lines, a trailing comma
            raise UserError(f"{flag} {path}: invalid JSON ({err}); a text file of prompts must not start with "
                            "'[' or '{'") from None
        if not isinstance(items, list):
            raise UserError(f"{flag} {path}: JSON but not a list of strings or of {{\"caption\": ...}} objects")
        prompts = [item.get("caption") if isinstance(item, dict) else item for item in items]
        wrong = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if wrong:
            raise UserError(f"{flag} {path}: entry {wrong[0]} is not a string or a {{\"caption\": string}} object")
    else:
        prompts = text.splitlines()
    kept = [p.strip() for p in prompts if p.strip()]
    check_text(kept, f"{flag} {path}")
    if not kept:
        raise UserError(f"{flag} {path}: no prompts in the file")
    if len(kept) < len(prompts):
        print(f"{flag}: dropped {len(prompts) - len(kept)} empty prompts", file=sys.stderr)
    return kept


# ----------------------------------------------------------------------------------------------
# Files: safetensors everywhere, written atomically, errors reported by path.

UMASK = os.umask(0o022)  # reading the umask means setting it: once, at import, and put back at once
os.umask(UMASK)


def readable_like_any_file(*paths):
    """Give files the mode that open() would (0666 less the umask): safetensors 0.8's save_file makes its files
    0600, so a LoRA or checkpoint on a shared cluster would be unreadable to everyone else."""
    for path in paths:
        try:
            os.chmod(path, 0o666 & ~UMASK)
        except OSError:  # a filesystem without Unix modes (FAT) refuses chmod: the file is still good
            pass


def atomic_write(path, write):
    """write(tmp_path) then rename into place: a crash mid-write never leaves a half file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        readable_like_any_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(final):
    """`with atomic_folder(final) as tmp:` fill tmp, which then replaces `final`: a crash never leaves a half folder
    there (a checkpoint that --resume would pick, a pipeline that half loads)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")  # hidden from the globs that list checkpoints
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        readable_like_any_file(*(f for f in tmp.rglob("*") if f.is_file() and not f.is_symlink()))
        old = final.with_name(f".{final.name}.old")
        replacing = final.is_dir() and not final.is_symlink()
        if replacing:  # a folder cannot be replaced in one rename: the one there moves aside whole, under a hidden
            shutil.rmtree(old, ignore_errors=True)  # name, until the new one has its place
            final.rename(old)
        tmp.rename(final)
        if replacing:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_folders(out, prefix):
    """The folders in out/checkpoints whose names start with `prefix` (atomic_folder's unfinished ones start with
    "."). listdir, not glob: a folder we may not read must raise, not look empty (--resume would start over and
    drop the metrics logged)."""
    folder = Path(out) / "checkpoints"
    names = os.listdir(folder) if folder.is_dir() else []
    return [folder / name for name in names if name.startswith(prefix) and (folder / name).is_dir()]


def remove_unfinished(folder):
    """The temporary folders that a crash in the middle of an atomic_folder save left in a folder of checkpoints
    (".NAME.tmp" and ".NAME.old"; before atomic_folder, "NAME.tmp")."""
    for stale in [*Path(folder).glob("*.tmp"), *Path(folder).glob(".*.old")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def load_safetensors(path):
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UserError(f"no such file: {path}")
    try:
        return load_file(str(path))
    except Exception as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def load_optimizer_state(path, optimizer, scaler, device):
    """A checkpoint's optimizer.pt (AdamW and GradScaler state) back into the run, weights-only."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except Exception as err:
        raise UserError(f"--resume: {path} is unreadable ({type(err).__name__}: {first_line(err)})") from None


# ----------------------------------------------------------------------------------------------
# Several GPUs: torchrun starts one process per GPU. spo.py and `preference_model.py train` both use these.


def setup_distributed():
    """(rank, world size); a process group only under torchrun (NCCL on CUDA, gloo on CPU)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def all_ranks_sum(values, world):
    """Python numbers summed over ranks in one all-reduce: the metrics rank 0 writes speak for the whole run."""
    if world == 1:
        return [float(v) for v in values]
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def stop_together(problem, world):
    """Raise on every rank if any rank met input it cannot use (`problem`: its UserError, or None), at a point all
    ranks pass: a rank that failed alone would leave the others waiting in a collective for a peer that is gone, and
    torchrun would report a dead peer instead of the bad row."""
    if world > 1:
        rank = torch.distributed.get_rank()
        failed = all_ranks_sum([problem is not None and r == rank for r in range(world)], world)
        if problem is None and any(failed):
            raise UserError(f"rank {failed.index(1.0)} stopped at input it cannot use (its own error line says which)")
    if problem is not None:
        raise problem


class StopSignal:
    """SIGTERM/SIGINT (a preempted cluster job, Ctrl-C) only set a flag: the loop finishes the current step (an
    optimizer step, or in spo.py a micro-batch), writes a checkpoint and exits cleanly. A second Ctrl-C stops at
    once."""

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


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


def png_text(settings):
    """Settings -> PNG text chunks, one per setting (PIL writes iTXt where latin-1 cannot hold the text)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    return info


def save_png(image, path, settings):
    """Save a PIL image as PNG with its settings in text chunks (read back: Image.open(path).text), atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_text(settings)))


def wrap_text(text, font, width, max_lines=3):
    """Greedy word wrap to `width` pixels; a caption longer than max_lines ends in '...'."""
    lines = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + "..."
    return lines


def captioned_grid(tiles, captions, cols, group=2, min_side=128, gap=8):
    """PIL tiles (one size, row-major) in groups of `group` side by side, `cols` groups a row `gap` pixels apart,
    each group with its caption written underneath in PIL's default font. Tiles smaller than min_side are
    enlarged (nearest neighbour: pixels are repeated, never invented) so that a caption has room."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    factor = max(1, math.ceil(min_side / min(tiles[0].size)))
    w, h = tiles[0].width * factor, tiles[0].height * factor
    lines = [wrap_text(caption, font, group * w - 8) for caption in captions]
    line_h = font.getbbox("Ag")[3] + 2
    cell_w, cell_h = group * w + gap, h + max(map(len, lines)) * line_h + 6  # a group, then its caption
    rows = math.ceil(len(captions) / cols)
    grid = Image.new("RGB", (cols * cell_w - gap, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        g = i // group
        grid.paste(tile.resize((w, h), Image.NEAREST), ((g % cols) * cell_w + (i % group) * w, (g // cols) * cell_h))
    for g, caption_lines in enumerate(lines):
        for k, line in enumerate(caption_lines):
            xy = ((g % cols) * cell_w + 4, (g // cols) * cell_h + h + 3 + k * line_h)
            draw.text(xy, line, fill="black", font=font)
    return grid
