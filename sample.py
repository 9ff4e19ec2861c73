"""Generate, compare and score images with SPO LoRAs: ours, the released ones, webui files.

    python sample.py --model tiny --prompt "a photo of a cat" --out out/cat.png      # offline, tiny random model
    python sample.py --prompt "an image of a beautiful lake" --lora SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA
    python sample.py --prompt "a red dog" --n 4 --lora runs/sd15 --compare --score   # base | LoRA, same noise
    python sample.py --lora runs/sd15 --eval prompts.txt --steps 20 --cfg 5          # the paper's eval protocol
    python sample.py --lora runs/sd15 --save-merged runs/sd15-merged --export-webui runs/sd15-webui.safetensors
    python sample.py --model sdxl --prompt "a child and a penguin" --lora SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA

Every image is plain DDIM (diffusion.ddim_sample, with the DDIM step spo.py trains with), or with --scheduler
checkpoint the scheduler the model folder ships (as the official inference scripts), from noise drawn by a
generator seeded with the image's own seed, so an image with and without the LoRA starts from the same noise
and differs only by what the LoRA learnt. Every PNG carries its settings, and the command that remakes it, in
PNG text chunks (byte for byte when the image was made alone, --batch-size 1; one made in a batch comes back
within rounding).
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import re
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from diffusion import (DTYPES, PRESETS, ArgumentParser, Pipeline, UserError, apply_lora, atomic_folder, atomic_write,
                       captioned_grid, check_text, ddim_sample, device_problem, finite_float, lora_disabled,
                       lora_merged, lora_modules, output_problem, path_errors_refused, predict_noise, read_lora_file,
                       read_prompts, resolve_lora, save_lora_webui, save_png, size_problem, to_pil, unet_lora_ranks)
from preference_model import PREFERENCE_FLAGS, PickScoreOnImages, load_preference_model, pil_to_tensor

# ----------------------------------------------------------------------------------------------
# Defaults per preset, as the released models' example usage (resolution and VAE come from PRESETS).

SAMPLING = {
    "sd15": dict(steps=50, cfg=7.5),
    "sdxl": dict(steps=50, cfg=5.0),  # the official inference_spo_sdxl.py
    "tiny": dict(steps=20, cfg=7.5),
    "tiny-sdxl": dict(steps=20, cfg=5.0),
}
PAPER_EVAL = "--steps 20 --cfg 5"  # the paper's evaluation protocol: DDIM, 20 steps, guidance 5.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")  # not PNG: --out would be a folder
GRID_ROWS = 16  # a comparison grid shows at most this many prompts (one row each)
GRID_SEEDS = 8  # and this many seeds (a base | LoRA pair each) of every prompt, so it stays viewable


# ----------------------------------------------------------------------------------------------
# The LoRA: found, read in any layout, checked against the UNet before anything is written.

def load_lora_modules(spec, unet):
    """{module: (down, up, alpha)} of the LoRA at `spec`, every key and shape checked against this UNet."""
    path = resolve_lora(spec, "--lora")
    tensors, declared = read_lora_file(path)
    try:
        return lora_modules(tensors, declared, unet)
    except UserError as err:
        raise UserError(f"--lora {spec}: {err}") from None


def lora_switch(unet, modules, scale, merge):
    """A function on(True/False) -> a context in which the UNet runs with or without the LoRA. Applied: LoRALinear
    layers, off = lora_disabled. Merged: W + scale * alpha/r * up @ down inside, the exact W outside."""
    if modules is None:
        return lambda on: contextlib.nullcontext()
    if merge:
        return lambda on: lora_merged(unet, modules, scale) if on else contextlib.nullcontext()
    apply_lora(unet, modules, scale)
    return lambda on: contextlib.nullcontext() if on else lora_disabled(unet)


# ----------------------------------------------------------------------------------------------
# Generation.

@torch.no_grad()
def checkpoint_sample(pipe, scheduler, cond, uncond, latents, steps, cfg, generator):
    """Sampling with a diffusers scheduler (the checkpoint's own: PNDM, Euler, ...), step for step as diffusers'
    pipelines run it, with the same batched guidance as ddim_sample. A stochastic scheduler draws image i's step
    noise from generator[i]."""
    scheduler.set_timesteps(steps, device=latents.device)  # also resets a multistep scheduler's history
    latents = latents * scheduler.init_noise_sigma  # Euler starts at sigma_max, not at unit variance
    # as diffusers' prepare_extra_step_kwargs: eta 0 where step takes one (TCD's own default is 0.3), our generators
    takes = inspect.signature(scheduler.step).parameters
    extra = {**({"eta": 0.0} if "eta" in takes else {}), **({"generator": generator} if "generator" in takes else {})}
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        eps = predict_noise(pipe.unet, x, t.expand(len(x)), cond, uncond, cfg)
        latents = scheduler.step(eps, t, latents, **extra).prev_sample
    return latents


@torch.no_grad()
def generate(pipe, prompts, seeds, steps, cfg, eta, height, width, negative_prompt="", scheduler=None):
    """One image per (prompt, seed), (b, 3, H, W) in [-1, 1], in one batch. Image i starts from noise drawn by a
    generator on the run's device seeded with seeds[i], as diffusers' pipeline with
    generator=torch.Generator(device).manual_seed(seed) (CPU and CUDA generators draw different numbers), so
    base and LoRA images see the same noise; with eta > 0 its step noise comes from that generator too.
    scheduler: None for our DDIM, else a diffusers scheduler (checkpoint_sample)."""
    device = pipe.unet.device
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale, width // pipe.vae_scale)
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    latents = torch.cat([torch.randn(shape, generator=g, device=device) for g in generators])  # (b, 4, h, w)
    cond = pipe.encode_prompts(prompts, (height, width))
    uncond = pipe.encode_negative(len(prompts), (height, width), negative_prompt)
    if scheduler is None:
        latents = ddim_sample(pipe, cond, uncond, latents, steps, cfg, eta, generator=generators)
    else:
        try:
            latents = checkpoint_sample(pipe, scheduler, cond, uncond, latents, steps, cfg, generators)
        except (AttributeError, TypeError, ValueError, IndexError) as err:  # a scheduler that needs another loop
            if not any("schedulers" in Path(f.filename).parts for f in traceback.extract_tb(err.__traceback__)):
                raise  # raised outside diffusers' schedulers: a bug of ours keeps its traceback
            raise UserError(f"--scheduler checkpoint: {type(scheduler).__name__} cannot sample {steps} steps in this "
                            f"loop ({type(err).__name__}: {err})") from None
    return pipe.decode(latents)


def sampling_scheduler(args, pipe):
    """None for our DDIM; with --scheduler checkpoint, the scheduler the checkpoint ships."""
    return pipe.scheduler if args.scheduler == "checkpoint" else None


def image_settings(args, prompt, seed, with_lora):
    """What goes into each PNG's text chunks: everything needed to make it again, and the command that does (the
    same bytes for an image made alone, as with --batch-size 1; one made in a batch comes back to within rounding)."""
    flags = dict(prompt=prompt, negative_prompt=args.negative_prompt, seed=seed, steps=args.steps, cfg=args.cfg,
                 eta=args.eta, height=args.height, width=args.width, scheduler=args.scheduler, model=args.model,
                 pretrained=args.pretrained, vae=args.vae, precision=args.precision, device=args.device,
                 **(dict(lora=args.lora, lora_scale=args.lora_scale) if with_lora else {}))
    # "=" keeps a prompt that starts with "-" a value; a setting that is None (no --vae) has no flag
    command = ["python", "sample.py"] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items() if v is not None]
    command += ["--merge"] if with_lora and args.merge else []
    command += ["--random-init"] if args.random_init else []
    settings = {k: "none" if v is None else v for k, v in flags.items()}
    settings.setdefault("lora", "none")
    settings["sampler"] = args.sampler_name  # e.g. PNDMScheduler: a record, not a flag
    if with_lora:
        settings.update(lora_mode="merged" if args.merge else "applied")
    if args.random_init:  # pretrained then names only the architecture
        settings.update(weights="random-init")
    return dict(settings, command=shlex.join(command))


def one_png(args):
    """Whether --out names the run's one image rather than a folder."""
    return args.out.lower().endswith(".png")


def jobs_of(args):
    """(index, prompt, seed) of every image: image i of a prompt has seed + i."""
    return [(i, prompt, args.seed + k) for i, prompt in enumerate(args.prompt_list) for k in range(args.n)]


def image_path(args, index, prompt, seed, tag):
    if one_png(args):
        return Path(args.out)
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
    return Path(args.out) / f"{index:03d}-{slug}-seed{seed}{tag}.png"


def render(pipe, jobs, args, lora_on, with_lora, tag, progress):
    """Generate and save every (index, prompt, seed) job, in batches; returns the PIL images and their paths."""
    batch = args.batch_size
    images, paths = [], []
    with lora_on(with_lora):
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            pixels = generate(pipe, [p for _, p, _ in chunk], [s for _, _, s in chunk], args.steps, args.cfg,
                              args.eta, args.height, args.width, args.negative_prompt, sampling_scheduler(args, pipe))
            broken = int((~pixels.isfinite()).flatten(1).any(dim=1).sum())  # (b, 3, H, W) -> (b,)
            if broken:  # saved anyway, so the names and the grid stay in step with the jobs
                hint = "an fp16 overflow? try --precision bf16 or fp32, or" if args.precision != "fp32" else "try"
                tqdm.write(f"warning: {broken} of {len(chunk)} images have NaN or inf pixels, saved as black or white "
                           f"({hint} a smaller --cfg)", file=sys.stderr)
            for (index, prompt, seed), image in zip(chunk, to_pil(pixels)):
                path = image_path(args, index, prompt, seed, tag)
                save_png(image, path, image_settings(args, prompt, seed, with_lora))
                images.append(image)
                paths.append(path)
            progress.update(len(chunk))
    return images, paths


def save_compare_grid(args, jobs, base, lora, path):
    """Rows are prompts, and per seed a pair base | LoRA with the prompt and seed written under it."""
    keep = [i for i, (index, _, seed) in enumerate(jobs) if index < GRID_ROWS and seed - args.seed < GRID_SEEDS]
    tiles = [image for i in keep for image in (base[i], lora[i])]
    captions = [f"base | LoRA, seed {jobs[i][2]}: {jobs[i][1]}" for i in keep]
    grid = captioned_grid(tiles, captions, cols=min(args.n, GRID_SEEDS))
    settings = image_settings(args, "", args.seed, True)
    prompts = "; ".join(dict.fromkeys(jobs[i][1] for i in keep))  # those the grid shows
    last_seed = args.seed + min(args.n, GRID_SEEDS) - 1
    settings.update(prompt=prompts, seed=f"{args.seed}..{last_seed}", layout="prompt rows; base | LoRA")
    del settings["command"]
    save_png(grid, path, settings)
    return grid


# ----------------------------------------------------------------------------------------------
# Scoring.

class Scorers:
    """PickScore as its authors compute it (preference_model.PickScoreOnImages), so numbers compare with published
    ones, and the step-aware preference model's score at t = 0 (a clean image) of the same image."""

    def __init__(self, args):
        self.pickscore = PickScoreOnImages(args.preference_model, args.preference_processor, args.device,
                                           flags=PREFERENCE_FLAGS)
        self.spm = load_preference_model("spm", args.preference_model, args.preference_processor,
                                         args.preference_checkpoint, device=args.device, flags=PREFERENCE_FLAGS)

    @torch.no_grad()
    def __call__(self, images, prompt):
        """PIL images of one prompt -> {"pickscore": [...], "spm": [...]}."""
        pickscore = self.pickscore(images, [prompt])
        # The SPM sees the saved pixels, so `python preference_model.py score` on the PNG gives the same number.
        x = torch.stack([pil_to_tensor(im) for im in images])  # (b, 3, H, W) in [-1, 1]
        spm = self.spm.score(x, None, 0, text_features=self.spm.encode_text(self.spm.tokenize([prompt])))
        return {"pickscore": pickscore.tolist(), "spm": spm.tolist()}


def score_all(scorers, jobs, images):
    """Scores for every image, grouped by prompt so each prompt's text is encoded once."""
    out = [None] * len(jobs)
    for prompt in dict.fromkeys(p for _, p, _ in jobs):
        idx = [i for i, (_, p, _) in enumerate(jobs) if p == prompt]
        scores = scorers([images[i] for i in idx], prompt)
        for k, i in enumerate(idx):
            out[i] = {name: values[k] for name, values in scores.items()}
    return out


def wilson_interval(wins, n, z=1.959964):
    """95% Wilson score interval of a proportion (Wilson 1927); wins may be fractional (ties count half)."""
    p = wins / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [0.0 if wins == 0 else center - half, 1.0 if wins == n else center + half]  # exact ends, not 1 - 1e-16


def summarize(base, lora):
    """Mean scores and the LoRA's win rate over pairs with identical noise; a tie counts as half a win."""
    wins = sum(1.0 if b < l else 0.5 if b == l else 0.0 for b, l in zip(base, lora))
    return dict(base_mean=sum(base) / len(base), lora_mean=sum(lora) / len(lora), lora_win_rate=wins / len(base),
                win_rate_ci95=wilson_interval(wins, len(base)), pairs=len(base))


def write_eval(args, jobs, base_scores, lora_scores, base_paths, lora_paths):
    """eval.json: the settings, per scorer the means and the LoRA win rate, and every pair's scores."""
    metrics = {name: summarize([s[name] for s in base_scores], [s[name] for s in lora_scores])
               for name in ("pickscore", "spm")}
    pairs = [dict(prompt=prompt, seed=seed, base=b, lora=l, base_image=bp.name, lora_image=lp.name)
             for (_, prompt, seed), b, l, bp, lp in zip(jobs, base_scores, lora_scores, base_paths, lora_paths)]
    settings = {k: v for k, v in vars(args).items() if k not in ("prompt", "prompts", "prompt_list")}
    report = dict(settings=settings, metrics=metrics, pairs=pairs)
    atomic_write(Path(args.out) / "eval.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    for name, m in metrics.items():
        lo, hi = m["win_rate_ci95"]
        print(f"{name}: mean base {m['base_mean']:.4f}, LoRA {m['lora_mean']:.4f}; LoRA wins "
              f"{100 * m['lora_win_rate']:.1f}% of {m['pairs']} pairs (95% interval {100 * lo:.1f}-{100 * hi:.1f}%)")
    print(f"eval written to {Path(args.out) / 'eval.json'}")


# ----------------------------------------------------------------------------------------------
# Exports.

def diffusers_pipeline(pipe):
    """Our parts as diffusers' own StableDiffusion(XL)Pipeline, with the scheduler we loaded (DDIM as the official code
    configures it, or with --scheduler checkpoint the checkpoint's own): the reference sampler and the format of
    merged checkpoints."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if pipe.is_sdxl:
        return StableDiffusionXLPipeline(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                                         pipe.tokenizer_2, pipe.unet, pipe.scheduler,
                                         force_zeros_for_empty_prompt=pipe.force_zeros)
    return StableDiffusionPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_merged_pipeline(pipe, modules, scale, folder):
    """A complete diffusers pipeline folder with the LoRA merged into the UNet (what the released merged SPO
    checkpoints are): written under a temporary name and renamed, so the folder is whole or absent."""
    with atomic_folder(folder) as tmp, lora_merged(pipe.unet, modules, scale):
        diffusers_pipeline(pipe).save_pretrained(tmp)


# ----------------------------------------------------------------------------------------------
# The run: load and check everything, then write.

def benchmark(args, pipe):
    """Images per second of this sampler and of diffusers' StableDiffusion(XL)Pipeline on the same weights, with
    the same scheduler, steps, guidance and precision, measured in one run after a warm-up batch each."""
    reference = diffusers_pipeline(pipe)
    reference.set_progress_bar_config(disable=True)
    b, device = args.batch_size, torch.device(args.device)
    prompts = ((args.prompt_list or ["an image of a beautiful lake"]) * b)[:b]
    seeds = list(range(args.seed, args.seed + b))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def ours():
        generate(pipe, prompts, seeds, args.steps, args.cfg, args.eta, args.height, args.width, args.negative_prompt,
                 sampling_scheduler(args, pipe))

    def theirs():
        negative = [args.negative_prompt] * b if args.negative_prompt else None  # None: SDXL's zeros, as ours
        reference(prompts, height=args.height, width=args.width, num_inference_steps=args.steps,
                  guidance_scale=args.cfg, eta=args.eta, negative_prompt=negative, output_type="pt",
                  generator=[torch.Generator(device).manual_seed(s) for s in seeds])

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"benchmark: {gpu}, {args.model}{' random-init' if args.random_init else ''}, {args.precision}, "
          f"{args.steps} {args.sampler_name} steps, cfg {args.cfg}, {args.height}x{args.width}, batches of {b}, "
          f"{args.benchmark} timed")
    for name, sampler in (("this sampler", ours), (f"diffusers {type(reference).__name__}", theirs)):
        with torch.no_grad():
            sampler()  # warm-up
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(args.benchmark):
                sampler()
            sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        memory = f", peak GPU memory {peak:.2f} GiB" if peak is not None else ""
        print(f"{name:<36}{args.benchmark * b / seconds:8.2f} images/s{memory}")


def run(args):
    dtype = DTYPES[args.precision]
    pipe = Pipeline(args.pretrained, args.device, dtype, random_init=args.model if args.random_init else None,
                    vae=args.vae, ddim=args.scheduler == "ddim")
    scheduler = sampling_scheduler(args, pipe)
    args.sampler_name = "DDIM" if scheduler is None else type(scheduler).__name__  # e.g. PNDMScheduler, in each PNG
    if scheduler is not None and not all(hasattr(scheduler, a) for a in ("init_noise_sigma", "scale_model_input")):
        raise UserError(f"--scheduler checkpoint: {args.sampler_name} is not a noise-prediction scheduler that "
                        "StableDiffusionPipeline's loop can step (a flow-matching one?)")
    if args.benchmark:
        benchmark(args, pipe)
        return
    modules = load_lora_modules(args.lora, pipe.unet) if args.lora else None
    scorers = Scorers(args) if args.score or args.eval else None
    # Everything is loaded and checked (the webui export checks its layer names before it writes, and validate
    # that no output lies in another's place): the exports first, then the images.
    if args.export_webui:
        save_lora_webui(modules, args.export_webui, pipe.unet)
        print(f"webui LoRA written to {args.export_webui}")
    if args.save_merged:
        save_merged_pipeline(pipe, modules, args.lora_scale, args.save_merged)
        print(f"merged pipeline written to {args.save_merged}")
    if not args.prompt_list:
        return

    # after the exports: applying the LoRA wraps the UNet's layers, which lora_merged (--save-merged) reads plain
    lora_on = lora_switch(pipe.unet, modules, args.lora_scale, args.merge)
    jobs = jobs_of(args)
    both = args.compare or args.eval  # base and LoRA images, from the same noise
    # the bar closes on the way out, so that an error starts on a line of its own
    with tqdm(total=len(jobs) * (2 if both else 1), desc="images", unit="img") as progress:
        images, paths = render(pipe, jobs, args, lora_on, modules is not None, "-lora" if both else "", progress)
        if both:
            base_images, base_paths = render(pipe, jobs, args, lora_on, False, "-base", progress)
            save_compare_grid(args, jobs, base_images, images, Path(args.out) / "compare.png")
    print(f"{progress.total} image{'s' * (progress.total > 1)} written to {args.out}"
          + (", with the grid compare.png" if both else ""))
    if scorers is None:
        return

    scores = score_all(scorers, jobs, images)
    base_scores = score_all(scorers, jobs, base_images) if both else []
    if args.score:
        print("pickscore       spm  image")
        rows = list(zip(scores, paths))
        if both:  # each base image, then its LoRA image from the same noise
            rows = [row for pair in zip(zip(base_scores, base_paths), rows) for row in pair]
        for s, path in rows:
            print(f"{s['pickscore']:9.4f} {s['spm']:9.4f}  {path}")
    if args.eval:
        write_eval(args, jobs, base_scores, scores, base_paths, paths)


# ----------------------------------------------------------------------------------------------
# Command line: flags, their checks, and main.

def parse_args(argv=None):
    """Flags, then the --model preset's defaults; every check that needs no model runs here."""
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"The paper's evaluation protocol (DDIM, 20 steps, guidance 5.0) is: {PAPER_EVAL}.")
    per_preset = lambda key: ", ".join(f"{m} {SAMPLING[m][key]}" for m in SAMPLING)
    sizes = ", ".join(f"{m} {PRESETS[m]['resolution']}" for m in SAMPLING)
    add = p.add_argument
    add("--prompt", action="append", default=[], help="a prompt; repeat the flag for several")
    add("--prompts", help="a file of prompts: one a line, or a JSON list of strings or of {\"caption\": ...}")
    add("--model", choices=list(SAMPLING), default="sd15", help="preset: base model and defaults (sd15)")
    add("--pretrained", help="hub id or diffusers folder, e.g. a merged SPO checkpoint (default: the preset's)")
    add("--vae", help="another VAE, hub id or folder, or none for the checkpoint's own (default: the preset's; sdxl: "
                      "the fp16-fix VAE)")
    add("--lora", help="a .safetensors file, a folder holding one, or a hub repo, in any layout: ours/official "
                       "(unet.*.lora.down/up), PEFT (lora_A/lora_B), webui/kohya (lora_unet_*, .alpha)")
    add("--lora-scale", type=finite_float, default=1.0,
        help="the LoRA branch is scaled by this * alpha / r; --export-webui leaves it to webui's own weight (1)")
    add("--merge", action="store_true", help="merge the LoRA into the weights instead of wrapping the layers")
    add("--seed", type=int, default=0, help="image i of each prompt uses seed + i (0)")
    add("--n", type=int, default=1, help="images per prompt (1)")
    add("--scheduler", choices=["ddim", "checkpoint"], default="ddim",
        help="ddim: this project's DDIM, the sampler SPO trains with; checkpoint: the model folder's own scheduler "
             "(SD1.5: PNDM, SDXL: Euler), stepped by diffusers as the official inference scripts do (default: ddim)")
    add("--steps", type=int, help=f"sampling steps ({per_preset('steps')})")
    add("--cfg", type=finite_float, help=f"classifier-free guidance scale, <= 1 for none ({per_preset('cfg')})")
    add("--eta", type=finite_float, default=0.0, help="DDIM eta: 0 deterministic, 1 as DDPM (0)")
    add("--height", type=int, help=f"pixels, a multiple of 8 ({sizes})")
    add("--width", type=int, help=f"pixels, a multiple of 8 ({sizes})")
    add("--negative-prompt", default="", help="what the guidance steers away from (empty)")
    add("--batch-size", type=int, default=4, help="images per UNet call (4)")
    add("--out", default="out", help="a .png file for a single image, else a folder (out)")
    add("--overwrite", action="store_true", help="replace images, compare.png or eval.json that --out already holds")
    add("--compare", action="store_true",
        help=f"also the base images, and a grid of base | LoRA per seed (the first {GRID_ROWS} prompts and "
             f"{GRID_SEEDS} seeds)")
    add("--score", action="store_true", help="print each image's PickScore and step-aware score at t=0")
    add("--eval", metavar="PROMPTS_FILE", help="base vs LoRA on these prompts x --n seeds: mean scores, LoRA win "
                                               "rate with a 95%% interval; eval.json and the grid go to --out")
    add("--save-merged", metavar="DIR", help="write a diffusers pipeline folder with the LoRA merged into its "
                                             "UNet (weights in --precision, the --scheduler)")
    add("--export-webui", metavar="FILE", help="write the LoRA in the webui/kohya layout (with .alpha)")
    add("--preference-model", help="CLIP of PickScore and the SPM: hub id or folder (default: the preset's)")
    add("--preference-processor", help="PickScore's processor: hub id or folder (default: the preset's)")
    add("--preference-checkpoint", help="SPM weights: a file or owner/repo/filename (default: the preset's)")
    add("--random-init", action="store_true", help="the preset's architecture with random weights (no download)")
    add("--benchmark", type=int, default=0, metavar="N", help="images per second and peak memory of this sampler "
                                                              "and of diffusers' pipeline, N timed batches; no files")
    add("--device", help="cpu or cuda[:N] (default: cuda if available)")
    add("--precision", choices=list(DTYPES),
        help="of the SD weights (fp16 on CUDA, fp32 on CPU or with --merge or --save-merged)")
    args = p.parse_args(argv)
    preset = PRESETS[args.model]
    args.pretrained = args.pretrained or preset["pretrained"]
    args.vae = args.vae or preset["vae"]
    args.steps = SAMPLING[args.model]["steps"] if args.steps is None else args.steps
    args.cfg = SAMPLING[args.model]["cfg"] if args.cfg is None else args.cfg
    args.height = preset["resolution"] if args.height is None else args.height
    args.width = preset["resolution"] if args.width is None else args.width
    args.preference_model = args.preference_model or preset["spm_base"]
    args.preference_processor = args.preference_processor or preset["spm_processor"]
    args.preference_checkpoint = args.preference_checkpoint or preset["spm_checkpoint"]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    merging = args.merge or args.save_merged  # fp32: merged into half weights, small LoRA updates round away
    args.precision = args.precision or ("fp16" if args.device.startswith("cuda") and not merging else "fp32")
    args.prompt_list = prompt_list(args)
    check_text(args.prompt, "--prompt")
    check_text([args.negative_prompt], "--negative-prompt")
    problems = validate(args)
    if problems:
        raise UserError("; ".join(problems))
    return args


def prompt_list(args):
    """--prompt flags and the --prompts file, or the --eval file alone."""
    if args.eval:
        return read_prompts(args.eval, "--eval")
    return list(args.prompt) + (read_prompts(args.prompts, "--prompts") if args.prompts else [])


def validate(args):
    """Every check that needs no model, so that a typo costs a second and writes nothing."""
    exporting = args.save_merged is not None or args.export_webui is not None
    both = args.compare or args.eval
    images = len(args.prompt_list) * args.n * (2 if both else 1)
    checks = [
        (args.n >= 1, f"--n must be >= 1, got {args.n}"),
        (args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        # eta > 1 makes 1 - a_prev - sigma^2 negative (NaN images)
        (0 <= args.eta <= 1, f"--eta must be in [0, 1], got {args.eta}"),
        (args.scheduler == "ddim" or args.eta == 0, "--eta is DDIM's: with --scheduler checkpoint leave it 0"),
        (args.scheduler == "ddim" or not args.random_init,
         "--scheduler checkpoint needs a checkpoint's scheduler: --random-init has none"),
        (not (args.random_init and (args.score or args.eval)),
         "--random-init draws random weights to time sampling: --score and --eval would judge noise with "
         "downloaded scorers"),
        # 1000 steps of SD's 1000 training timesteps would start at t = 1000 (steps_offset 1)
        (args.steps < 1000, f"--steps must be < 1000 (the training timesteps), got {args.steps}"),
        (args.precision == "fp32" or not (args.merge or args.save_merged),
         "--merge and --save-merged need --precision fp32: "
         "merged into fp16/bf16 weights, small LoRA updates round away"),
        (not args.export_webui or args.export_webui.endswith(".safetensors"),
         f"--export-webui must name a .safetensors file, got {args.export_webui}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.prompt_list or exporting or args.benchmark,
         "no prompt: pass --prompt TEXT, --prompts FILE or --eval FILE"),
        (args.benchmark >= 0, f"--benchmark must be >= 0, got {args.benchmark}"),
        (not args.benchmark or not (args.lora or exporting or both or args.score),
         "--benchmark times the base model's sampler and writes nothing: leave out --lora, --save-merged, "
         "--export-webui, --compare, --score and --eval"),
        (not (args.eval and (args.prompt or args.prompts)), "--eval takes its prompts from its file alone"),
        (args.lora or not (args.compare or args.eval), "--compare and --eval compare base and LoRA: pass --lora"),
        (args.lora or not (args.merge or exporting), "--merge, --save-merged and --export-webui need --lora"),
        (not one_png(args) or images <= 1,
         f"--out {args.out} is one PNG file but this run writes {images} images: pass a folder"),
        (not one_png(args) or not both, "--compare and --eval write several files: pass a folder --out"),
        (Path(args.out).suffix.lower() not in IMAGE_SUFFIXES,
         f"--out {args.out}: images are written as PNG, so name a .png file or a folder"),
        # (a file where a folder belongs, or the other way round, is output_problem's to say)
        (not args.save_merged or not Path(args.save_merged).is_dir(), f"--save-merged {args.save_merged} exists"),
        (not args.export_webui or not os.path.lexists(args.export_webui) or Path(args.export_webui).is_dir(),
         f"--export-webui {args.export_webui} exists"),
        (0 <= args.seed and args.seed + args.n <= 2**64, f"--seed and the seeds after it (--n) must be in [0, 2^64), "
                                                         f"torch's generator seeds, got {args.seed} and --n {args.n}"),
    ]
    outputs = [(args.out, "--out", one_png(args)), (args.export_webui, "--export-webui", True),
               (args.save_merged, "--save-merged", False)]
    sizes = [size_problem(args.height, "--height"), size_problem(args.width, "--width")]
    problems = [msg for ok, msg in checks if not ok] + [p for p in [*sizes, device_problem(args.device)] if p] + [
        msg for path, flag, is_file in outputs if path is not None and (msg := output_problem(path, flag, is_file))]
    # --save-merged replaces its folder whole and --export-webui is a file: no other output may lie at or inside one
    places = {flag: Path(os.path.realpath(path)) for path, flag, _ in outputs  # outputs are literal paths: no ~
              if path is not None and (flag != "--out" or args.prompt_list)}
    clashes = {tuple(sorted((flag, whole))) for whole in ("--save-merged", "--export-webui") if whole in places
               for flag, path in places.items() if flag != whole and path.is_relative_to(places[whole])}
    problems += [f"{a} {places[a]} and {b} {places[b]} overlap: give each output its own place"
                 for a, b in sorted(clashes)]
    try:  # found, and a LoRA (its layers are checked once the UNet loads): a typo costs no pipeline load
        if args.lora:
            unet_lora_ranks(args.lora, "--lora")
    except UserError as err:
        problems.append(str(err))
    # only a good run whose --out exists can hold its files (a huge --n would list millions of names for nothing)
    check = not problems and not (args.overwrite or args.benchmark) and os.path.exists(args.out)
    existing = [p for p in files_written(args) if p.exists()] if check else []
    if existing:
        problems.append(f"--out {args.out} already holds {existing[0].name}"
                        + (f" and {len(existing) - 1} more of this run's files" if len(existing) > 1 else "")
                        + ": pass --overwrite to replace them, or another --out")
    return problems


def files_written(args):
    """Every file the images, the grid and eval.json of this run go to (the exports have their own checks)."""
    both = args.compare or args.eval
    tags = ["-lora", "-base"] if both else [""]
    paths = [image_path(args, *job, tag) for job in jobs_of(args) for tag in tags]
    return paths + [Path(args.out) / name for name in ["compare.png"] * bool(both) + ["eval.json"] * bool(args.eval)]


def main(argv=None):
    try:
        with path_errors_refused():
            run(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: every image already written is whole (atomic_write), none is half
        print("stopped: the images written so far are complete; rerun with --overwrite to make them all again",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
