"""Step-aware Preference Optimization (SPO; Liang et al., arXiv 2406.04314, CVPR 2025) in one file.

    python spo.py --model tiny --out runs/tiny          # the whole algorithm offline, tiny random models, CPU
    python spo.py --model sd15 --prompts 4k_training_prompts.json --out runs/sd15
    python spo.py --model sd15 --prompts ... --out runs/sd15 --resume   # continue from the newest checkpoint
    python spo.py --model sdxl --prompts 4k_training_prompts.json --out runs/sdxl

Per batch of prompts, SPO does two phases:
  SAMPLING  sample_candidate_pool: DDIM from noise. From `divert_start_step` on, every step draws a pool of k
            candidates x_{t-1} from one shared x_t; the step-aware preference model judges them (on their
            decoded x0-predictions, at their own noise level), pick_win_lose keeps the best and the worst when
            they differ enough, and the chain continues from a random member of the pool. (SDXL: each candidate
            first takes `num_inner_step` more steps of its own, and all of them become pairs.)
  TRAINING  spo_loss on each kept (x_t, winner, loser): a DPO-style loss on the clipped per-element likelihood
            ratios of the two children under the policy (UNet + LoRA) and the frozen reference (the same UNet,
            LoRA off, or at --init-lora's weights).
The math matches the authors' code (checked against their vectors in ../shared/golden, see test_spo.py).
"""
import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from diffusion import (DTYPES, LOCAL_ONLY, MAX_SEED, PRESETS, TINY_MODELS, ArgumentParser, Pipeline, StopSignal,
                       TrainingAborted, UserError, all_ranks_sum, atomic_folder, atomic_write, check_text,
                       checkpoint_folders, cleared_if_it_fails, ddim_log_prob, ddim_sample, ddim_step, ddim_timesteps,
                       device_problem, file_problem, finite_float, holds_files, inject_lora, load_lora,
                       load_optimizer_state, load_safetensors, lora_disabled, lora_layers, output_problem,
                       path_errors_refused, predict_noise, read_json, read_metrics, read_prompts, remove_unfinished,
                       resolve_lora, run_folder_lock, save_grid, save_lora, setup_distributed, size_problem, take,
                       unet_lora_ranks)
from preference_model import PREFERENCE_FLAGS, load_preference_model

# ----------------------------------------------------------------------------------------------
# Defaults: the paper's SD1.5 settings (the official configs/basic_config.py with k = 4).


@dataclass
class Config:
    model: str = "sd15"  # sd15 | sdxl | tiny | tiny-sdxl: picks the preset below
    pretrained: str = None  # hub id or local diffusers folder; default from the preset
    vae: str = None  # another VAE (hub id or folder) in place of the pipeline's, none for its own; default: preset
    prompts: str = None  # JSON list of {"caption": ...} or a text file, one prompt a line
    out: str = "runs/spo"  # run folder: LoRA, config.json, metrics.jsonl, checkpoints/, samples/
    resume: bool = False  # continue the run in --out from its newest checkpoint
    overwrite: bool = False  # replace an existing run in --out
    init_lora: str = None  # start from a LoRA (file, run folder or hub repo), which is then DPO's reference too
    preference: str = "spm"  # spm | pickscore (the paper's ablation: no step awareness)
    preference_model: str = None  # SPM's CLIP base (hub id or folder); default from the preset
    preference_processor: str = None  # SPM's processor/tokenizer; default from the preset
    preference_checkpoint: str = None  # official SPM .bin or our .safetensors; default from the preset
    epochs: int = 10  # passes over the prompts
    seed: int = 42  # the LoRA init, and every prompt order, noise and shuffle of the run
    resolution: int = None  # pixels; default from the preset (512 for sd15)
    steps: int = 20  # DDIM steps
    eta: float = 1.0  # DDIM eta in (0, 1]: > 0 makes each step a Gaussian with a likelihood; 1 as the official run
    cfg: float = 5.0  # classifier-free guidance scale, in sampling and in training
    divert_start_step: int = 4  # first step that draws a pool (4 of 20: t = 751, the noisiest step trained)
    k: int = 4  # candidates per pool
    num_inner_step: int = 0  # steps each candidate takes on its own before the pool is judged
    pool_at_last_step: bool = True  # SD1.5 reference: the last step draws a pool; SDXL: it joins the last chunk
    threshold: float = 0.3  # keep a pair only if softmax([s_win, s_lose])[0] - [1] > threshold
    beta: float = 10.0  # DPO temperature
    eps: float = 0.1  # likelihood ratios are clamped to [1 - eps, 1 + eps]
    lr: float = 6e-5  # AdamW
    weight_decay: float = 1e-4  # AdamW; betas (0.9, 0.999) and eps 1e-8 as the official run
    lora_rank: int = 4
    lora_alpha: float = 4.0  # scale = alpha / rank
    sample_batch_size: int = 10  # prompts per batch
    train_batch_size: int = 10  # pairs per micro-batch, per GPU
    grad_accum: int = 1  # micro-batches per optimizer step, counted across prompt batches as the official run
    max_grad_norm: float = 1.0  # the official config's; its clip call gets a used-up iterator: 0 reproduces that
    precision: str = None  # fp16 | bf16 | fp32 for the frozen weights; default fp16 on CUDA, fp32 on CPU
    preference_precision: str = "fp32"  # the judge's weights (its timestep embedding stays fp32); official: fp32
    compile: bool = None  # torch.compile the UNet; default on for CUDA, off for CPU
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, slower training
    device: str = None  # default cuda if available
    save_every: int = 0  # also checkpoint every N prompt batches (0: only at epoch ends)
    keep: int = 0  # keep the newest N checkpoints (0: all)
    max_bad_steps: int = 10  # abort after this many non-finite steps in a row
    random_init: bool = False  # the preset's real architectures with random weights: speed and memory, no download
    benchmark: int = 0  # time N prompt batches after a warm-up, print a table, write nothing (0: train)
    validation_prompts: tuple = ("A beautiful lake", "a photo of a cat")  # the epoch-end grid
    validation_seeds: tuple = (0, 1)


# Per preset: where the models come from, and the settings that differ from the paper's defaults above.
# SDXL: the official configs/spo_sdxl_4k-prompts_num-sam-2_3-is_10ep_bs2_gradacc2.py.
# The tiny random SPM's scores of one pool spread by about 0.1, so the paper's threshold would keep nothing.
SDXL_SETTINGS = {"k": 2, "num_inner_step": 3, "pool_at_last_step": False}
PRESET_OVERRIDES = {
    "sd15": {},
    "sdxl": {**SDXL_SETTINGS, "lora_rank": 64, "lora_alpha": 64.0, "lr": 1e-5, "threshold": 0.4,
             "sample_batch_size": 2, "train_batch_size": 2, "grad_accum": 2},
    "tiny": {"epochs": 2, "sample_batch_size": 4, "train_batch_size": 8, "threshold": 0.01},
    "tiny-sdxl": {**SDXL_SETTINGS, "epochs": 2, "sample_batch_size": 4, "train_batch_size": 8, "threshold": 0.01},
}
TINY_PROMPTS = ["a photo of a cat", "a red dog", "a beautiful lake", "an image of the lake", "a cat on a dog",
                "a photo of a red lake", "the dog", "a beautiful photo of a cat"]
CHOICES = {"model": list(PRESETS), "preference": ["spm", "pickscore"], "precision": list(DTYPES),
           "preference_precision": list(DTYPES),
           "compile_mode": ["default", "reduce-overhead", "max-autotune"]}


# ----------------------------------------------------------------------------------------------
# SAMPLING: the DDIM chain with candidate pools (Sec. 4 of the paper): at every step (SD1.5), every 4th (SDXL).


def pick_win_lose(scores, threshold):
    """scores (k, b) -> winner index (b,), loser index (b,), valid (b,).

    The best and the worst candidate of each pool; the pair counts only if the preference model is sure
    enough: softmax([s_max, s_min])[0] - softmax(...)[1] = tanh((s_max - s_min) / 2) > threshold. The middle
    candidates never matter (golden README N6)."""
    s_max, win = scores.max(dim=0)
    s_min, lose = scores.min(dim=0)
    p = torch.softmax(torch.stack([s_max, s_min]), dim=0)  # (2, b); the official form, not tanh: its rounding
    return win, lose, p[0] - p[1] > threshold


def pool_steps(cfg):
    """Indices of the steps that draw a candidate pool: from divert_start_step on, every (num_inner_step + 1)-th
    step, for SD1.5 (num_inner_step 0) every step. The SDXL reference never starts a pool at the last step: steps
    left over join the last chunk (its multi_sample_pipeline_sdxl)."""
    end = cfg.steps if cfg.pool_at_last_step else cfg.steps - 1
    return list(range(cfg.divert_start_step, end, cfg.num_inner_step + 1))


@torch.no_grad()
def sample_candidate_pool(pipe, unet, cond, uncond, score_fn, cfg, generator):
    """Run one batch of prompts through the SPO sampler and return the kept training pairs.

    cond/uncond: conditioning dicts of b rows (Pipeline.encode_prompts). score_fn(images (n, 3, H, W), timesteps
    (n,)) -> (n,) scores, already bound to the batch's prompts, sample-major: index j * b + p is candidate j of
    prompt p. Random draws follow the official order exactly (golden README section 9), so a CPU run is bit-exact.
    Returns the kept pairs, dict(x_t, x_t_lose, t, win, lose, **cond) with a row per pair, and all scores."""
    b, k, device = len(cond["text"]), cfg.k, cond["text"].device
    step_ratio = pipe.num_train_timesteps // cfg.steps
    timesteps = ddim_timesteps(cfg.steps, pipe.num_train_timesteps, pipe.steps_offset).to(device)
    pools = pool_steps(cfg)
    size = cfg.resolution // pipe.vae_scale
    step = lambda eps, t, x: ddim_step(eps, t, x, pipe.alphas_cumprod, step_ratio, cfg.eta, pipe.prediction_type)
    randn = lambda *shape: torch.randn(shape, generator=generator, device=device)
    prompt_rows = torch.arange(b, device=device)
    members = prompt_rows.repeat(k)  # row of each flattened pool member's prompt: j * b + p -> p
    pool_cond, pool_uncond = take(cond, members), take(uncond, members)  # (k * b, ...): the pool's conditioning
    kept, all_scores = [], []

    def judge_pool(images, t_images, chunk):
        # Score the pool, and for prompts where the preference is clear keep every transition of the winner's and
        # the loser's chunk as a pair (x_t, x_t_lose -> win, lose), labelled with the timestep it was taken at:
        # it trains the step x_t -> x_{t-1} (golden README N7).
        # The pairs that fail the threshold are dropped after the loop: a boolean mask here would make the host
        # wait for the device at every pool.
        scores = score_fn(images, t_images.expand(k * b)).float()
        all_scores.append(scores)
        win, lose, valid = pick_win_lose(scores.view(k, b), cfg.threshold)  # (k * b,) -> (k, b)
        p = prompt_rows
        for parents, children, t in chunk:  # each (k, b, c, h, w), and the parents' timestep
            # [win, p]: (k, b, c, h, w) -> (b, c, h, w), member win[p] of prompt p
            kept.append(dict(x_t=parents[win, p], x_t_lose=parents[lose, p], t=t.expand(b), win=children[win, p],
                             lose=children[lose, p], valid=valid, **cond))

    x = randn(b, unet.config.in_channels, size, size)
    pool = chunk = None  # the candidates (k, b, c, h, w), and the transitions that led to them since the last pool
    for i, t in enumerate(timesteps):
        if i <= cfg.divert_start_step:  # one trajectory per prompt, up to the first pool
            eps = predict_noise(unet, x, t.expand(b), cond, uncond, cfg.cfg)
            _, mean, std = step(eps, t, x)
            if i < cfg.divert_start_step:  # plain stochastic DDIM
                x = mean + std.view(-1, 1, 1, 1) * randn(b, *x.shape[1:])
                continue
        else:
            # One UNet pass over the whole pool gives each member's next step and its x0-prediction at t.
            flat = pool.flatten(0, 1)  # (k, b, c, h, w) -> (k * b, c, h, w)
            eps = predict_noise(unet, flat, t.expand(k * b), pool_cond, pool_uncond, cfg.cfg)
            x0, mean, std = step(eps, t, flat)
            if i not in pools:  # an inner step (SDXL): every member goes on by itself
                children = (mean + std.view(-1, 1, 1, 1) * randn(k * b, *flat.shape[1:])).view(pool.shape)
                chunk.append((pool, children, t))
                pool = children
                continue
            # The step-aware preference model judges the decoded x0-predictions at the members' own timestep t.
            judge_pool(pipe.decode(x0), t, chunk)
            # The step-wise resampler: continue from a uniformly random member, not the winner (as the official
            # code), so the chain keeps following the model's own distribution instead of the judge's choices.
            # The member's noise prediction is reused to draw the next pool.
            idx = torch.randint(0, k, (b,), generator=generator, device=device)
            pick = idx * b + prompt_rows  # flat index of member idx[p] of prompt p
            x, mean, std = flat[pick], mean[pick], std[pick]
        # Every pool step, the first included, draws k children of the one shared x_t: (k, b, c, h, w)
        pool = mean[None] + std.view(1, -1, 1, 1, 1) * randn(k, *mean.shape)
        chunk = [(x.expand(k, *x.shape), pool, t)]  # the pool's members share their parent x_t
    # After the last step the members are the final latents: decode them and score them at t = 0.
    judge_pool(pipe.decode(pool.flatten(0, 1)), torch.zeros((), dtype=torch.long, device=device), chunk)
    pairs = {key: torch.cat([d[key] for d in kept]) for key in kept[0]}  # (b * transitions judged, ...)
    keep = pairs.pop("valid").nonzero().squeeze(1)  # the one sync: which rows are pairs
    return {key: value[keep] for key, value in pairs.items()}, torch.cat(all_scores)


def make_score_fn(scorer, prompts, k):
    """Bind the batch's prompts to the preference model. Prompts go through the preference model's own
    tokenizer, and their text features are computed once, not once per candidate and step. The judge runs in
    its own dtype (fp32 as the official code, or --preference-precision), outside the run's autocast (the
    official code autocasts only the UNet's forward)."""
    input_ids = scorer.tokenize(prompts)
    with torch.autocast(input_ids.device.type, enabled=False):
        text = scorer.encode_text(input_ids).repeat(k, 1)  # (b, d) -> (k * b, d), sample-major

    def score(images, t):
        with torch.autocast(images.device.type, enabled=False):
            return scorer.judge(images, t, text)
    return score


# ----------------------------------------------------------------------------------------------
# TRAINING: the SPO loss on the kept pairs.


COND_KEYS = ("text", "pooled", "time_ids")  # what Pipeline.encode_prompts returns; pairs carry them too


def lora_weights(unet):
    """A copy of every LoRA layer's (down, up) weights."""
    return [(m.lora.down.weight.detach().clone(), m.lora.up.weight.detach().clone()) for m in lora_layers(unet)]


@torch.no_grad()
def set_lora_weights(unet, weights):
    for m, (down, up) in zip(lora_layers(unet), weights):
        m.lora.down.weight.copy_(down)
        m.lora.up.weight.copy_(up)


def keep_as_reference(unet):
    """Store the LoRA's current (--init-lora) weights in each layer as the reference's, for as_reference."""
    for m, weights in zip(lora_layers(unet), lora_weights(unet)):
        m.initial = weights


@contextlib.contextmanager
def as_reference(unet):
    """Inside, the UNet is DPO's reference: the model training started from. That is the base model, the LoRA
    switched off; after --init-lora it is the base plus that LoRA, whose weights keep_as_reference stored in each
    layer: they are copied in, and the trained ones back on exit."""
    layers = lora_layers(unet)
    if layers[0].initial is None:
        with lora_disabled(unet):
            yield
        return
    trained = lora_weights(unet)
    try:
        set_lora_weights(unet, [m.initial for m in layers])
        yield
    finally:
        set_lora_weights(unet, trained)


def own_parent(pairs):
    """(n,) bool: whether the pair's loser steps from a parent of its own (an inner SDXL step), not the winner's x_t."""
    return (pairs["x_t_lose"] != pairs["x_t"]).flatten(1).any(dim=1)


def pair_log_probs(pipe, policy, reference, pairs, uncond_1, cfg):
    """(logp_w, logp_l, logp_ref_w, logp_ref_l), each (n,): log p(winner | x_t) and log p(loser | x_t_lose) under
    the policy (with grad) and the reference (no grad). policy and reference are the same UNet; policy may be its
    DistributedDataParallel wrapper. uncond_1: the negative conditioning, one row."""
    n = len(pairs["t"])
    # Deliberate difference from the official code, same math: where winner and loser share x_t (every pair of
    # SD1.5, the first of each SDXL chunk), one forward serves both (the official code runs two). Inner SDXL
    # transitions have a parent each, and the loser's gets its own row.
    own = own_parent(pairs).nonzero()[:, 0]  # (n_own,): such losers
    x_t = torch.cat([pairs["x_t"], pairs["x_t_lose"][own]])  # (n + n_own, c, h, w): the UNet's input rows
    rows = torch.cat([torch.arange(n, device=own.device), own])  # (n + n_own,): the pair behind each row
    # e.g. n = 3 pairs, own = [1]: rows [0, 1, 2, 1], lose_row [0, 3, 2]
    lose_row = torch.arange(n, device=own.device)  # (n,): the row each loser steps from; winners use rows :n
    lose_row[own] = torch.arange(n, len(rows), device=own.device)
    t, cond = pairs["t"][rows], {k: pairs[k][rows] for k in COND_KEYS if k in pairs}
    uncond = take(uncond_1, torch.zeros_like(rows))
    step_ratio = pipe.num_train_timesteps // cfg.steps
    # The reference is the same UNet (LoRA off, or at --init-lora's weights), not a second UNet in memory. It runs
    # first: as_reference may swap LoRA weights that the policy's backward would still need.
    with torch.no_grad(), as_reference(reference):
        eps_ref = predict_noise(reference, x_t, t, cond, uncond, cfg.cfg)
    eps = predict_noise(policy, x_t, t, cond, uncond, cfg.cfg)
    _, mean, std = ddim_step(eps, t, x_t, pipe.alphas_cumprod, step_ratio, cfg.eta, pipe.prediction_type)
    _, mean_ref, _ = ddim_step(eps_ref, t, x_t, pipe.alphas_cumprod, step_ratio, cfg.eta, pipe.prediction_type)
    lp = lambda child, m, row: ddim_log_prob(child, m[row], std[row])  # std depends on t only: the reference's too
    win_row = slice(0, n)
    return (lp(pairs["win"], mean, win_row), lp(pairs["lose"], mean, lose_row),
            lp(pairs["win"], mean_ref, win_row), lp(pairs["lose"], mean_ref, lose_row))


def spo_loss(logp_w, logp_l, logp_ref_w, logp_ref_l, beta, eps):
    """The step-wise DPO objective of SPO: -log sigmoid(beta * (log r_w - log r_l)), r = exp(logp - logp_ref).
    Each logp is a MEAN over C, H, W (golden README N1), so r is a per-element likelihood ratio, not
    p_policy / p_ref of the whole latent.

    As in the official code both ratios are clamped to [1 - eps, 1 + eps] (no PPO min): a side whose policy has
    left that band around the frozen reference gets zero gradient, and |beta * (log r_w - log r_l)| <=
    beta * log((1 + eps) / (1 - eps)) (2.01 at the defaults) keeps log(sigmoid(.)) safe (N5)."""
    # exp, clamp, then log again (not a clamp of the log-ratio): the official form, so its vectors match to the bit
    ratio_w = torch.clamp(torch.exp(logp_w - logp_ref_w), 1 - eps, 1 + eps)
    ratio_l = torch.clamp(torch.exp(logp_l - logp_ref_l), 1 - eps, 1 + eps)
    loss = -torch.log(torch.sigmoid(beta * torch.log(ratio_w) - beta * torch.log(ratio_l))).mean()
    return loss, ratio_w, ratio_l


def train_micro_batch(pipe, policy, reference, pairs, uncond_1, params, optimizer, scaler, autocast, cfg, world,
                      group):
    """Backpropagate one micro-batch of pairs into the LoRA's gradients, scaled by 1 / grad_accum; once the group
    holds grad_accum micro-batches, update the LoRA. Groups run on across prompt batches, as accelerate counts
    them in the official run. group: the metrics of the micro-batches accumulated so far (an update empties it).
    Returns the update's metrics, or None. DDP all-reduces every micro-batch, and the metrics too, so what a group
    carries (into the next prompt batch, or a checkpoint) is the same on every rank. A non-finite loss or gradient skips
    the update on every rank alike (fp16 GradScaler semantics, for every precision)."""
    with autocast:
        logps = pair_log_probs(pipe, policy, reference, pairs, uncond_1, cfg)
    loss, ratio_w, ratio_l = spo_loss(*logps, cfg.beta, cfg.eps)
    scaler.scale(loss / cfg.grad_accum).backward()
    stats = torch.stack([loss.detach(), ratio_w.mean(), ratio_l.mean()]).tolist()  # the metrics in one transfer
    *sums, n = all_ranks_sum([*stats, len(pairs["t"])], world)
    group.append(tuple(v / world for v in sums) + (int(n),))  # (loss, ratio_w, ratio_l, pairs) of all ranks
    if len(group) < cfg.grad_accum:
        return None
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")).item()
    mean = lambda j: sum(r[j] for r in group) / len(group)  # over the group's micro-batches
    record = dict(loss=mean(0), ratio_win=mean(1), ratio_lose=mean(2), grad_norm=grad_norm,
                  pairs=sum(r[3] for r in group))
    if math.isfinite(grad_norm):  # the norm of the all-reduced gradients: the same on every rank
        scaler.step(optimizer)
    else:
        record["skipped"] = "non-finite loss" if not math.isfinite(record["loss"]) else "non-finite gradient"
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    group.clear()
    return record


# ----------------------------------------------------------------------------------------------
# Run: setup, the epoch loop, checkpoints.


def derived_seed(cfg, *parts):
    """A seed for one purpose, e.g. ("sample", epoch, batch, rank). Every prompt batch draws from its own
    generators, so a resumed run draws exactly what an uninterrupted one would, without saving RNG state."""
    return int.from_bytes(hashlib.sha256(repr((cfg.seed, *parts)).encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def save_validation_grid(pipe, cfg, path):
    """Fixed prompts and seeds, plain DDIM (eta 0) as the official validation, one image per (prompt, seed)."""
    size, pixels = cfg.resolution // pipe.vae_scale, (cfg.resolution, cfg.resolution)
    uncond = pipe.encode_negative(1, pixels)
    images = []
    for prompt in cfg.validation_prompts:
        cond = pipe.encode_prompts([prompt], pixels)
        for seed in cfg.validation_seeds:
            gen = torch.Generator(pipe.unet.device).manual_seed(seed)
            z = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=gen, device=pipe.unet.device)
            images.append(pipe.decode(ddim_sample(pipe, cond, uncond, z, cfg.steps, cfg.cfg)))
    save_grid(torch.cat(images), path, cols=len(cfg.validation_seeds))


# Several GPUs (torchrun): each rank samples its own share of the prompts with its own noise, then all ranks
# pool their kept pairs and train on equal shares of them, so every rank runs the same optimizer steps.


def rank_prompts(order, rank, world):
    """This rank's prompts for the epoch: the order padded to a multiple of the world size by repeating it from
    its start (as DistributedSampler does, also when there are fewer prompts than ranks), then every world-th one,
    so all ranks get equally many."""
    total = math.ceil(len(order) / world) * world
    order = (order * math.ceil(total / len(order)))[:total]
    return order[rank::world]


def all_gather_rows(v):
    """Every rank's rows of v, concatenated in rank order. Row counts differ per rank: exchange the counts,
    pad to the largest, all_gather, unpad."""
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=v.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(v)], device=v.device))
    counts = [int(c) for c in counts]
    padded = torch.cat([v, v.new_zeros((max(counts) - len(v), *v.shape[1:]))])  # (largest count, ...)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])


def exchange_pairs(pairs, world):
    """Every rank's kept pairs (and scores) to every rank, in rank order."""
    return pairs if world == 1 else {key: all_gather_rows(v) for key, v in pairs.items()}


# Checkpoints are named by the position of the next work to do: (epoch, batch, first pair of the batch to train).
# A stop in the middle of a batch also saves that batch's kept pairs, so training goes on exactly where it stopped.
# A resumed run may change only these settings; every other one (the math, the models, the batch sizes) must match.
CHANGEABLE_ON_RESUME = ("prompts", "out", "resume", "overwrite", "epochs", "device", "compile", "compile_mode",
                        "gradient_checkpointing", "save_every", "keep", "max_bad_steps", "benchmark",
                        "validation_prompts", "validation_seeds")


def checkpoint_dirs(out):
    # versions before atomic_folder left unfinished ones under "...tmp" names
    return sorted(d for d in checkpoint_folders(out, "epoch-") if not d.name.endswith(".tmp"))


def save_checkpoint(out, unet, optimizer, scaler, progress, pending, keep, grads):
    """checkpoints/epoch-E_batch-B_pair-P/: LoRA, optimizer and GradScaler state, progress (and pending pairs, and
    the gradients of a gradient-accumulation group not yet complete). No RNG state is needed: every prompt batch
    seeds its own generators (derived_seed). Written under a temporary name and renamed, so a crash never
    leaves a half checkpoint that --resume would pick."""
    from safetensors.torch import save_file

    final = out / "checkpoints" / "epoch-{:04d}_batch-{:06d}_pair-{:05d}".format(*progress["position"])
    with atomic_folder(final) as tmp:
        save_lora(unet, tmp / "pytorch_lora_weights.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}, tmp / "optimizer.pt")
        if pending is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in pending.items()}, tmp / "pending_pairs.safetensors")
        if grads:
            save_file({str(i): g.detach().cpu().contiguous() for i, g in enumerate(grads)},
                      tmp / "group_grads.safetensors")
        (tmp / "progress.json").write_text(json.dumps(progress))
    for old in checkpoint_dirs(out)[:-keep] if keep else []:
        shutil.rmtree(old)
    remove_unfinished(out / "checkpoints")
    return final


def read_progress(folder):
    """A checkpoint's progress.json, checked: its position (epoch, batch, pair), global_step and prompts_sha256."""
    progress = read_json(folder / "progress.json", "--resume")
    position, step = progress.get("position"), progress.get("global_step")
    if not (isinstance(position, list) and len(position) == 3 and all(isinstance(v, int) and v >= 0 for v in position)
            and isinstance(step, int) and step >= 0 and "prompts_sha256" in progress):
        raise UserError(f"--resume: {folder}/progress.json lacks a valid position, global_step or prompts_sha256")
    return progress


def resume_point(cfg, prompts_sha, world):
    """--resume, checked before any model loads: the run's settings must be this command's (except
    CHANGEABLE_ON_RESUME), and its newest checkpoint must come from the same prompts and number of ranks. Returns
    that checkpoint's folder, or None when the run stopped before its first."""
    out = Path(cfg.out)
    saved = read_json(out / "config.json", "--resume")
    # a setting added since the run started has its default there
    changed = [f.name for f in dataclasses.fields(Config) if f.name not in CHANGEABLE_ON_RESUME
               and saved.get(f.name, f.default) != json.loads(json.dumps(getattr(cfg, f.name)))]
    if changed:
        raise UserError(f"--resume: these settings differ from the run in {out}: {', '.join(changed)}")
    ckpts = checkpoint_dirs(out)
    if not ckpts:
        return None
    progress = read_progress(ckpts[-1])
    if progress["prompts_sha256"] != prompts_sha or progress.get("world_size", 1) != world:
        raise UserError(f"--resume: the prompts or the number of ranks differ from the run in {out}")
    return ckpts[-1]


def load_checkpoint(folder, unet, optimizer, scaler, device, params):
    """The newest checkpoint back into the LoRA (params: its parameters, whose gradients an unfinished
    accumulation group carries), optimizer and scaler; returns (progress, pending pairs or None)."""
    progress = read_progress(folder)
    load_lora(unet, folder / "pytorch_lora_weights.safetensors")
    load_optimizer_state(folder / "optimizer.pt", optimizer, scaler, device)
    pending = folder / "pending_pairs.safetensors"
    pending = {k: v.to(device) for k, v in load_safetensors(pending).items()} if pending.exists() else None
    if pending is not None and not {"x_t", "x_t_lose", "t", "win", "lose", "text", "perm"} <= pending.keys():
        raise UserError(f"--resume: {folder}/pending_pairs.safetensors lacks some of the pairs' tensors "
                        "(written by an older version?)")
    if progress.get("group"):  # an unfinished gradient-accumulation group: its gradients must be there
        grads = load_safetensors(folder / "group_grads.safetensors")
        if sorted(grads) != sorted(map(str, range(len(params)))):
            raise UserError(f"--resume: {folder}/group_grads.safetensors does not match the LoRA's "
                            f"{len(params)} tensors")
        for i, p in enumerate(params):
            p.grad = grads[str(i)].to(device)
    return progress, pending


def setup_models(cfg, scorer=None, world=1):
    """Device and precision, the frozen pipeline with the LoRA injected, the views of its UNet, the judge and the
    optimizer. Frozen weights are in the run's dtype, LoRA parameters in fp32."""
    distributed_cuda = cfg.device.startswith("cuda") and world > 1  # each rank its LOCAL_RANK's GPU, as torchrun means
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if distributed_cuda else cfg.device)
    dtype = DTYPES[cfg.precision]
    if device.type == "cpu" and dtype != torch.float32:
        print(f"note: --precision {cfg.precision} on a CPU is several times slower than fp32, the CPU default",
              file=sys.stderr)
    # nanoGPT-style precision: a no-op autocast in fp32, a GradScaler that only acts for fp16.
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.backends.cuda.matmul.allow_tf32 = True  # as the official run (cuDNN's convolutions use TF32 by default)

    pipe = Pipeline(cfg.pretrained, device, dtype, random_init=cfg.model if cfg.random_init else None, vae=cfg.vae)
    # steps_offset 0 (an SDXL config, or an SD1.x one that leaves it out): the last step goes from t = 0 to 0 with no
    # noise. As a pool of its own its members tie and make no pair; as an inner step its pairs have no likelihood.
    if pipe.steps_offset == 0 and cfg.steps - 1 not in pool_steps(cfg):
        raise UserError(f"--pretrained {cfg.pretrained}: its scheduler's steps_offset 0 makes the last DDIM step go "
                        "from t = 0 to t = 0 without noise, so its pairs have no likelihood: set steps_offset 1")
    torch.manual_seed(cfg.seed)  # the LoRA init, the same on every rank
    lora_params = inject_lora(pipe.unet, cfg.lora_rank, cfg.lora_alpha)
    if cfg.init_lora:
        init_lora = resolve_lora(cfg.init_lora, "--init-lora")
        try:
            load_lora(pipe.unet, init_lora)
        except UserError as err:
            raise UserError(f"--init-lora {cfg.init_lora}: {err}") from None
        keep_as_reference(pipe.unet)  # before --resume loads a checkpoint's LoRA over it
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    # pipe.unet stays the uncompiled handle (for saving the LoRA). Sampling and the reference need no
    # gradient sync; the policy forward of training goes through DDP, which all-reduces only the LoRA gradients.
    # fullgraph: the UNet with its LoRA, on or off, traces as one graph (a test checks SD1.5's and SDXL's layouts),
    # so a break that a library update brings fails here instead of slowing every step in silence.
    unet = torch.compile(pipe.unet, mode=cfg.compile_mode, fullgraph=True) if cfg.compile else pipe.unet
    policy = unet
    if world > 1:
        ddp = DistributedDataParallel(pipe.unet, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
        policy = torch.compile(ddp, mode=cfg.compile_mode) if cfg.compile else ddp
    scorer = scorer or load_preference_model(cfg.preference, cfg.preference_model, cfg.preference_processor,
                                             cfg.preference_checkpoint, device=device,
                                             dtype=DTYPES[cfg.preference_precision],
                                             flags=PREFERENCE_FLAGS,
                                             random_init=cfg.random_init and cfg.model not in TINY_MODELS)
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    return SimpleNamespace(device=device, autocast=autocast, scaler=scaler, pipe=pipe, unet=unet, policy=policy,
                           scorer=scorer, lora_params=lora_params, optimizer=optimizer)


def sampling_unet_samples(cfg):
    """UNet samples (CFG-batched) per prompt: one per step up to the first pool, then one per pool member."""
    return cfg.divert_start_step + 1 + cfg.k * (cfg.steps - cfg.divert_start_step - 1)


def train(cfg, scorer=None, rank=0, world=1):
    """The whole run, on one rank of `world`. `scorer` replaces the preference model (tests use a rule-based one).
    Returns the pipeline, or None when a signal stopped the run. Only rank 0 writes files."""
    out, main_rank = Path(cfg.out), rank == 0
    prompts = read_prompts(cfg.prompts, "--prompts") if cfg.prompts else list(TINY_PROMPTS)
    prompts_sha = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    resumed = resume_point(cfg, prompts_sha, world) if cfg.resume else None  # before the models: fails in seconds
    m = setup_models(cfg, scorer, world)
    device, autocast, scaler, pipe, unet, policy, scorer, lora_params, optimizer = (
        m.device, m.autocast, m.scaler, m.pipe, m.unet, m.policy, m.scorer, m.lora_params, m.optimizer)
    too_long = sum(len(ids) > pipe.tokenizer.model_max_length for ids in pipe.tokenizer(prompts).input_ids)
    if too_long and main_rank:
        print(f"--prompts: {too_long} prompts are longer than {pipe.tokenizer.model_max_length} tokens "
              "and get truncated")

    # The run folder: a fresh one, or resume from the newest checkpoint (every rank reads the same one).
    position, global_step, pending = (0, 0, 0), 0, None
    group = []  # the metrics of the micro-batches whose gradients wait for the rest of their group
    if resumed:
        progress, pending = load_checkpoint(resumed, pipe.unet, optimizer, scaler, device, lora_params)
        group = [tuple(r) for r in progress.get("group", [])]
        position, global_step = tuple(progress["position"]), progress["global_step"]
        if main_rank:
            print(f"resuming {out} from {resumed.name} (step {global_step})")
    elif cfg.resume:
        if main_rank:  # it stopped before its first checkpoint
            print(f"--resume: {out} holds no checkpoint yet: the run starts from the beginning")
    elif main_rank:
        for old in out.iterdir() if cfg.overwrite else []:  # the folder itself stays: it holds the run's lock
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if main_rank:
        settings = json.dumps(dataclasses.asdict(cfg), indent=2)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(settings))
        if metrics_path.exists():  # drop what was logged after the checkpoint we resume from
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(metrics_path) if r["step"] <= global_step)
            atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(kept))

    pixels = (cfg.resolution, cfg.resolution)
    uncond_1 = pipe.encode_negative(1, pixels)  # one row: the empty-prompt negative
    b, tb = cfg.sample_batch_size, cfg.train_batch_size
    n_batches = math.ceil(math.ceil(len(prompts) / world) / b)  # ranks get equal shares (rank_prompts)
    if main_rank:
        print(f"{len(prompts)} prompts; per epoch and rank ({world} in all) {n_batches} batch(es) of {b} prompts; "
              f"{cfg.epochs} epochs\nper prompt: {sampling_unet_samples(cfg)} sampling UNet samples (CFG-batched), "
              f"{cfg.k * len(pool_steps(cfg))} VAE decodes and preference scores, at most "
              f"{cfg.steps - cfg.divert_start_step} pairs; {tb * cfg.grad_accum * world} pairs per update at most")

    def checkpoint(position, pending=None):
        progress = dict(position=position, global_step=global_step, prompts_sha256=prompts_sha, world_size=world,
                        group=group)
        if main_rank:
            grads = [p.grad for p in lora_params] if group else None
            return save_checkpoint(out, pipe.unet, optimizer, scaler, progress, pending, cfg.keep, grads)

    def stop_requested(stop):  # a signal to any rank stops all of them at the same step
        return any(all_ranks_sum([stop.signum is not None], world))

    def stopped(folder):
        if main_rank:
            tqdm.write(f"stopped by a signal: checkpoint {folder}; continue with the same command plus --resume"
                       + (" (and without --overwrite)" if cfg.overwrite else ""))

    bad_steps = 0
    with StopSignal() as stop:
        for epoch in tqdm(range(position[0], cfg.epochs), desc="epoch", initial=position[0], total=cfg.epochs,
                          disable=not main_rank):
            order_gen = torch.Generator().manual_seed(derived_seed(cfg, "order", epoch))
            order = torch.randperm(len(prompts), generator=order_gen)
            my_prompts = [prompts[i] for i in rank_prompts(order.tolist(), rank, world)]
            first_batch = position[1] if epoch == position[0] else 0
            for batch in tqdm(range(first_batch, n_batches), desc="batch", initial=first_batch, total=n_batches,
                              leave=False, disable=not main_rank):
                if pending is not None:  # resuming in the middle of this batch
                    pairs, start, pending = dict(pending), position[2], None
                    perm = pairs.pop("perm")
                else:
                    ######## SAMPLING ########
                    batch_prompts = my_prompts[batch * b:(batch + 1) * b]
                    gen = torch.Generator(device).manual_seed(derived_seed(cfg, "sample", epoch, batch, rank))
                    cond = pipe.encode_prompts(batch_prompts, pixels)
                    uncond = take(uncond_1, torch.zeros(len(batch_prompts), dtype=torch.long))
                    with autocast:
                        pairs, scores = sample_candidate_pool(pipe, unet, cond, uncond,
                                                              make_score_fn(scorer, batch_prompts, cfg.k), cfg, gen)
                    pairs = exchange_pairs({**pairs, "scores": scores}, world)  # scores ride along for the metrics
                    # One shuffle of the pooled pairs, the same on every rank.
                    shuffle = torch.Generator().manual_seed(derived_seed(cfg, "shuffle", epoch, batch))
                    perm, start = torch.randperm(len(pairs["t"]), generator=shuffle).to(device), 0
                ######## TRAINING ########
                share = len(perm) // world  # equal shares (the remainder is dropped), so DDP never waits in vain
                mine = perm[rank * share:(rank + 1) * share]
                for start in range(start, share, tb):
                    if stop_requested(stop):
                        stopped(checkpoint((epoch, batch, start), {**pairs, "perm": perm}))
                        return None
                    micro = {k: v[mine[start:start + tb]] for k, v in pairs.items() if k != "scores"}
                    record = train_micro_batch(pipe, policy, unet, micro, uncond_1, lora_params, optimizer, scaler,
                                               autocast, cfg, world, group)
                    if record is None:  # the group goes on, into the next prompt batch if need be
                        continue
                    global_step += 1
                    score_mean, score_std = torch.stack([pairs["scores"].mean(), pairs["scores"].std()]).tolist()
                    record = dict(step=global_step, epoch=epoch, batch=batch, **record, pairs_kept=len(perm),
                                  score_mean=score_mean, score_std=score_std)
                    if main_rank:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    bad_steps = bad_steps + 1 if "skipped" in record else 0
                    if bad_steps and main_rank:
                        tqdm.write(f"step {global_step}: {record['skipped']}, update skipped ({bad_steps} in a row)")
                    if bad_steps >= cfg.max_bad_steps:
                        raise TrainingAborted(f"{bad_steps} non-finite steps in a row (last at step {global_step}); "
                                              f"the last good checkpoint is kept in {out / 'checkpoints'}")
                if stop_requested(stop):
                    stopped(checkpoint((epoch, batch + 1, 0)))
                    return None
                if cfg.save_every and (batch + 1) % cfg.save_every == 0 and batch + 1 < n_batches:
                    checkpoint((epoch, batch + 1, 0))
            checkpoint((epoch + 1, 0, 0))
            if main_rank:
                save_validation_grid(pipe, cfg, out / "samples" / f"epoch-{epoch}.png")
    if main_rank:
        save_lora(pipe.unet, out / "pytorch_lora_weights.safetensors")
        print(f"LoRA written to {out / 'pytorch_lora_weights.safetensors'}")
        if global_step == 0:
            print(f"warning: no pair passed --threshold {cfg.threshold} in this run, so the LoRA was never updated",
                  file=sys.stderr)
    return pipe


# ----------------------------------------------------------------------------------------------
# --benchmark: where the time goes, per prompt, at the run's real settings.

BF16_PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "4090": 165}  # dense, per GPU


class PhaseTimer:
    """Seconds, calls and items per named phase. On CUDA every boundary synchronises, so asynchronous kernels
    are charged to the phase that launched them (this costs a little speed: the benchmark's, not training's)."""

    def __init__(self, device):
        self.device, self.seconds, self.items = device, {}, {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name, fn, items=lambda *args, **kwargs: 1):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.items[name] = self.items.get(name, 0) + items(*args, **kwargs)
            return result
        return timed


def benchmark(cfg):
    """Warm-up, then cfg.benchmark timed batches of SAMPLING and TRAINING exactly as train() runs them. Writes
    nothing. The first warm-up batch runs eagerly to count its FLOPs (FlopCounterMode is a dispatch mode, which
    torch.compile cannot trace); a compiled run warms up once more, compiling, before the clock starts."""
    from torch.utils.flop_counter import FlopCounterMode

    m = setup_models(cfg)
    pipe, b, k = m.pipe, cfg.sample_batch_size, cfg.k
    timer = PhaseTimer(m.device)
    pipe.decode = timer.wrap("VAE decode", pipe.decode, lambda z, **_: len(z))
    m.scorer.judge = timer.wrap("preference model", m.scorer.judge, lambda images, *a, **kw: len(images))
    m.scorer.encode_text = timer.wrap("preference text", m.scorer.encode_text, lambda ids: len(ids))
    m.optimizer.step = timer.wrap("optimizer", m.optimizer.step)
    pixels = (cfg.resolution, cfg.resolution)
    uncond_1 = pipe.encode_negative(1, pixels)
    prompts = (TINY_PROMPTS * (b // len(TINY_PROMPTS) + 1))[:b]  # the prompts do not change the work
    memory, flops, group, warm_seconds = {}, 0, [], []
    warm_up = 1 + bool(cfg.compile)
    for batch in tqdm(range(warm_up + cfg.benchmark), desc=f"prompt batches (the first {warm_up} warm up)"):
        if batch == warm_up:  # the warm-up is over: count from here
            timer.seconds, timer.items = {}, {}
        timer.sync()
        started = time.perf_counter()
        counter = FlopCounterMode(display=False) if batch == 0 else contextlib.nullcontext()
        with counter, torch.compiler.set_stance("force_eager" if batch == 0 else "default"), warnings.catch_warnings():
            # FlopCounterMode's module hooks make a compiled module warn that they would fire twice; it runs eagerly
            warnings.filterwarnings("ignore", "Using `torch.compile.module.` when there are global hooks")
            if m.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(m.device)
            gen = torch.Generator(m.device).manual_seed(derived_seed(cfg, "benchmark", batch))
            cond = pipe.encode_prompts(prompts, pixels)
            uncond = take(uncond_1, torch.zeros(b, dtype=torch.long))
            # make_score_fn encodes the prompts for the judge: inside the timed sampling, as in training
            run = timer.wrap("sampling (all)", lambda: sample_candidate_pool(
                pipe, m.unet, cond, uncond, make_score_fn(m.scorer, prompts, k), cfg, gen))
            with m.autocast:
                pairs, _ = run()
            if m.device.type == "cuda":
                memory["sampling"] = torch.cuda.max_memory_allocated(m.device)
                torch.cuda.reset_peak_memory_stats(m.device)
            step = timer.wrap("training (all)", train_micro_batch, lambda pipe, policy, ref, micro, *a: len(micro["t"]))
            n, tb = len(pairs["t"]), cfg.train_batch_size
            parents = n + int(own_parent(pairs).sum())  # SDXL's inner steps add the losers' own parents
            timer.items["training parents"] = timer.items.get("training parents", 0) + parents
            for start in range(0, n, tb):
                micro = {key: v[start:start + tb] for key, v in pairs.items()}
                step(pipe, m.policy, m.unet, micro, uncond_1, m.lora_params, m.optimizer, m.scaler, m.autocast, cfg, 1,
                     group)
            if m.device.type == "cuda":
                memory["training"] = torch.cuda.max_memory_allocated(m.device)
        if batch == 0:
            flops = counter.get_total_flops()
        if batch < warm_up:
            timer.sync()
            warm_seconds.append(time.perf_counter() - started)
    prompts_timed = b * cfg.benchmark
    sec = {name: s / prompts_timed for name, s in timer.seconds.items()}
    judging = sec.get("VAE decode", 0) + sec.get("preference model", 0) + sec.get("preference text", 0)
    sec["sampling UNet"] = sec["sampling (all)"] - judging
    sec["training forward/backward"] = sec["training (all)"] - sec.get("optimizer", 0)
    total = sec["sampling (all)"] + sec["training (all)"]
    gpu = torch.cuda.get_device_name(m.device) if m.device.type == "cuda" else "CPU"
    peak = next((v for key, v in BF16_PEAK_TFLOPS.items() if key in gpu), None)
    achieved = flops / b / total / 1e12  # FLOPs of the warm-up batch per prompt, over seconds per prompt
    print(f"\nbenchmark: {gpu}, {cfg.model}{' random-init' if cfg.random_init else ''}, {cfg.precision}, "
          f"judge {cfg.preference_precision}, compile {cfg.compile} ({cfg.compile_mode}), "
          f"{cfg.benchmark} batches of {b} prompts, threshold {cfg.threshold}")
    print(f"warm-up: {warm_seconds[0]:.1f} s eager, counting FLOPs"
          + (f", {warm_seconds[1]:.1f} s compiling" if cfg.compile else ""))
    print(f"{'phase':<28}{'s/prompt':>10}{'share':>8}")
    for name in ("sampling UNet", "VAE decode", "preference model", "preference text", "training forward/backward",
                 "optimizer"):
        print(f"{name:<28}{sec.get(name, 0):>10.4f}{sec.get(name, 0) / total:>8.1%}")
    print(f"{'total':<28}{total:>10.4f}")
    per_prompt = lambda name: timer.items.get(name, 0) / prompts_timed
    print(f"per prompt: {sampling_unet_samples(cfg)} sampling UNet samples (CFG-batched), "
          f"{per_prompt('VAE decode'):.0f} VAE decodes, "
          f"{per_prompt('preference model'):.0f} preference image and "
          f"{per_prompt('preference text'):.0f} text forwards, "
          f"{per_prompt('training (all)'):.1f} training pairs from {per_prompt('training parents'):.1f} parent latents "
          f"(each: a policy UNet pass with backward and a reference pass, CFG-batched)")
    print(f"{flops / b / 1e12:.3g} TFLOP per prompt (counted on the warm-up batch), {achieved:.3g} TFLOP/s"
          + (f", MFU {achieved / peak:.1%} of the {peak} TFLOP/s bf16 peak" if peak else ""))
    if memory:
        print(f"peak GPU memory: sampling {memory['sampling'] / 2**30:.1f} GiB, "
              f"training {memory['training'] / 2**30:.1f} GiB")
    return sec


# ----------------------------------------------------------------------------------------------
# Command line: flags, their checks, and main.


def parse_args(argv=None):
    """Flags, then the --model preset, then the Config defaults: the first that gives a value wins."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    # --help shows each field's trailing comment in Config, so one line documents each setting
    comments = dict(re.findall(r"^    (\w+): .*?#\s*(.*)$", inspect.getsource(Config), re.M))
    for f in dataclasses.fields(Config):
        default = f.default
        comment = comments.get(f.name, "")
        presets = "".join(f", {m}: {o[f.name]}" for m, o in PRESET_OVERRIDES.items() if f.name in o)
        kw = dict(default=None, help=comment if default is None and "default" in comment else
                  f"{comment} (default: {'none' if default is None else default}{presets})")
        if f.type is bool:  # --compile / --no-compile; a None default leaves it to the device
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, tuple):
            p.add_argument("--" + f.name.replace("_", "-"), nargs="+", type=type(default[0]), **kw)
        else:
            typ = {int: int, float: finite_float}.get(f.type, str)
            p.add_argument("--" + f.name.replace("_", "-"), type=typ, choices=CHOICES.get(f.name), **kw)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    model = args.get("model", Config.model)
    preset = PRESETS[model]
    from_preset = {"pretrained": preset["pretrained"], "vae": preset["vae"], "resolution": preset["resolution"],
                   "preference_model": preset["spm_base"], "preference_processor": preset["spm_processor"],
                   # plain PickScore has no time conditioning, so no SPM checkpoint applies to it
                   "preference_checkpoint": preset["spm_checkpoint"] if args.get("preference") != "pickscore" else None,
                   **PRESET_OVERRIDES[model]}
    merged = {**from_preset, **args}
    merged["device"] = merged.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = merged["device"].startswith("cuda")
    merged.setdefault("precision", "fp16" if on_cuda else "fp32")  # bf16 autocast is slower than fp32 on CPUs
    merged.setdefault("compile", on_cuda)  # compiling on CPU costs about a minute per graph
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})
    check_text(cfg.validation_prompts, "--validation-prompts")
    problems = validate(cfg)
    if problems:
        raise UserError("; ".join(problems))
    return cfg


def validate(cfg):
    """Every check that needs no model, so a typo costs seconds, not an hour of sampling."""
    checks = [
        (cfg.k >= 2, f"--k must be at least 2 (a pool needs a winner and a loser), got {cfg.k}"),
        (0 <= cfg.threshold < 1, f"--threshold must be in [0, 1), got {cfg.threshold}"),
        (0 < cfg.eps < 1, f"--eps must be in (0, 1), got {cfg.eps}"),
        (cfg.beta > 0, f"--beta must be > 0, got {cfg.beta}"),
        (cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (0 <= cfg.divert_start_step < cfg.steps - (0 if cfg.pool_at_last_step else 1),
         f"--divert-start-step must be in [0, --steps{'' if cfg.pool_at_last_step else ' - 1'}), got "
         f"{cfg.divert_start_step} with --steps {cfg.steps}"
         + ("" if cfg.pool_at_last_step else " (without --pool-at-last-step the last step cannot start a pool)")),
        (cfg.num_inner_step >= 0, f"--num-inner-step must be >= 0, got {cfg.num_inner_step}"),
        (0 < cfg.eta <= 1, f"--eta must be in (0, 1]: at 0 DDIM is deterministic and candidates cannot differ, above 1 "
                           f"its variance formula breaks down, got {cfg.eta}"),
        # 1000 steps of SD's 1000 training timesteps would start at t = 1000 (steps_offset 1)
        (cfg.steps < 1000, f"--steps must be < 1000 (the training timesteps), got {cfg.steps}"),
        (cfg.sample_batch_size >= 1, f"--sample-batch-size must be >= 1, got {cfg.sample_batch_size}"),
        (cfg.train_batch_size >= 1, f"--train-batch-size must be >= 1, got {cfg.train_batch_size}"),
        (cfg.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (cfg.lora_rank >= 1, f"--lora-rank must be >= 1, got {cfg.lora_rank}"),
        (cfg.lora_alpha > 0, f"--lora-alpha must be > 0, got {cfg.lora_alpha}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (all(0 <= s <= MAX_SEED for s in (cfg.seed, *cfg.validation_seeds)),
         f"--seed and --validation-seeds must be in [0, {MAX_SEED}], got {cfg.seed}, {list(cfg.validation_seeds)}"),
        (cfg.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {cfg.max_grad_norm}"),
        (cfg.save_every >= 0 and cfg.keep >= 0,
         f"--save-every and --keep must be >= 0, got {cfg.save_every}, {cfg.keep}"),
        (cfg.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {cfg.max_bad_steps}"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other"),
        (cfg.model in TINY_MODELS or cfg.prompts or cfg.benchmark,
         f"--model {cfg.model} needs --prompts (e.g. the paper's 4k_training_prompts.json, see README)"),
        (cfg.benchmark >= 0, f"--benchmark must be >= 0, got {cfg.benchmark}"),
    ]
    problems = [msg for ok, msg in checks if not ok] + [
        p for p in [size_problem(cfg.resolution, "--resolution"), device_problem(cfg.device)] if p]
    if cfg.prompts and (problem := file_problem(cfg.prompts, "--prompts")):
        problems.append(problem)
    paths = [("--pretrained", cfg.pretrained), ("--vae", cfg.vae), ("--preference-model", cfg.preference_model),
             ("--preference-processor", cfg.preference_processor),
             ("--preference-checkpoint", cfg.preference_checkpoint)]
    # A path that can only be local (/, ., ~) must exist. "owner/repo" is tried on the hub when the models load, even
    # where a folder "owner" exists here; --random-init builds the models and reads none of these.
    for flag, spec in paths:
        local = spec and spec.startswith(LOCAL_ONLY)
        if local and not cfg.random_init and not os.path.exists(os.path.expanduser(spec)):
            problems.append(f"{flag}: no such file or folder: {spec}")
    try:  # a file, a run folder or a hub repo (downloaded here, once); its layers are checked once the UNet loads
        if cfg.init_lora and (ranks := unet_lora_ranks(cfg.init_lora, "--init-lora")) != {cfg.lora_rank}:
            problems.append(f"--init-lora {cfg.init_lora} has LoRA rank {', '.join(map(str, sorted(ranks)))}, this "
                            f"run uses --lora-rank {cfg.lora_rank}")
    except UserError as err:
        problems.append(str(err))
    if cfg.benchmark:  # writes nothing
        return problems
    out = Path(cfg.out)
    if problem := output_problem(cfg.out, "--out", is_file=False):
        return problems + [problem]
    if cfg.resume and not (out / "config.json").is_file():
        problems.append(f"--resume: {out} holds no run to resume (no config.json)")
    elif cfg.resume and not is_spo_run(out):
        try:
            read_json(out / "config.json", "--resume")  # names a damaged file; an intact one is another program's
            problems.append(f"--resume: {out} is not a spo.py run (its config.json holds no spo.py settings)")
        except UserError as err:
            problems.append(str(err))
    if not cfg.resume and out.is_dir() and holds_files(out):
        if not cfg.overwrite:
            problems.append(f"--out {out} already holds files: "
                            "pass --resume to continue that run or --overwrite to replace it")
        elif not is_spo_run(out) or out.is_symlink() or any(Path(os.path.expanduser(p)).resolve().is_relative_to(
                out.resolve()) for p in (Path.cwd(), cfg.prompts, cfg.init_lora) if p):
            problems.append(f"--overwrite deletes --out, and {out} is not a spo.py run folder (or is a link, or holds "
                            "the current directory, --prompts or --init-lora): remove it yourself if that is meant")
    return problems


def is_spo_run(folder):
    """Whether `folder` is a run this script wrote: its config.json holds spo.py's settings (a model or SPM folder
    has a config.json too)."""
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"divert_start_step", "k", "beta", "eps", "threshold"} <= saved.keys()


def main(argv=None):
    rank, world = setup_distributed()
    try:
        with path_errors_refused(), contextlib.ExitStack() as held:
            cfg = parse_args(argv)  # every rank checks the same flags before any rank writes anything
            out = Path(cfg.out)
            created = not out.exists()
            if not cfg.benchmark:  # before this run reads, writes or deletes anything there
                held.enter_context(run_folder_lock(out, rank, world))
            if not (cfg.benchmark or cfg.resume) and rank == 0 and (created or not holds_files(out)):
                held.enter_context(cleared_if_it_fails(out, created))  # inside the lock
            if world > 1:
                dist.barrier()
            if cfg.benchmark:
                benchmark(cfg)
            else:
                train(cfg, rank=rank, world=world)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingAborted as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
