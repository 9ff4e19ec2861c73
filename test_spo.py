"""Tests that read as the specification of this project.

Where the official SPO code defines the math, we check ours against the golden vectors taken from
it (../shared/golden, see its README); diffusers is the reference for the sampler and LoRA files. Everything
runs offline on CPU (see README.md for how long).

    python -m pytest -x -q test_spo.py
"""
import argparse
import contextlib
import copy
import dataclasses
import errno
import functools
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion import UserError

torch.set_num_threads(1)

GOLDEN = Path(__file__).resolve().parent.parent / "shared" / "golden"


@pytest.fixture(scope="session", autouse=True)
def spo_cache(tmp_path_factory):
    """Build the tiny models into a fresh cache folder, never the user's, and never touch the network."""
    folder = tmp_path_factory.mktemp("spo_cache")
    os.environ["SPO_CACHE"] = str(folder)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return folder


# ---- step-aware preference model ----

import preference_model as pm  # noqa: E402

SPM_GOLDEN = GOLDEN / "spm"
SPM_SETTINGS = json.loads((GOLDEN / "settings.json").read_text())["spm"]


@pytest.fixture(scope="module")
def spm_folders(tmp_path_factory):
    """The golden tiny CLIP as ordinary transformers folders (random weights: the checkpoint brings them)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("golden_spm")
    config = CLIPConfig.from_dict(json.loads((SPM_GOLDEN / "clip_config.json").read_text()))
    CLIPModel(config).save_pretrained(folder / "base")
    settings = json.loads((SPM_GOLDEN / "processor_settings.json").read_text())
    CLIPTokenizer(str(SPM_GOLDEN / "tokenizer" / "vocab.json"), str(SPM_GOLDEN / "tokenizer" / "merges.txt"),
                  pad_token=settings["tokenizer_pad_token"], model_max_length=settings["model_max_length"]
                  ).save_pretrained(folder / "processor")
    pm.write_image_processor_settings(folder / "processor", settings["shortest_edge"], settings["image_mean"],
                                      settings["image_std"])
    return str(folder / "base"), str(folder / "processor")


@pytest.fixture(scope="module")
def golden_spm(spm_folders):
    checkpoint = str(SPM_GOLDEN / "spm_official.bin")
    return pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def spm_io():
    return load_file(SPM_GOLDEN / "spm_io.safetensors")


@pytest.fixture(scope="module")
def tiny_spm():
    return pm.load_preference_model("spm", "tiny", "tiny", None)


def test_official_bin_has_exactly_our_keys(golden_spm):
    official = torch.load(SPM_GOLDEN / "spm_official.bin", map_location="cpu", weights_only=True)
    ours = golden_spm.state_dict()
    assert sorted(ours) == sorted(SPM_SETTINGS["state_dict_keys"]), "our keys differ from the official list"
    assert set(official) == set(ours), "the official .bin has missing or unexpected keys for our model"
    assert all(torch.equal(ours[k], official[k]) for k in ours), "the official .bin did not load every tensor"


def test_golden_safetensors_loads_like_the_bin(spm_folders, golden_spm):
    checkpoint = str(SPM_GOLDEN / "spm_official.safetensors")
    model = pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=checkpoint)
    theirs, ours = model.state_dict(), golden_spm.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours), ".safetensors and .bin give different weights"


def test_save_checkpoint_round_trips_in_official_layout(tmp_path, spm_folders, golden_spm):
    path = tmp_path / "spm.safetensors"
    pm.save_checkpoint(golden_spm, path)
    assert sorted(load_file(path)) == sorted(SPM_SETTINGS["state_dict_keys"]), "saved keys not in official layout"
    model = pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=str(path))
    reloaded = model.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in golden_spm.state_dict().items()), "round trip changed weights"


def test_checkpoint_with_old_position_ids_buffers_loads(tmp_path, spm_folders):
    # Checkpoints saved by older transformers also hold the (constant) position_ids; the official loader accepts them.
    state = torch.load(SPM_GOLDEN / "spm_official.bin", map_location="cpu", weights_only=True)
    state["model.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save(state, tmp_path / "old.bin")
    pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=str(tmp_path / "old.bin"))
    state["model.text_model.embeddings.position_ids"] = torch.arange(16).flip(0)[None]  # not what the model holds
    torch.save(state, tmp_path / "other.bin")
    with pytest.raises(UserError, match=r"unexpected 1 \(model.text_model.embeddings.position_ids\)"):
        pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=str(tmp_path / "other.bin"))


@pytest.mark.parametrize("which", ["nonsquare", "square"])
def test_tokenize_matches_official_input_ids(golden_spm, spm_io, which):
    ids = golden_spm.tokenize(SPM_SETTINGS["inputs"][which]["prompts"])
    assert torch.equal(ids, spm_io[f"{which}_input_ids"]), "tokenize() differs from the official padded ids"


@pytest.mark.parametrize("which", ["nonsquare", "square"])
def test_preprocessing_matches_official(golden_spm, spm_io, which):
    pixels = golden_spm.preprocess(spm_io[f"{which}_images"])
    torch.testing.assert_close(pixels, spm_io[f"{which}_pixel_values"], atol=1e-4, rtol=0,
                               msg=lambda m: f"preprocessed pixels differ from official ({which}): {m}")


@pytest.mark.parametrize("which", ["nonsquare", "square"])
def test_features_match_official(golden_spm, spm_io, which):
    with torch.no_grad():
        text = golden_spm.encode_text(spm_io[f"{which}_input_ids"])
        image = golden_spm.image_features(spm_io[f"{which}_pixel_values"], spm_io[f"{which}_timesteps"])
    for name, ours in [("text_features", text), ("image_features", image),
                       ("text_features_normed", text / text.norm(dim=-1, keepdim=True)),
                       ("image_features_normed", image / image.norm(dim=-1, keepdim=True))]:
        torch.testing.assert_close(ours, spm_io[f"{which}_{name}"], atol=1e-4, rtol=0,
                                   msg=lambda m: f"{name} differ from official ({which}): {m}")


@pytest.mark.parametrize("which", ["nonsquare", "square"])
def test_scores_match_official(golden_spm, spm_io, which):
    with torch.no_grad():
        scores = golden_spm.score(spm_io[f"{which}_images"], spm_io[f"{which}_input_ids"],
                                  spm_io[f"{which}_timesteps"])
    torch.testing.assert_close(scores, spm_io[f"{which}_scores"], atol=1e-4, rtol=0,
                               msg=lambda m: f"scores differ from official ({which}): {m}")


@pytest.mark.parametrize("which", ["nonsquare", "square"])
def test_image_features_match_official_across_timesteps(golden_spm, spm_io, which):
    sweep = spm_io[f"{which}_row0_timestep_sweep"]
    pixels = spm_io[f"{which}_pixel_values"][:1].expand(len(sweep), -1, -1, -1)
    with torch.no_grad():
        features = golden_spm.image_features(pixels, sweep)
    torch.testing.assert_close(features, spm_io[f"{which}_row0_image_features_sweep"], atol=1e-4, rtol=0,
                               msg=lambda m: f"image features over the t sweep differ ({which}): {m}")


def test_reused_text_features_give_the_same_scores(golden_spm, spm_io):
    images, ids, t = spm_io["nonsquare_images"], spm_io["nonsquare_input_ids"], spm_io["nonsquare_timesteps"]
    with torch.no_grad():
        direct = golden_spm.score(images, ids, t)
        reused = golden_spm.score(images, None, t, text_features=golden_spm.encode_text(ids))
    assert torch.equal(direct, reused), "score() with precomputed text features differs from score() with ids"


def test_pixels_outside_minus_one_one_are_clamped_after_the_resize(golden_spm, spm_io):
    """Decoded x0-predictions overshoot [-1, 1]; the official code resizes them first and clamps after (N9), so
    the overshoot still shapes the pixels next to it."""
    overshooting = 3 * spm_io["square_images"]
    with torch.no_grad():
        pixels = golden_spm.preprocess(overshooting)
        scores = golden_spm.score(overshooting, spm_io["square_input_ids"], spm_io["square_timesteps"])
    mean, std = golden_spm.mean.view(1, 3, 1, 1), golden_spm.std.view(1, 3, 1, 1)
    assert ((pixels * std + mean).amin() >= -1e-6) and ((pixels * std + mean).amax() <= 1 + 1e-6), "not clamped"
    assert not torch.allclose(pixels, golden_spm.preprocess(overshooting.clamp(-1, 1))), "clamped before the resize"
    assert torch.isfinite(scores).all(), "overshooting decoder outputs must be clamped after resize, not rejected"


def test_fresh_spm_scores_like_pickscore_at_every_t(tiny_spm):
    pickscore = pm.load_preference_model("pickscore", "tiny", "tiny", None)
    images = torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = tiny_spm.tokenize(["a photo of the red cat", "a dog", "a lake", "an image"])
    with torch.no_grad():
        expected = pickscore.score(images, ids, 0)
        for t in [0, 1, 500, 999]:
            torch.testing.assert_close(tiny_spm.score(images, ids, t), expected, atol=1e-6, rtol=0,
                                       msg=lambda m: f"fresh SPM differs from PickScore at t={t}: {m}")


def test_bad_checkpoints_are_user_errors(tmp_path, spm_folders):
    with pytest.raises(UserError, match="no such file"):
        pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=str(tmp_path / "missing.bin"))
    state = load_file(SPM_GOLDEN / "spm_official.safetensors")
    state["model.extra.weight"] = state.pop("model.t_embedder.mlp.0.weight")
    from safetensors.torch import save_file
    save_file(state, tmp_path / "bad.safetensors")
    names = r"missing 1 \(model.t_embedder.mlp.0.weight\).*unexpected 1 \(model.extra"
    with pytest.raises(UserError, match=names):
        pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=str(tmp_path / "bad.safetensors"))
    (tmp_path / "junk.bin").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=str(tmp_path / "junk.bin"))
    torch.save([1, 2, 3], tmp_path / "list.bin")  # loads with weights_only, but is no state dict
    with pytest.raises(UserError, match="holds a list, not a state dict of tensors"):
        pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=str(tmp_path / "list.bin"))
    with pytest.raises(UserError, match="does not fit"):  # an SPM checkpoint for a plain CLIP scorer
        pm.PickScoreModel.from_pretrained(*spm_folders, checkpoint=str(SPM_GOLDEN / "spm_official.bin"))


@pytest.mark.parametrize("images, timesteps, message", [
    (torch.zeros(2, 32, 32), 0, "must be \\(batch, 3, height, width\\)"),
    (torch.zeros(2, 4, 32, 32), 0, "must be \\(batch, 3, height, width\\)"),
    (torch.zeros(2, 3, 32, 32), 1000, "must be in \\[0, 999\\]"),
    (torch.zeros(2, 3, 32, 32), torch.tensor([-1, 5]), "must be in \\[0, 999\\]"),
    (torch.zeros(2, 3, 32, 32), torch.tensor([1, 2, 3]), "one timestep per image"),
])
def test_bad_score_inputs_are_user_errors(golden_spm, images, timesteps, message):
    ids = golden_spm.tokenize(["a red cat", "a lake"])
    with pytest.raises(UserError, match=message):
        golden_spm.score(images, ids, timesteps)


@pytest.fixture(scope="module")
def png_files(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("pngs")
    paths = [folder / "a.png", folder / "b.png"]
    Image.new("RGB", (40, 32), (200, 30, 30)).save(paths[0])
    Image.new("RGB", (32, 32), (30, 30, 200)).save(paths[1])
    return [str(p) for p in paths]


def test_cli_score_prints_one_score_per_image(capsys, tiny_spm, png_files):
    code = pm.main(["score", "--model", "tiny", "--prompt", "a red cat", "--image", png_files[0],
                    "--image", png_files[1], "--timestep", "500"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0, "score on the tiny model should exit 0"
    assert [line.split("\t")[1] for line in lines] == png_files, "expected one line per image, in order"
    assert all(math.isfinite(float(line.split("\t")[0])) for line in lines), "each line must start with a score"


@pytest.mark.parametrize("extra, message", [
    (["--timestep", "1000"], "[0, 999]"), (["--checkpoint", "nope.bin"], "no such file"),
    (["--base", "/no/such/clip"], "no such folder"), (["--image", "nope.png"], "no such file"),
    (["--device", "tpu"], "--device must be cpu or cuda[:N], got tpu"),
    (["--image", "n" * 300 + ".png"], "File name too long"), (["--checkpoint", "~nosuchuser/spm.bin"], "no such file"),
    (["--checkpoint="], "--checkpoint is empty"),  # it scored with the preset's SPM instead
    (["--image", "/dev/null"], "/dev/null is not a regular file"),  # "no such file", of a file that is there
])
def test_cli_bad_input_exits_2_with_one_line(capsys, tiny_spm, png_files, extra, message):
    code = pm.main(["score", "--model", "tiny", "--prompt", "a red cat", "--image", png_files[0], *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, "bad input should exit 2"
    assert len(err) == 1 and message in err[0], f"expected one error line about {message!r}, got {err}"


def test_cli_names_a_missing_image_before_it_loads_the_model_or_prints_a_score(capsys, png_files, monkeypatch):
    monkeypatch.setattr(pm, "load_preference_model", lambda *a, **k: pytest.fail("the model loaded before the images"))
    code = pm.main(["score", "--model", "tiny", "--prompt", "a red cat", "--image", png_files[0], "--image", "nope.png"])
    printed = capsys.readouterr()
    assert code == 2 and printed.out == "" and printed.err.strip() == "error: --image: no such file: nope.png"


def test_cli_refuses_a_timestep_out_of_range_before_it_loads_the_model(capsys, png_files, monkeypatch):
    """--timestep 1000 or -1 is refused by the flag check, not by the model after it has loaded."""
    monkeypatch.setattr(pm, "load_preference_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    for t in ("1000", "-1"):
        code = pm.main(["score", "--model", "tiny", "--prompt", "a red cat", "--image", png_files[0], "--timestep", t])
        assert code == 2 and f"--timestep must be in [0, 999], got {t}" in capsys.readouterr().err


def test_a_processor_that_does_not_fit_the_clip_and_a_quoted_home_path(tmp_path, monkeypatch):
    """A processor cropping to another size than the CLIP takes is refused when loaded (it failed at the first
    image, deep inside CLIP); a quoted '~/...' folder loads as a folder, not as a hub id."""
    base, processor, _ = pm.tiny_spm_paths()
    shutil.copytree(processor, tmp_path / "proc")
    config = json.loads((tmp_path / "proc" / "preprocessor_config.json").read_text())
    config["size"], config["crop_size"] = {"shortest_edge": 48}, {"height": 48, "width": 48}
    (tmp_path / "proc" / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="crops images to 48 px, but the preference model .* takes 32 px"):
        pm.load_preference_model("spm", base, str(tmp_path / "proc"), None)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clip").symlink_to(base)
    (tmp_path / "ckpt.safetensors").symlink_to(pm.tiny_spm_paths()[2])
    model = pm.load_preference_model("spm", "~/clip", processor, "~/ckpt.safetensors")
    assert model.image_size == 32
    (tmp_path / "processor").symlink_to(processor)
    from PIL import Image
    pickscore = pm.PickScoreOnImages("~/clip", "~/processor")  # sample.py --score's; it read the '~' as a hub id
    assert pickscore([Image.new("RGB", (40, 40))], ["a red cat"]).shape == (1,)


def test_cli_score_is_the_score_at_the_timestep_asked(capsys, png_files):
    model = pm.load_preference_model("spm", "tiny", "tiny", "tiny")
    with torch.no_grad():
        scores = {t: model.score(pm.load_image(png_files[0]), model.tokenize(["a red cat"]), t).item() for t in (0, 500)}
    assert f"{scores[0]:.4f}" != f"{scores[500]:.4f}", "pick images or t where the tiny SPM tells the steps apart"
    assert pm.main(["score", "--model", "tiny", "--prompt", "a red cat", "--image", png_files[0], "--timestep", "500"]) == 0
    assert capsys.readouterr().out.split("\t")[0] == f"{scores[500]:.4f}"


def test_a_checkpoint_tensor_of_another_shape_is_named(tmp_path, spm_folders):
    state = load_file(SPM_GOLDEN / "spm_official.safetensors")
    state["model.t_embedder.mlp.0.weight"] = state["model.t_embedder.mlp.0.weight"][:, :-1].contiguous()
    save_file(state, tmp_path / "reshaped.safetensors")
    with pytest.raises(UserError, match=r"wrong shape 1 \(model.t_embedder.mlp.0.weight\)"):
        pm.StepAwarePreferenceModel.from_pretrained(*spm_folders, checkpoint=str(tmp_path / "reshaped.safetensors"))


# ---- DDIM step, win/lose selection and SPO loss: the official math, bit for bit ----

import diffusion as D  # noqa: E402
import spo  # noqa: E402

DDIM = load_file(str(GOLDEN / "ddim.safetensors"))  # ../shared is required: CI has it, so no test skips


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("policy", ["onpolicy", "offpolicy"])
def test_ddim_log_prob_and_gradient_equal_official(dtype, policy):
    g, p = DDIM, dtype + "_"
    model_output = g[p + "model_output"].clone().requires_grad_(True)
    x0, mean, std = D.ddim_step(model_output, g["timestep"], g[p + "sample"], g["alphas_cumprod"], 50, 1.0)
    log_prob = D.ddim_log_prob(g[p + "prev_sample_" + policy], mean, std)
    (grad,) = torch.autograd.grad(log_prob.sum(), model_output)
    # Coefficients formed in float32 as the official code does: equal to the last bit, f64 included (N4).
    assert torch.equal(log_prob, g[p + "log_prob_" + policy]), "log-prob differs from the official one"
    assert torch.equal(grad, g[p + "grad_model_output_" + policy]), "d log-prob / d eps differs"
    assert torch.equal(mean, g[p + "prev_sample_mean"]) and torch.equal(x0, g[p + "pred_original_sample"])
    assert torch.equal(std, g[p + "std_dev_t"]), "sigma_t differs (t=1 must use alphas_cumprod[0], N2)"


def test_ddim_timesteps_are_leading_with_offset():
    assert D.ddim_timesteps(20).tolist() == DDIM["scheduler_timesteps"].tolist()
    assert D.ddim_timesteps(999)[0] == 999 and D.ddim_timesteps(1000, steps_offset=0)[0] == 999
    for steps in (1000, 1001):  # t = 1000 was an IndexError in the first step; 1001 steps would all be t = 1
        with pytest.raises(UserError, match=f"--steps {steps} is too many: its DDIM timesteps do not fit"):
            D.ddim_timesteps(steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_eta0_equals_diffusers(prediction_type):
    from diffusers import DDIMScheduler

    config = json.loads((GOLDEN / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    sched = DDIMScheduler.from_config({**config, "prediction_type": prediction_type})
    sched.set_timesteps(20)
    g = DDIM
    for i, t in enumerate(g["timestep"].tolist()):
        x_t, out = g["f32_sample"][i:i + 1], g["f32_model_output"][i:i + 1]
        expected = sched.step(out, t, x_t, eta=0.0).prev_sample
        _, mean, std = D.ddim_step(out, torch.tensor([t]), x_t, sched.alphas_cumprod, 50, 0.0, prediction_type)
        assert std.item() == 0
        torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6, msg=f"t={t}: DDIM step != diffusers")


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("threshold,name", [(0.3, "03"), (0.4, "04")])
def test_pick_win_lose_equals_official_compare(k, threshold, name):
    g = load_file(str(GOLDEN / "compare.safetensors"))
    p = f"k{k}_th{name}_"
    win, lose, valid = spo.pick_win_lose(g[p + "scores"], threshold)
    assert torch.equal(torch.stack([win, lose]), g[p + "indices"]), "winner/loser indices differ"
    assert torch.equal(valid, g[p + "valid"]), "valid mask differs"


@pytest.mark.parametrize("case", ["case0", "case1", "case2"])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_spo_loss_and_gradients_equal_official(case, dtype):
    g = load_file(str(GOLDEN / "spo_loss.safetensors"))
    p = f"{case}_{dtype}_"
    logp_w, logp_l = g[p + "logp_w"].clone().requires_grad_(), g[p + "logp_l"].clone().requires_grad_()
    loss, ratio_w, ratio_l = spo.spo_loss(logp_w, logp_l, g[p + "logp_ref_w"], g[p + "logp_ref_l"], 10.0, 0.1)
    loss.backward()
    assert torch.equal(loss, g[p + "loss"]), "loss differs"
    assert torch.equal(ratio_w, g[p + "ratio_w"]) and torch.equal(ratio_l, g[p + "ratio_l"]), "ratios differ"
    # Clamped sides get exactly zero gradient (golden README N5).
    assert torch.equal(logp_w.grad, g[p + "grad_logp_w"]) and torch.equal(logp_l.grad, g[p + "grad_logp_l"])


def test_a_pool_of_tied_scores_keeps_no_pair_even_at_threshold_0():
    """tanh(0) = 0 is not > 0: a pool whose candidates all score alike has no preference, so even --threshold 0
    must drop it (otherwise the winner and the loser would be the same candidate)."""
    scores = torch.tensor([[1.0, 2.0], [1.0, 0.5], [1.0, 2.0]])  # prompt 0: a three-way tie; prompt 1: a clear one
    win, lose, valid = spo.pick_win_lose(scores, 0.0)
    assert valid.tolist() == [False, True], f"a tie must never pass the threshold, got valid={valid.tolist()}"
    assert win[1].item() == 0 and lose[1].item() == 1


# ---- the SPO sampler replays the official run ----


@pytest.fixture(scope="module")
def golden_pipe():
    return D.Pipeline(str(GOLDEN / "pipeline"))


def test_candidate_pool_replays_official_run(golden_pipe):
    """Same seed, same draws in the same order: the same kept pairs, timesteps and latents (README section 9)."""
    g = load_file(str(GOLDEN / "pipeline_run.safetensors"))
    run = json.loads((GOLDEN / "settings.json").read_text())["pipeline_run"]
    cfg = spo.Config(model="tiny", steps=8, divert_start_step=2, k=3, cfg=5.0, eta=1.0, threshold=0.3, resolution=16)
    ids = g["extra_info_input_ids"]  # (k * b, L), sample-major
    judged = []

    def fake_preference(images, t):  # the deterministic stand-in the official run used
        judged.append((images, t))
        return 4000 * images.float().mean(dim=(1, 2, 3)) * (1 + t.float() / 1000) + 0.01 * ids.float().mean(dim=1) / 532

    gen = torch.Generator().manual_seed(run["torch_manual_seed_before_call"])
    pairs, scores = spo.sample_candidate_pool(golden_pipe, golden_pipe.unet, {"text": g["prompt_embeds"]},
                                              {"text": g["negative_prompt_embeds"]}, fake_preference, cfg, gen)
    assert torch.equal(pairs["t"], g["valid_timesteps"][:, 0]), "kept pairs carry other parent timesteps"
    close = dict(rtol=0, atol=1e-3)  # the golden README's tolerance for other library versions
    torch.testing.assert_close(pairs["x_t"], g["valid_current_latents"][:, 0], **close, msg="parent x_t differs")
    assert torch.equal(pairs["x_t_lose"], pairs["x_t"]), "SD1.5 pairs share their parent"
    torch.testing.assert_close(pairs["win"], g["valid_next_latents"][:, 0], **close, msg="winner child differs")
    torch.testing.assert_close(pairs["lose"], g["valid_next_latents"][:, 1], **close, msg="loser child differs")
    torch.testing.assert_close(pairs["text"], g["valid_prompt_embeds"][:, 0], msg="pair prompt differs")
    torch.testing.assert_close(scores, g["preference_score_logs"], rtol=1e-5, atol=1e-2)
    assert len(judged) == 6, f"expected one judgement per pool (6), got {len(judged)}"
    for j, (images, t) in enumerate(judged):  # the images themselves, not only the mean the stand-in scores
        torch.testing.assert_close(images, g[f"pref_call_{j}_images"], **close, msg=f"pool {j}: other images judged")
        assert torch.equal(t.cpu(), g[f"pref_call_{j}_timesteps"]), f"pool {j}: judged at other timesteps"


def test_each_candidate_is_judged_against_its_own_prompt(golden_pipe):
    """make_score_fn lines the prompts' text features up with the pool's images as the official run does: the judge
    of every pool sees exactly the golden extra_info_input_ids, row for row (sample-major, prompt p of candidate j
    at j * b + p). A judge here whose text features are the prompt's token ids shows which prompt each row got."""
    g = load_file(str(GOLDEN / "pipeline_run.safetensors"))
    run = json.loads((GOLDEN / "settings.json").read_text())["pipeline_run"]
    cfg = spo.Config(model="tiny", steps=8, divert_start_step=2, k=3, cfg=5.0, eta=1.0, threshold=0.3, resolution=16)
    seen = []

    class TokenIdsAsText:
        def tokenize(self, prompts):
            return golden_pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids

        def encode_text(self, ids):
            return ids.float()

        def judge(self, images, t, text):
            seen.append(text.long())
            seen_t.append(t.tolist())
            return images.float().mean(dim=(1, 2, 3))

    seen_t = []
    score_fn = spo.make_score_fn(TokenIdsAsText(), run["prompts"], cfg.k)
    cond, uncond = golden_pipe.encode_prompts(run["prompts"], (16, 16)), golden_pipe.encode_negative(2, (16, 16))
    spo.sample_candidate_pool(golden_pipe, golden_pipe.unet, cond, uncond, score_fn, cfg, torch.Generator())
    assert len(seen) == 6, f"expected one judgement per pool (6), got {len(seen)}"
    for ids in seen:
        assert torch.equal(ids, g["extra_info_input_ids"]), "a candidate was judged against another prompt"
    # Step awareness: each pool is judged at its members' own timestep (8 steps of 125 from t = 876; pools from
    # step 2), the final images at t = 0, every candidate of the pool alike.
    assert seen_t == [[t] * (cfg.k * 2) for t in (501, 376, 251, 126, 1, 0)], f"the judge saw timesteps {seen_t}"


def test_our_ddim_sampler_equals_diffusers_pipeline(golden_pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(str(GOLDEN / "pipeline"), safety_checker=None)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "the dog on the lake"]
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond, uncond = golden_pipe.encode_prompts(prompts, (16, 16)), golden_pipe.encode_negative(2, (16, 16))
    for cfg_scale in (1.0, 5.0):  # without and with classifier-free guidance
        expected = ref(prompts, num_inference_steps=6, guidance_scale=cfg_scale, eta=0.0, latents=latents,
                       height=16, width=16, output_type="pt").images * 2 - 1
        ours = golden_pipe.decode(D.ddim_sample(golden_pipe, cond, uncond, latents, 6, cfg_scale))
        assert (ours.clamp(-1, 1) - expected).abs().max() < 1e-4, f"images differ from diffusers at cfg {cfg_scale}"


# ---- LoRA ----

LORA = GOLDEN / "lora"


@pytest.fixture()
def lora_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(LORA / "unet_base")).eval()
    return unet, load_file(str(LORA / "lora_io.safetensors"))


def unet_out(unet, io):
    with torch.no_grad():
        return unet(io["sample"], io["timestep"], io["encoder_hidden_states"]).sample


def test_lora_at_init_and_lora_off_are_the_base_model(lora_unet):
    unet, io = lora_unet
    base = unet_out(unet, io)
    D.inject_lora(unet, 4, 4)
    assert torch.equal(unet_out(unet, io), base), "a fresh LoRA (zero up) must not change the UNet"
    for layer in D.lora_layers(unet):
        torch.nn.init.normal_(layer.lora.up.weight)
    assert not torch.allclose(unet_out(unet, io), base)
    with D.lora_disabled(unet):
        assert torch.equal(unet_out(unet, io), base), "LoRA switched off must be exactly the base UNet"


def test_golden_lora_file_loads_with_golden_output(lora_unet):
    unet, io = lora_unet
    D.inject_lora(unet, 4, 4)
    D.load_lora(unet, LORA / "pytorch_lora_weights.safetensors")
    torch.testing.assert_close(unet_out(unet, io), io["out_lora"], rtol=0, atol=1e-4)
    expected_keys = json.loads((LORA / "lora_keys.json").read_text())
    ours = D.lora_state_dict(unet)
    assert sorted(ours) == sorted(load_file(str(LORA / "pytorch_lora_weights.safetensors"))), (
        f"our LoRA keys differ from the official file's ({len(expected_keys)} entries in lora_keys.json)")


@pytest.mark.parametrize("alpha", [2.0, 4.0, 8.0])
def test_our_lora_file_loads_in_diffusers_with_the_same_output(lora_unet, tmp_path, alpha):
    """alpha = rank gives the official layout; another alpha, below the rank or above it, travels in diffusers'
    metadata header."""
    from diffusers import StableDiffusionPipeline

    unet, io = lora_unet
    D.inject_lora(unet, 4, alpha)
    for layer in D.lora_layers(unet):
        torch.nn.init.normal_(layer.lora.up.weight, std=0.05)
    D.save_lora(unet, tmp_path / "pytorch_lora_weights.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(str(GOLDEN / "pipeline"), safety_checker=None)
    base = unet_out(pipe.unet, io)
    pipe.load_lora_weights(str(tmp_path))
    theirs = unet_out(pipe.unet, io)
    assert not torch.allclose(theirs, base), "diffusers attached nothing (wrong key prefix?)"
    torch.testing.assert_close(theirs, unet_out(unet, io), rtol=0, atol=1e-4)


def test_lora_file_with_another_alpha_is_refused(lora_unet, tmp_path):
    """--init-lora of a file trained with alpha 8 into a run with alpha 4 would silently halve it."""
    unet, _ = lora_unet
    D.inject_lora(unet, 4, 8.0)
    D.save_lora(unet, tmp_path / "alpha8.safetensors")
    D.load_lora(unet, tmp_path / "alpha8.safetensors")  # the same alpha loads
    for layer in D.lora_layers(unet):
        layer.alpha, layer.scale = 4.0, 4.0 / 4
    with pytest.raises(UserError, match="alpha 8"):
        D.load_lora(unet, tmp_path / "alpha8.safetensors")


def test_lora_alpha_is_kept_as_given_for_any_rank(lora_unet, tmp_path):
    """alpha = (alpha / rank) * rank does not hold in floats for rank 7, alpha 29: the file's alpha was
    29.000000000000004, and --init-lora refused a PEFT file that declared 29 for a run with --lora-alpha 29."""
    from safetensors import safe_open

    unet, _ = lora_unet
    D.inject_lora(unet, 7, 29.0)
    D.save_lora(unet, tmp_path / "ours.safetensors")
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 29
    D.load_lora(unet, tmp_path / "ours.safetensors")
    (tmp_path / "peft").mkdir()
    peft = {"base_model.model." + k.removeprefix("unet.").replace("lora.down", "lora_A").replace("lora.up", "lora_B"): v
            for k, v in D.lora_state_dict(unet).items()}
    save_file(peft, tmp_path / "peft" / "adapter_model.safetensors")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 7, "lora_alpha": 29}))
    D.load_lora(unet, tmp_path / "peft" / "adapter_model.safetensors")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 7, "lora_alpha": 29, "use_rslora": True}))
    with pytest.raises(UserError, match="rsLoRA"):  # scaled by alpha / sqrt(r), it would act at another strength
        D.load_lora(unet, tmp_path / "peft" / "adapter_model.safetensors")


def test_resolve_lora_finds_files_folders_and_hub_names(tiny_run, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(D, "resolve_file", lambda spec, flag: asked.append(spec) or spec)  # the hub download
    assert D.resolve_lora(str(tiny_run), "--lora") == tiny_run / "pytorch_lora_weights.safetensors"
    for spec in ("owner/repo", "owner/repo/", "owner/repo/sub/file.safetensors"):
        D.resolve_lora(spec, "--lora")
    assert asked == ["owner/repo/pytorch_lora_weights.safetensors"] * 2 + ["owner/repo/sub/file.safetensors"]
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="--lora: no such file or folder: .*runs/sd15x"):  # a typo, not a hub id
        D.resolve_lora(str(tmp_path / "runs" / "sd15x"), "--lora")


def test_lora_with_unknown_or_misshaped_keys_is_refused(lora_unet):
    unet, _ = lora_unet
    D.inject_lora(unet, 4, 4)
    good = load_file(str(LORA / "pytorch_lora_weights.safetensors"))
    no_alpha = {"alpha": None, "alpha_pattern": {}}  # what read_lora_file says of a file that declares none
    with pytest.raises(UserError, match="match no module"):
        D.lora_modules({**good, "unet.nowhere.lora.down.weight": torch.zeros(4, 32)}, no_alpha, unet)
    key = next(iter(good))
    with pytest.raises(UserError, match="shape"):
        D.lora_modules({**good, key: torch.zeros(8, 3)}, no_alpha, unet)


def test_lora_disabled_switches_the_lora_back_on_after_an_exception(lora_unet):
    unet, io = lora_unet
    D.inject_lora(unet, 4, 4)
    with pytest.raises(KeyError), D.lora_disabled(unet):
        raise KeyError("a failure inside the reference forward")
    assert all(layer.enabled for layer in D.lora_layers(unet)), "an exception left the LoRA switched off"


# ---- SPO training step ----


def test_a_fresh_lora_starts_as_peft_gaussian_init():
    """down ~ N(0, 1/r) and up = 0, as PEFT's init_lora_weights="gaussian" that the official LoraConfig uses: the
    model starts at the base, and the down weights set the size of the first updates."""
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(1024, 1024))
    theirs = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                                target_modules=["to_q"]), copy.deepcopy(model)).to_q
    ours = D.LoRALinear(model.to_q, 8, 8)
    assert torch.count_nonzero(ours.lora.up.weight) == 0
    std, peft_std = ours.lora.down.weight.std().item(), theirs.lora_A["default"].weight.std().item()
    assert std == pytest.approx(peft_std, rel=0.05) and std == pytest.approx(1 / 8, rel=0.05), (std, peft_std)


@pytest.mark.parametrize("eta, prediction_type", [(1.0, "epsilon"), (0.5, "epsilon"), (1.0, "v_prediction")])
def test_shared_forward_equals_four_forward_formulation(golden_pipe, eta, prediction_type):
    """Where winner and loser share x_t one policy and one reference forward, else one per parent, give the loss
    and gradients of the official four forwards (pair 1 has a loser parent of its own, as SDXL's inner steps), with
    the run's --eta and the checkpoint's prediction type (each was once dropped with every test passing)."""
    pipe = golden_pipe
    unet = pipe.unet
    params = D.inject_lora(unet, 4, 4)
    pipe.prediction_type = prediction_type
    try:
        torch.manual_seed(0)
        for layer in D.lora_layers(unet):
            torch.nn.init.normal_(layer.lora.up.weight, std=0.02)
        cfg = spo.Config(model="tiny", steps=8, cfg=5.0, eta=eta)
        n = 3
        x_t = torch.randn(n, 4, 8, 8)
        x_t_lose = x_t.clone()
        x_t_lose[1] += 0.1 * torch.randn_like(x_t[1])
        pairs = dict(x_t=x_t, x_t_lose=x_t_lose, t=torch.tensor([626, 251, 1]), text=torch.randn(n, 16, 32),
                     win=x_t * 0.9 + 0.1 * torch.randn_like(x_t), lose=x_t_lose * 0.9 + 0.1 * torch.randn_like(x_t))
        uncond = {"text": torch.randn(1, 16, 32)}
        loss, _, _ = spo.spo_loss(*spo.pair_log_probs(pipe, unet, unet, pairs, uncond, cfg), 10.0, 0.1)
        ours = torch.autograd.grad(loss, params)

        def log_prob(side, reference):  # the official way: a separate forward for every term
            parent, child = pairs["x_t" if side == "win" else "x_t_lose"], pairs[side]
            with contextlib.ExitStack() as stack:
                if reference:
                    stack.enter_context(torch.no_grad())
                    stack.enter_context(D.lora_disabled(unet))
                eps = D.predict_noise(unet, parent, pairs["t"], {"text": pairs["text"]}, D.take(uncond, [0] * n), cfg.cfg)
                _, mean, std = D.ddim_step(eps, pairs["t"], parent, pipe.alphas_cumprod, 125, eta, prediction_type)
                return D.ddim_log_prob(child, mean, std)

        terms = [log_prob(side, ref) for ref in (False, True) for side in ("win", "lose")]
        loss4, _, _ = spo.spo_loss(*terms, 10.0, 0.1)
        theirs = torch.autograd.grad(loss4, params)
        torch.testing.assert_close(loss, loss4, rtol=0, atol=1e-7)
        assert any(g.abs().sum() > 0 for g in ours), "the test pairs must produce a gradient"
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())  # float32 summation order
    finally:  # the module-scoped pipeline goes back to a plain UNet, predicting noise
        pipe.prediction_type = "epsilon"
        for name, module in list(unet.named_modules()):
            if isinstance(module, D.LoRALinear):
                parent, child = name.rsplit(".", 1)
                setattr(unet.get_submodule(parent), child, module.base)


def two_pairs_on_a_moved_lora(cfg, up_std):
    """The tiny models of `cfg`, and two training pairs (seeded), with the LoRA moved off its zero init so that
    the policy/reference ratios are not 1."""
    m = spo.setup_models(cfg, scorer=RuleScorer())
    gen = torch.Generator().manual_seed(0)
    pairs = dict(x_t=torch.randn(2, 4, 8, 8, generator=gen), t=torch.tensor([901, 501]),
                 text=m.pipe.encode_prompts(["a red cat", "the dog"], (16, 16))["text"])
    pairs.update(x_t_lose=pairs["x_t"], win=torch.randn(2, 4, 8, 8, generator=gen),
                 lose=torch.randn(2, 4, 8, 8, generator=gen))
    for layer in D.lora_layers(m.pipe.unet):
        torch.nn.init.normal_(layer.lora.up.weight, std=up_std, generator=gen)
    return m, pairs


def test_a_micro_batchs_loss_takes_beta_and_eps_from_the_flags():
    """--beta and --eps reach the loss of a training micro-batch (either could be dropped with every test passing:
    they ran at the defaults, and at a fresh LoRA both ratios are 1, where the clamp never acts)."""
    cfg = spo.parse_args(FAST + ["--beta", "3", "--eps", "0.001", "--grad-accum", "1"])
    m, pairs = two_pairs_on_a_moved_lora(cfg, 0.05)
    uncond = m.pipe.encode_negative(1, (16, 16))
    with torch.no_grad():
        logps = spo.pair_log_probs(m.pipe, m.unet, m.unet, pairs, uncond, cfg)
        loss = {(beta, eps): spo.spo_loss(*logps, beta, eps)[0].item() for beta, eps in [(3, 0.001), (10, 0.001),
                                                                                         (3, 0.1)]}
    assert len(set(loss.values())) == 3, f"beta and the clamp must both move this loss: {loss}"
    record = spo.train_micro_batch(m.pipe, m.unet, m.unet, pairs, uncond, m.lora_params, m.optimizer, m.scaler,
                                   m.autocast, cfg, 1, [])
    assert record["loss"] == pytest.approx(loss[(3, 0.001)], rel=1e-5), (record["loss"], loss)


def test_an_fp16_grad_scaler_changes_neither_the_reported_norm_nor_the_update():
    """The GradScaler's loss scale is taken out before clipping and reporting: the same micro-batch with a scale
    of 2^16 and without one gives the same gradient norm and the same updated LoRA."""
    cfg = spo.parse_args(FAST)
    results = []
    for enabled in (False, True):
        m, pairs = two_pairs_on_a_moved_lora(cfg, 0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=enabled)
        record = spo.train_micro_batch(m.pipe, m.unet, m.unet, pairs, m.pipe.encode_negative(1, (16, 16)),
                                       m.lora_params, m.optimizer, scaler, m.autocast, cfg, 1, [])
        results.append((record["grad_norm"], [p.detach().clone() for p in m.lora_params]))
    (norm, params), (scaled_norm, scaled_params) = results
    assert norm > 0 and scaled_norm == pytest.approx(norm, rel=1e-4), f"norms {norm} and {scaled_norm} (scaled)"
    torch.testing.assert_close(scaled_params, params, rtol=1e-4, atol=1e-6)


# ---- spo.py end to end on the tiny model ----

# Root passes every permission check: a run meant to meet one drops root's override rights first (setpriv).
AS_A_USER = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--inh-caps=-all"] * (
    os.geteuid() == 0)
# A test preset that runs in seconds: 6 steps, pools of 3 from step 2, 8x8 latents, 2 epochs of 2 batches.
FAST = ["--model", "tiny", "--steps", "6", "--divert-start-step", "2", "--k", "3", "--resolution", "16",
        "--sample-batch-size", "4", "--epochs", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted reference run, shared by the tests that need it."""
    out = tmp_path_factory.mktemp("run") / "ref"
    spo.main(FAST + ["--out", str(out)])
    return out


def test_tiny_run_writes_a_diffusers_loadable_lora_and_its_records(tiny_run):
    from diffusers import StableDiffusionPipeline

    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert all(math.isfinite(m["loss"]) and m["pairs"] > 0 for m in metrics)
    assert json.loads((tiny_run / "config.json").read_text())["k"] == 3, "config.json must record the run's settings"
    assert sorted(p.name for p in (tiny_run / "samples").iterdir()) == ["epoch-0.png", "epoch-1.png"]
    # one checkpoint per epoch end, named by where the run goes on: (epoch, batch, pair)
    assert [p.name for p in spo.checkpoint_dirs(tiny_run)] == ["epoch-0001_batch-000000_pair-00000",
                                                               "epoch-0002_batch-000000_pair-00000"]
    lora = load_file(str(tiny_run / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if ".up." in k), "training must have moved the LoRA"
    pipe = StableDiffusionPipeline.from_pretrained(str(D.tiny_pipeline_path()), safety_checker=None)
    io = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([501]), encoder_hidden_states=torch.randn(1, 16, 32))
    base = unet_out(pipe.unet, io)
    pipe.load_lora_weights(str(tiny_run))
    assert not torch.allclose(unet_out(pipe.unet, io), base), "diffusers must attach the trained LoRA"


def test_tiny_preset_spm_is_step_aware():
    """The tiny preset loads its SPM through a checkpoint, like sd15, and its scores depend on t."""
    spm = pm.load_preference_model("spm", "tiny", "tiny", "tiny")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = spm.tokenize(["a red cat", "a red cat"])
    scores = torch.stack([spm.score(images, ids, t) for t in (0, 500, 999)])
    assert (scores[1:] - scores[0]).abs().min() > 1e-3, "tiny SPM scores must change with the timestep"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_run_on_cpu(precision, tmp_path, capsys):
    """Autocast with half-precision frozen weights (and the GradScaler for fp16) and a half-precision judge on
    the CPU: finite losses, and a note that this is slow there (fp16 ran 8 times as long as fp32)."""
    out = tmp_path / precision
    spo.main(FAST[:-1] + ["1", "--precision", precision, "--preference-precision", precision, "--out", str(out)])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics)
    assert f"note: --precision {precision} on a CPU is several times slower" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_timestep_embedding_stays_fp32_in_a_half_precision_spm(dtype):
    """--preference-precision bf16/fp16 halves the SPM's weights but not its timestep embedding, which runs in
    fp32 even under autocast: in bf16, t = 951 and 952 would share one sinusoid input."""
    half, full = (pm.load_preference_model("spm", "tiny", "tiny", "tiny", dtype=d) for d in (dtype, torch.float32))
    assert half.model.vision_model.encoder.layers[0].adaLN_modulation[1].weight.dtype == dtype
    assert all(p.dtype == torch.float32 for p in half.model.t_embedder.parameters())
    assert half.model.logit_scale.dtype == torch.float32 and torch.equal(half.model.logit_scale, full.model.logit_scale)
    t = torch.tensor([951, 952])
    with torch.autocast("cpu", dtype):
        embedding = half.model.t_embedder(t)
    assert embedding.dtype == torch.float32 and torch.equal(embedding, full.model.t_embedder(t))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = full.tokenize(["a red cat"] * 4)
    torch.testing.assert_close(half.score(images, ids, 951), full.score(images, ids, 951), atol=0.15, rtol=0)


def test_plain_pickscore_ablation_runs(tmp_path):
    out = tmp_path / "pickscore"
    spo.main(FAST[:-1] + ["1", "--preference", "pickscore", "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["preference_checkpoint"] is None
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_resume_after_one_epoch_ends_bitwise_equal(tiny_run, tmp_path):
    out = tmp_path / "resumed"
    spo.main(FAST[:-1] + ["1", "--out", str(out)])  # stopped after epoch 0
    spo.main(FAST + ["--out", str(out), "--resume"])
    for name in ("pytorch_lora_weights.safetensors",):
        a, b = load_file(str(tiny_run / name)), load_file(str(out / name))
        assert all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA differs from the uninterrupted run"
    assert (out / "metrics.jsonl").read_text() == (tiny_run / "metrics.jsonl").read_text()


def test_a_run_folder_in_use_is_refused_to_a_second_run(tiny_run, tmp_path, capsys):
    """A --resume or --overwrite while the first run still goes (its lock held here) stops before it reads, writes
    or deletes anything there: two runs wrote interleaved metrics into one folder, and --overwrite deleted a live run."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with D.run_folder_lock(out):
        for flags in (["--resume"], ["--overwrite"]):
            with pytest.raises(SystemExit) as exit_info:
                spo.main(FAST + ["--out", str(out)] + flags)
            err = capsys.readouterr().err.strip()
            assert exit_info.value.code == 2 and err == f"error: --out {out} is in use by another run that is still going", err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, "the running run's files must stay"
    spo.main(FAST + ["--out", str(out), "--overwrite", "--epochs", "1"])  # once the first has ended, it may
    lines = lambda run: (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines(out)) < len(lines(tiny_run)), "--overwrite should have replaced the old run (2 epochs by 1)"


def test_resume_of_a_run_without_a_checkpoint_says_it_starts_over(tmp_path, capsys):
    out = tmp_path / "run"
    spo.main(FAST + ["--epochs", "1", "--out", str(out)])
    shutil.rmtree(out / "checkpoints")  # as a run stopped before its first checkpoint (or one whose were deleted)
    capsys.readouterr()
    spo.main(FAST + ["--epochs", "1", "--out", str(out), "--resume"])
    assert f"--resume: {out} holds no checkpoint yet: the run starts from the beginning" in capsys.readouterr().out


def test_resume_with_an_unreadable_checkpoints_folder_is_refused(tiny_run, tmp_path):
    """glob reads a folder we may not read as empty: --resume started over and dropped the metrics logged."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    metrics, checkpoints = (out / "metrics.jsonl").read_text(), spo.checkpoint_dirs(out)
    (out / "checkpoints").chmod(0)
    try:
        result = subprocess.run(AS_A_USER + [sys.executable, "spo.py"] + FAST + [
            "--out", str(out), "--resume"], capture_output=True, text=True, cwd=Path(__file__).parent)
    finally:
        (out / "checkpoints").chmod(0o700)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: permission denied: {out / 'checkpoints'}", result.stderr
    assert (out / "metrics.jsonl").read_text() == metrics and spo.checkpoint_dirs(out) == checkpoints


def test_resume_redoes_lost_work_and_truncates_metrics(tiny_run, tmp_path):
    """A run killed during epoch 1, after some of its metrics were written: resume from epoch 0's checkpoint."""
    out = tmp_path / "killed"
    shutil.copytree(tiny_run, out)
    shutil.rmtree(spo.checkpoint_dirs(out)[-1])
    (out / "pytorch_lora_weights.safetensors").unlink()
    spo.main(FAST + ["--out", str(out), "--resume"])
    a, b = load_file(str(tiny_run / "pytorch_lora_weights.safetensors")), load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "metrics.jsonl").read_text() == (tiny_run / "metrics.jsonl").read_text(), "metrics not truncated"


class RuleScorer:
    """A stand-in preference model with a learnable rule: brighter images win. Same interface as the SPM."""

    def __init__(self, sign=1.0):
        self.sign = sign

    def tokenize(self, prompts):
        return torch.zeros(len(prompts), 1, dtype=torch.long)

    def encode_text(self, input_ids):
        return torch.zeros(len(input_ids), 1)

    def score(self, images, input_ids, timesteps, text_features=None):
        return self.judge(images, timesteps, text_features)

    def judge(self, images, timesteps, text_features):
        return self.sign * 1000 * images.float().mean(dim=(1, 2, 3))


def test_spo_learns_the_preference(tmp_path):
    """A short SPO run must move final samples towards what the judge prefers.

    Overrides, and why: the random tiny SPM has no preference to learn, so a rule-based scorer (brightness)
    judges instead; the paper's lr 6e-5 barely moves a LoRA in 12 steps, so lr 3e-2 and 3 epochs; threshold
    0.1 suits the rule's score scale. A sign error or swapped winner/loser makes images darker instead."""
    cfg = spo.parse_args(["--model", "tiny", "--steps", "8", "--divert-start-step", "2", "--k", "3", "--resolution",
                          "16", "--sample-batch-size", "4", "--epochs", "3", "--lr", "3e-2", "--threshold", "0.1",
                          "--out", str(tmp_path / "learn")])
    pipe = spo.train(cfg, scorer=RuleScorer())

    def mean_final_score():
        prompts = spo.TINY_PROMPTS
        cond, uncond = pipe.encode_prompts(prompts, (16, 16)), pipe.encode_negative(len(prompts), (16, 16))
        gen = torch.Generator().manual_seed(123)
        z = torch.randn((len(prompts), 4, 8, 8), generator=gen)
        latents = D.ddim_sample(pipe, cond, uncond, z, cfg.steps, cfg.cfg, eta=1.0, generator=gen)
        return RuleScorer().score(pipe.decode(latents), None, None).mean().item()

    trained = mean_final_score()
    with D.lora_disabled(pipe.unet):
        base = mean_final_score()
    print(f"mean preference score of final samples: base {base:.3f}, after SPO {trained:.3f}")
    assert trained > base + 1.0, f"SPO did not raise the preferred score: base {base:.3f}, trained {trained:.3f}"


BAD_RUNS = [  # (flags, a piece of the one-line message)
    (["--k", "1"], "--k must be at least 2"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1)"),
    (["--eps", "0"], "--eps must be in (0, 1)"),
    (["--threshold", "1"], "--threshold must be in [0, 1)"),
    (["--threshold", "-0.1"], "--threshold must be in [0, 1)"),
    (["--eps", "1"], "--eps must be in (0, 1)"),
    (["--divert-start-step", "-1"], "--divert-start-step must be in [0, --steps)"),
    (["--beta", "-1"], "--beta must be > 0"),
    (["--divert-start-step", "6"], "--divert-start-step must be in [0, --steps)"),
    (["--no-pool-at-last-step", "--divert-start-step", "5"], "the last step cannot start a pool"),
    (["--num-inner-step", "-1"], "--num-inner-step must be >= 0"),
    (["--vae", "/nonexistent/vae"], "--vae: no such file or folder: /nonexistent/vae"),
    (["--resolution", "30"], "multiple of 8"),
    (["--sample-batch-size", "0"], "--sample-batch-size must be >= 1"),
    (["--eta", "0"], "--eta must be in (0, 1]"),
    (["--eta", "1.2"], "--eta must be in (0, 1]"),
    (["--steps", "1000"], "--steps must be < 1000"),
    (["--device", "cuda:x"], "--device must be cpu or cuda[:N], got cuda:x"),
    (["--prompts", "/nonexistent/prompts.json"], "no such file"),
    (["--init-lora", "/nonexistent/lora.safetensors"], "no such file"),
    (["--resume"], "no run to resume"),
    (["--pretrained", "/nonexistent/sd"], "--pretrained: no such file or folder: /nonexistent/sd"),
    (["--preference-checkpoint", "/nonexistent/spm.bin"], "--preference-checkpoint: no such file"),
    (["--preference-model", "/nonexistent/clip"], "--preference-model: no such file or folder"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--save-every", "-1"], "--save-every and --keep must be >= 0"),
    (["--keep", "-1"], "--save-every and --keep must be >= 0"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be >= 1"),
    (["--precision", "fp64"], "invalid choice: 'fp64'"),
    (["--k", "four"], "invalid int value: 'four'"),
    (["--kk", "3"], "unrecognized arguments: --kk 3"),
    (["--lr", "inf"], "argument --lr: must be a finite number, got 'inf'"),  # it trained a NaN LoRA to exit 0
    (["--cfg", "nan"], "argument --cfg: must be a finite number, got 'nan'"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--seed", "-1"], "--seed and --validation-seeds must be in [0, 4294967295]"),
    (["--validation-seeds", "0", str(2**64)], "--seed and --validation-seeds must be in [0, 4294967295]"),
    (["--out", ""], "--out is empty: give it a value or leave the flag out"),  # with --overwrite it once emptied the current directory
    (["--out", "/proc/spo-run"], "cannot be written: /proc is not a writable folder"),  # root passed os.access
    (["--out", "/proc"], "--out /proc cannot be written"),  # an existing folder that only a real write refuses
    # pathlib raises on these where os.path says "not there": they once ended in a traceback
    (["--init-lora", "n" * 300], "file name too long: nnnn"),
    (["--prompts", "n" * 300 + ".json"], "nnnnnnnn.json: File name too long"),
    (["--out", "n" * 250], "a name in it is too long"),  # with atomic_write's temporary name, over 255 bytes
    (["--init-lora", "~nosuchuser/lora.safetensors"], "--init-lora: no such file or folder: ~nosuchuser/lora"),
    (["--init-lora="], "--init-lora is empty"),  # `--init-lora=$LORA` with the variable unset: it trained from zero
    (["--resolution", "800000"], "--resolution must be at most 16384 pixels"),  # 10 TB asked of the allocator
    (["--resolution", str(10**30)], "--resolution must be at most 16384 pixels"),  # torch cannot take the size
]


def test_switches_are_flags_even_when_their_default_depends_on_the_device():
    parse = lambda *flags: spo.parse_args(["--model", "tiny", *flags])
    assert parse("--compile").compile is True and parse("--no-compile").compile is False
    assert parse().compile is False, "on a CPU machine compile defaults to off"
    assert parse("--compile-mode", "reduce-overhead").compile_mode == "reduce-overhead"  # CUDA graphs, to measure
    assert parse("--gradient-checkpointing").gradient_checkpointing is True
    with pytest.raises(UserError, match="unrecognized arguments: false"):
        parse("--compile", "false")  # it once took a string, and "false" was truthy


@pytest.mark.parametrize("flags,message", BAD_RUNS, ids=[f[0][0] for f in BAD_RUNS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        spo.main(FAST + ["--out", str(out)] + flags)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert message in err and len(err.splitlines()) == 1, f"expected one line with {message!r}, got {err!r}"
    assert not out.exists(), "a refused run must write nothing"


def test_output_checks_under_torchrun_write_for_real_and_overlook_each_others_probe(tmp_path, monkeypatch):
    """Every torchrun rank checks --out at once: one rank's write probe must not make the folder look taken to
    another, and an existing folder must still be probed with a real write (root passes os.access in /proc)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "--out /proc cannot be written" in D.output_problem("/proc", "--out", is_file=False)
    (tmp_path / (D.WRITE_PROBE + "rank1")).write_text("")  # another rank's probe, caught mid-check
    assert D.output_problem(tmp_path, "--out", is_file=False) is None
    assert not D.holds_files(tmp_path)
    (tmp_path / "keep.txt").write_text("")
    assert D.holds_files(tmp_path)


def test_bad_prompt_files_and_existing_runs_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    for flags, message in [(["--prompts", str(empty), "--out", str(tmp_path / "a")], "no prompts"),
                           (["--out", str(existing)], "already holds files"),
                           (["--model", "sd15", "--out", str(tmp_path / "b")], "needs --prompts")]:
        with pytest.raises(SystemExit) as exit_info:
            spo.main(FAST[2:] + flags if "sd15" in flags else FAST + flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "precious"


def test_a_run_that_keeps_no_pair_says_so(tmp_path, capsys):
    spo.main(FAST + ["--epochs", "1", "--threshold", "0.999", "--out", str(tmp_path / "run")])
    assert "no pair passed --threshold 0.999 in this run, so the LoRA was never updated" in capsys.readouterr().err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_overwrite_replaces_only_a_run_folder(tiny_run, tmp_path, capsys, monkeypatch):
    """--overwrite deletes --out: never a folder that is not a spo.py run (a model or an SPM run has a config.json
    too), nor a link to one, nor the folder the command runs in."""
    existing, model = tmp_path / "existing", tmp_path / "model"
    for folder, name, text in ((existing, "keep.txt", "precious"), (model, "config.json", '{"architectures": []}')):
        folder.mkdir()
        (folder / name).write_text(text)
    run, link, with_prompts = tmp_path / "run", tmp_path / "link", tmp_path / "with_prompts"
    shutil.copytree(tiny_run, run)
    shutil.copytree(tiny_run, with_prompts)
    (with_prompts / "prompts.txt").write_text("a cat\na dog\n")  # it deleted the prompts it was about to train on
    link.symlink_to(run)
    monkeypatch.chdir(run)
    for out in (existing, model, link, run, Path("."), with_prompts):
        with pytest.raises(SystemExit) as exit_info:
            spo.main(FAST + ["--out", str(out), "--overwrite", "--prompts", str(with_prompts / "prompts.txt")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "is not a spo.py run folder (or is a link, or holds the current" in err
    assert (existing / "keep.txt").read_text() == "precious" and (model / "config.json").is_file()
    assert (run / "config.json").is_file() and (with_prompts / "prompts.txt").is_file()


def test_a_fresh_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys):
    """A checkpoint whose scheduler only fails once sampling starts: the run folder goes again, so the same command
    can run after the fix (it used to stay and be refused as 'already holds files')."""
    folder = tmp_path / "pipe"
    shutil.copytree(D.tiny_pipeline_path("tiny"), folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), prediction_type="bogus")))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for out, message in ((tmp_path / "run", "unsupported prediction_type 'bogus'"), (dangling, "is a broken link")):
        with pytest.raises(SystemExit) as exit_info:
            spo.main(FAST + ["--pretrained", str(folder), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err.splitlines()[-1], err
    assert not (tmp_path / "run").exists() and dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_fresh_run_that_crashes_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    """Out of memory at the first batch (too large a --k or --resolution for the machine): the error keeps its
    traceback, and the run folder goes, so the same command with a smaller setting is not refused."""
    def out_of_memory(*args, **kwargs):
        raise MemoryError("can't allocate memory")
    monkeypatch.setattr(spo, "sample_candidate_pool", out_of_memory)
    with pytest.raises(MemoryError):
        spo.main(FAST + ["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_model_cache_that_cannot_be_made_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SPO_CACHE", str(tmp_path / "file"))  # a file where the cache folder belongs
    with pytest.raises(SystemExit) as exit_info:
        spo.main(FAST + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"error: the model cache {tmp_path / 'file'} (SPO_CACHE) " \
        "cannot be written: File exists", err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("SPO_CACHE", "")  # set but empty: the default, not the current folder
    assert D.cache_dir() == Path.home() / ".cache" / "spo"


def test_vae_none_keeps_the_checkpoints_own_vae():
    """--vae none: the pipeline folder's own VAE (for SDXL, in place of the preset's fp16-fix one); an empty --vae,
    which once meant this by accident, is refused as a missing value."""
    own, kept = D.Pipeline("tiny").vae.state_dict(), D.Pipeline("tiny", vae="none").vae.state_dict()
    assert own.keys() == kept.keys() and all(torch.equal(own[k], kept[k]) for k in own)
    assert spo.parse_args(["--model", "tiny", "--vae", "none"]).vae == "none"


def test_empty_text_is_text_and_not_a_missing_value(tmp_path):
    args = sample.parse_args(["--model", "tiny", "--prompt", "", "--negative-prompt=", "--out", str(tmp_path / "o")])
    assert args.prompt == [""] and args.negative_prompt == ""


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 photo\n", "not UTF-8 text (byte 3)"),
    (b'{"caption": "a cat"}', "JSON but not a list"),  # a dict's keys once became the prompts
    (b'[{"caption": "a cat"}, {"caption": 1}]', "entry 1 is not a string"),
    (b'["a cat", "a dog"', "invalid JSON"),
    (b"[" * 100000 + b"]" * 100000, "invalid JSON"),  # it overflowed the parser's recursion with a traceback
    (b'["\\ud800 cat"]', "not valid Unicode text"),  # a lone surrogate reached the tokenizer
])
def test_bad_prompt_files_are_named(content, message, tmp_path):
    path = tmp_path / "prompts.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(message)):
        D.read_prompts(path, "--prompts")


def test_prompt_files_with_a_byte_order_mark_and_quotes_read_as_meant(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('[{"caption": "a cat"}, "a dog"]', encoding="utf-8-sig")  # Windows editors write a BOM
    assert D.read_prompts(path, "--prompts") == ["a cat", "a dog"]
    path.write_text('"a cat" in the rain\na dog\n')  # plain text, even if a line starts with a quote
    assert D.read_prompts(path, "--prompts") == ['"a cat" in the rain', "a dog"]
    path.write_text("  a cat \t\n\ta dog\n")  # a prompt is its text: the spaces around it are no part of it
    assert D.read_prompts(path, "--prompts") == ["a cat", "a dog"], "prompts keep the whitespace around them"
    text = tmp_path / "prompts.txt"  # refused, not guessed (JSON Lines would become prompts), saying why
    text.write_text("[watercolor] a cat\n")
    with pytest.raises(UserError, match="a text file of prompts must not start with"):
        D.read_prompts(text, "--prompts")


def test_every_rank_gets_equally_many_prompts_even_with_fewer_prompts_than_ranks():
    for n, world in ((10, 4), (3, 8), (1, 3), (8, 8)):
        shares = [spo.rank_prompts(list(range(n)), rank, world) for rank in range(world)]
        assert {len(share) for share in shares} == {math.ceil(n / world)}, (n, world, shares)
        assert set().union(*shares) == set(range(n)), "every prompt is sampled by some rank"
    assert [spo.rank_prompts(list(range(10)), r, 4) for r in range(4)] == [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]]


def test_folders_are_written_whole_or_not_at_all(tmp_path):
    """Checkpoints and merged pipelines go through atomic_folder: a failure leaves the old folder and no
    temporary one, a crash's leftover is replaced by the next save of that folder, and unfinished folders stay
    hidden from the checkpoint listing that --resume picks from."""
    final = tmp_path / "checkpoints" / "epoch-0001_batch-000000_pair-00000"
    with D.atomic_folder(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with D.atomic_folder(final) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("disk full")
    assert (final / "a").read_text() == "1" and sorted(p.name for p in final.parent.iterdir()) == [final.name]
    leftover = final.with_name(f".{final.name}.tmp")  # as a SIGKILL in the middle of a save leaves it
    leftover.mkdir()
    (leftover / "half").write_text("")
    (final.parent / "epoch-0002_batch-000000_pair-00000.tmp").mkdir()  # a leftover of older versions
    (final.parent / "epoch-9999_notes.txt").write_text("")  # a file is no checkpoint, however it is named
    assert spo.checkpoint_dirs(tmp_path) == [final]
    with D.atomic_folder(final) as tmp:
        (tmp / "a").write_text("3")
    assert (final / "a").read_text() == "3" and not leftover.exists()


def test_a_folder_being_replaced_is_never_half_deleted(tmp_path, monkeypatch):
    """Replacing a folder deleted the old one in place first: a deletion that failed part-way (ignore_errors) left
    it half there, and the rename then failed too. The old one now moves aside whole, in one rename."""
    final = tmp_path / "checkpoints" / "step-1"
    with D.atomic_folder(final) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    real_rmtree = shutil.rmtree

    def rmtree_failing_part_way(path, ignore_errors=False):  # removes one file, then gives up (as on EACCES)
        files = sorted(p for p in Path(path).glob("*") if p.is_file()) if Path(path).is_dir() else []
        if files:
            files[0].unlink()
        elif Path(path).exists():
            real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(D.shutil, "rmtree", rmtree_failing_part_way)
    with D.atomic_folder(final) as tmp:
        (tmp / "a").write_text("2")
        (tmp / "b").write_text("2")
    monkeypatch.undo()
    assert sorted(p.name for p in final.iterdir()) == ["a", "b"] and (final / "b").read_text() == "2"
    D.remove_unfinished(final.parent)  # the old copy, had it stayed, goes with the next save's clean-up
    assert sorted(p.name for p in final.parent.iterdir()) == ["step-1"]
    theirs = tmp_path / ".merged.old"  # a folder of that name beside a new folder is not ours to delete
    theirs.mkdir()
    with D.atomic_folder(tmp_path / "merged") as tmp:
        (tmp / "a").write_text("1")
    assert theirs.is_dir()


def test_spm_checkpoints_keep_the_newest_and_clear_crash_leftovers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "save_checkpoint", lambda model, path: Path(path).write_text("spm"))
    folder = tmp_path / "checkpoints"
    for name in ("step-2", ".step-4.tmp", "step-3.tmp", ".step-1.tmp"):  # an older one, and crash leftovers (of
        (folder / name).mkdir(parents=True)  # this step's save, and of others': atomic_folder clears only its own)
    (folder / "notes.txt").write_text("the user's")  # once crashed the pruning with a traceback
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    pm.save_training_checkpoint(tmp_path, None, optimizer, torch.amp.GradScaler("cpu", enabled=False), {"step": 4})
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "step-4"]
    assert sorted(p.name for p in (folder / "step-4").iterdir()) == ["optimizer.pt", "progress.json", "spm.safetensors"]


def test_damaged_run_files_are_named_and_a_torn_metrics_line_is_dropped(tiny_run, tmp_path, capsys):
    """A SIGKILL while writing metrics.jsonl can leave half a line: --resume drops it and ends like the
    uninterrupted run. Damaged config.json or progress.json are one-line errors that name the file."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    shutil.rmtree(spo.checkpoint_dirs(out)[-1])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 0.')
    for name, damage in (("config.json", "{bad"), ("config.json", "[1]"), ("progress.json", '{"global_step": 3}'),
                         ("progress.json", '{"position": "abc", "global_step": 3, "prompts_sha256": "x"}')):
        path = out / name if name == "config.json" else spo.checkpoint_dirs(out)[-1] / name
        good = path.read_text()
        path.write_text(damage)
        with pytest.raises(SystemExit) as exit_info:
            spo.main(FAST + ["--out", str(out), "--resume"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and name in err, err
        path.write_text(good)
    spo.main(FAST + ["--out", str(out), "--resume"])
    assert_same_run(tiny_run, out)


def test_cli_subprocess_reports_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "spo.py", "--model", "tiny", "--k", "1", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=Path(__file__).parent)
    assert result.returncode == 2 and result.stderr.strip() == "error: --k must be at least 2 (a pool needs a winner and a loser), got 1"


def test_a_path_the_user_may_not_read_is_one_line_and_exit_2(tmp_path):
    """pathlib raises PermissionError where os.path says "not there": a file in a folder we may not enter ended in a
    traceback."""
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0)
    lora = closed / "lora.safetensors"
    try:
        result = subprocess.run(AS_A_USER + [
            sys.executable, "spo.py", "--model", "tiny", "--init-lora", str(lora), "--out", str(tmp_path / "run")],
            capture_output=True, text=True, cwd=Path(__file__).parent)
    finally:
        closed.chmod(0o700)
    assert result.returncode == 2 and result.stderr.strip() == f"error: permission denied: {lora}", result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(OSError) as other:  # an OSError no path causes (a full disk) keeps its type and traceback
        with D.path_errors_refused():
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert type(other.value) is OSError


def test_torch_compile_of_the_lora_unet_matches_eager():
    """The one compile test (about a minute on CPU): the LoRA-wrapped UNet compiles and agrees with eager."""
    pipe = D.Pipeline("tiny")
    D.inject_lora(pipe.unet, 4, 4)
    for layer in D.lora_layers(pipe.unet):
        torch.nn.init.normal_(layer.lora.up.weight, std=0.05)
    compiled = torch.compile(pipe.unet)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([901, 1]), torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, cond).sample, pipe.unet(x, t, cond).sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_the_lora_unet_traces_as_one_graph(model):
    """spo.py compiles the UNet with fullgraph=True: with the LoRA on and off, and with gradient checkpointing in
    training, SD1.5's and SDXL's block layouts must trace without a graph break (dynamo's explain, no compiling)."""
    pipe = D.Pipeline(model)
    D.inject_lora(pipe.unet, 4, 4)
    cond = pipe.encode_prompts(["a cat", "a red dog"], (32, 32))
    extra = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]} if pipe.is_sdxl else None
    unet = lambda x, t: pipe.unet(x, t, encoder_hidden_states=cond["text"], added_cond_kwargs=extra).sample
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([951, 1])
    for setting in ("LoRA on", "LoRA off", "gradient checkpointing"):
        if setting == "gradient checkpointing":
            pipe.unet.enable_gradient_checkpointing()
            pipe.unet.train()
        with D.lora_disabled(pipe.unet) if setting == "LoRA off" else contextlib.nullcontext():
            explained = torch._dynamo.explain(unet)(x, t)
        assert explained.graph_break_count == 0, (setting, [str(b.reason) for b in explained.break_reasons])
    torch._dynamo.reset()


class GraphCountAtEachJudgement:
    """The tiny SPM, noting how many graphs torch.compile has made so far each time it judges a pool."""

    def __init__(self):
        self.spm, self.graphs = pm.load_preference_model("spm", "tiny", "tiny", "tiny"), []

    def __getattr__(self, name):
        return getattr(self.spm, name)

    def judge(self, *args):
        from torch._dynamo.utils import counters

        self.graphs.append(counters["stats"]["unique_graphs"])
        return self.spm.judge(*args)


def test_compiled_training_compiles_nothing_after_its_first_batch(monkeypatch, tmp_path):
    """The first batch compiles the UNet's graphs: sampling, its first pool (a larger batch), the training forward
    (grad mode), the reference forward (LoRA off) and a micro-batch size range; later batches must reuse them.
    Dynamo decides guards and recompiles, not the backend, so the eager backend counts them in about a minute
    (the inductor run `TORCH_LOGS=recompiles python spo.py --model tiny --compile` made the same 6 graphs)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    scorer = GraphCountAtEachJudgement()
    # Micro-batches of up to 5 pairs (10 rows): the tiny text encoder's 16 tokens make a batch of 16 rows a shape
    # of its own (guards split the batch range there), which SD's 77 tokens never are for an even CFG batch.
    spo.train(spo.parse_args(FAST + ["--compile", "--train-batch-size", "5", "--out", str(tmp_path / "run")]),
              scorer=scorer)
    per_batch = len(scorer.graphs) // 4  # 8 prompts in batches of 4, two epochs
    assert len(scorer.graphs) == 4 * per_batch and scorer.graphs[0] >= 1
    from torch._dynamo.utils import counters

    at_the_end = counters["stats"]["unique_graphs"]  # after the last batch's training too
    torch._dynamo.reset()
    after_first = scorer.graphs[per_batch:]  # from the second batch's first pool, after the first batch trained
    assert after_first[0] > scorer.graphs[per_batch - 1], "the first batch's training compiles its own graphs"
    assert at_the_end == after_first[0], f"graphs compiled after the first batch: {scorer.graphs}, {at_the_end}"


def test_derived_seed_depends_on_the_run_seed_and_on_every_part():
    """--seed must change every derived generator: two runs with different seeds draw different noise."""
    a, b = spo.Config(seed=1), spo.Config(seed=2)
    assert spo.derived_seed(a, "sample", 0, 0, 0) != spo.derived_seed(b, "sample", 0, 0, 0), "--seed is ignored"
    assert spo.derived_seed(a, "sample", 0, 0, 0) != spo.derived_seed(a, "sample", 0, 1, 0)
    assert 0 <= spo.derived_seed(a, "order", 3) < 2**63, "a seed must fit torch.Generator.manual_seed"


def test_a_json_prompt_file_may_start_with_whitespace(tmp_path):
    """Leading blank lines or spaces do not turn a JSON prompt file into one prompt per line."""
    path = tmp_path / "prompts.json"
    path.write_text('\n  [{"caption": "a cat"},\n "a dog"]\n')
    assert D.read_prompts(path, "--prompts") == ["a cat", "a dog"]


def test_every_prompt_is_checked_for_text_utf8_cannot_encode():
    """A lone surrogate in any prompt, not only the first, is named before it reaches a tokenizer."""
    with pytest.raises(UserError, match=r"--prompts: not valid Unicode text: 'a \?'"):
        D.check_text(["a cat", "a \ud800"], "--prompts")


def test_the_validation_grid_has_a_column_per_seed_and_a_row_per_prompt(tmp_path):
    """One tile per (prompt, seed): seeds across, prompts down."""
    from PIL import Image

    cfg = spo.parse_args(FAST + ["--validation-prompts", "a cat", "--validation-seeds", "0", "1", "2"])
    spo.save_validation_grid(D.Pipeline("tiny"), cfg, tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (3 * 16, 1 * 16), "expected 3 columns (seeds) by 1 row (prompt)"


def test_an_updates_logged_loss_and_ratios_are_the_mean_over_its_micro_batches(monkeypatch):
    """With --grad-accum 2 the record of an update averages the loss and the ratios of both micro-batches (not the
    last one's), and counts the pairs of both."""
    cfg = spo.parse_args(FAST + ["--grad-accum", "2"])
    m = spo.setup_models(cfg, scorer=RuleScorer())
    real, offsets = spo.spo_loss, iter([1.0, 3.0])

    def shifted(*args):  # the same gradient, a known loss and ratio per micro-batch
        loss, ratio_w, ratio_l = real(*args)
        shift = next(offsets)
        return loss + shift, ratio_w * shift, ratio_l

    monkeypatch.setattr(spo, "spo_loss", shifted)
    gen = torch.Generator().manual_seed(0)
    text = m.pipe.encode_prompts(["a red cat", "the dog"], (16, 16))["text"]
    group, records = [], []
    for n in (2, 1):
        x_t = torch.randn(n, 4, 2, 2, generator=gen)
        pairs = dict(x_t=x_t, x_t_lose=x_t, t=torch.tensor([901, 501][:n]), win=torch.randn(n, 4, 2, 2, generator=gen),
                     lose=torch.randn(n, 4, 2, 2, generator=gen), text=text[:n])
        records.append(spo.train_micro_batch(m.pipe, m.unet, m.unet, pairs, m.pipe.encode_negative(1, (16, 16)),
                                             m.lora_params, m.optimizer, m.scaler, m.autocast, cfg, 1, group))
    record = records[1]
    assert records[0] is None and record is not None
    # at the LoRA's zero init the policy is the reference: loss log 2 and ratios 1 before the shifts
    assert record["loss"] == pytest.approx(math.log(2) + 2.0, rel=1e-5), f"loss not averaged over the group: {record}"
    assert record["ratio_win"] == pytest.approx(2.0, rel=1e-5) and record["ratio_lose"] == pytest.approx(1.0, rel=1e-5)
    assert record["pairs"] == 3, "pairs counts every micro-batch of the group"


def test_every_prompt_batch_draws_its_own_noise_and_each_epoch_its_own_order(tmp_path, monkeypatch):
    """derived_seed keys: (epoch, batch) for the sampling noise, the epoch for the prompt order. Resume tests cannot
    see a key left out (the uninterrupted run would repeat the same noise), so the draws are checked here."""
    seeds, prompts = [], []
    real_pool, real_score = spo.sample_candidate_pool, spo.make_score_fn

    def pool(pipe, unet, cond, uncond, score_fn, cfg, generator):
        seeds.append(generator.initial_seed())
        return real_pool(pipe, unet, cond, uncond, score_fn, cfg, generator)

    def score(scorer, batch_prompts, k):
        prompts.append(list(batch_prompts))
        return real_score(scorer, batch_prompts, k)

    monkeypatch.setattr(spo, "sample_candidate_pool", pool)
    monkeypatch.setattr(spo, "make_score_fn", score)
    spo.main(FAST + ["--out", str(tmp_path / "run")])
    assert len(seeds) == 4 and len(set(seeds)) == 4, "each (epoch, batch) must seed its own sampling noise"
    epoch0, epoch1 = sum(prompts[:2], []), sum(prompts[2:], [])
    assert sorted(epoch0) == sorted(epoch1) == sorted(spo.TINY_PROMPTS), "an epoch visits every prompt once"
    assert epoch0 != epoch1, "each epoch must shuffle the prompts anew"


def test_a_run_from_an_init_lora_uses_it_as_the_reference_and_resumes_exactly(tiny_run, tmp_path):
    """DPO's reference is the model training starts from: with --init-lora, the base plus that LoRA, so the first
    ratios are exactly 1 (against the base model, a trained LoRA would start off 1 and often clamped). The trained
    LoRA is what is saved, and a resumed run keeps the init LoRA, not the checkpoint's, as its reference."""
    init = tiny_run / "pytorch_lora_weights.safetensors"
    flags = FAST[:-1] + ["1", "--init-lora", str(tiny_run), "--lr", "1e-2"]  # a run folder: its LoRA file
    spo.main(flags + ["--out", str(tmp_path / "full")])
    first = [r for r in records(tmp_path / "full") if "loss" in r][0]
    assert first["ratio_win"] == first["ratio_lose"] == 1.0, first
    assert any(r["ratio_win"] != 1.0 for r in records(tmp_path / "full")[1:]), "after an update the policy moves away"
    trained, start = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors")), load_file(str(init))
    assert any(not torch.equal(trained[k], start[k]) for k in start), "the trained LoRA must be saved, not the init"
    spo.main(flags + ["--out", str(tmp_path / "cut"), "--save-every", "1"])
    checkpoints = sorted((tmp_path / "cut" / "checkpoints").iterdir(), key=lambda d: d.stat().st_mtime)
    assert len(checkpoints) == 2
    shutil.rmtree(checkpoints[-1])  # as if killed after the first prompt batch
    spo.main(flags + ["--out", str(tmp_path / "cut"), "--resume"])
    resumed = load_file(str(tmp_path / "cut" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(trained[k], resumed[k]) for k in trained), "the resumed run must end where the full one does"


def test_as_reference_runs_the_init_lora_and_gives_the_trained_one_back(lora_unet):
    """Inside as_reference an --init-lora run's UNet computes exactly what a UNet holding the init LoRA does (not the
    policy, not the base model); on exit the trained weights are back, bit for bit."""
    unet, io = lora_unet
    base = unet_out(unet, io)
    D.inject_lora(unet, 4, 4)
    D.load_lora(unet, LORA / "pytorch_lora_weights.safetensors")  # the init LoRA
    init = unet_out(unet, io)
    spo.keep_as_reference(unet)
    with torch.no_grad():  # training moves the LoRA
        for layer in D.lora_layers(unet):
            layer.lora.up.weight.add_(0.1)
    trained = [p.detach().clone() for p in D.lora_layers(unet)[0].parameters() if p.requires_grad]
    policy = unet_out(unet, io)
    with spo.as_reference(unet):
        assert torch.equal(unet_out(unet, io), init), "the reference must be the base plus the init LoRA"
    assert not torch.allclose(policy, init) and not torch.allclose(init, base)
    assert torch.equal(unet_out(unet, io), policy), "the policy must come back after as_reference"
    assert all(torch.equal(a, b) for a, b in zip(trained, [p for p in D.lora_layers(unet)[0].parameters()
                                                          if p.requires_grad]))


def test_building_a_tiny_model_leaves_the_global_rng_alone(tmp_path):
    """The tiny models draw their weights from seed 0 without reseeding the caller's generator (a test or run
    that builds one on first use would otherwise draw other numbers than a run that found it cached)."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    D.build_tiny_pipeline(tmp_path / "sd", "tiny")
    pm.build_tiny_spm(tmp_path / "spm")
    assert torch.equal(torch.get_rng_state(), state)


def test_vae_and_judge_run_in_their_own_dtype_under_autocast():
    """Sampling runs under the run's autocast, but an fp32 VAE (SDXL's own overflows in fp16) and the fp32 judge
    (the official code scores in fp32) must not be cast down by it."""
    pipe = D.Pipeline("tiny-sdxl")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    score = spo.make_score_fn(pm.load_preference_model("spm", "tiny", "tiny", "tiny"), ["a red cat"], 2)
    plain = pipe.decode(latents), score(pipe.decode(latents), torch.tensor([501, 501]))
    with torch.autocast("cpu", torch.bfloat16):
        cast = pipe.decode(latents), score(pipe.decode(latents), torch.tensor([501, 501]))
    assert torch.equal(plain[0], cast[0]), "the VAE ran in bf16 under autocast"
    assert torch.equal(plain[1], cast[1]), "the preference model ran in bf16 under autocast"


# ---- reliability: interrupted runs, untrusted files, numerical faults ----


def run_spo(args, **popen):
    """spo.py as a real process, single-threaded like this test process, so results are bitwise comparable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "spo.py", *args], cwd=Path(__file__).parent, env=env, text=True, **popen)


def assert_same_run(a, b):
    lora_a, lora_b = load_file(str(a / "pytorch_lora_weights.safetensors")), load_file(str(b / "pytorch_lora_weights.safetensors"))
    assert sorted(lora_a) == sorted(lora_b), "the two runs saved different LoRA layers"
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a), "final LoRA differs from the uninterrupted run"
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text(), "metrics differ"


def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(tiny_run, tmp_path):
    """Three SIGKILLs at seeded random points of the run's progress (after its n-th optimizer step, plus a random
    delay into the next), each followed by --resume; the end equals the uninterrupted run. Kill points follow
    progress, not the clock, so a fast or a loaded machine kills at the same places."""
    out, rng = tmp_path / "killed", random.Random(20241127)  # the kill points come from this seed
    args = FAST + ["--out", str(out), "--save-every", "1"]
    metrics, total = out / "metrics.jsonl", len((tiny_run / "metrics.jsonl").read_text().splitlines())
    kills = 0
    for after in sorted(rng.sample(range(1, total), 3)):
        proc = run_spo(args + (["--resume"] if (out / "config.json").exists() else []),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= after):
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))
        if proc.poll() is None:
            proc.kill()  # SIGKILL: no chance to clean up
            kills += 1
        proc.wait()
    last = run_spo(args + (["--resume"] if (out / "config.json").exists() else []), stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    stdout, stderr = last.communicate(timeout=120)
    assert last.returncode == 0, stderr[-2000:]
    assert kills >= 2, f"only {kills} kills: the test did not interrupt the run"
    assert_same_run(tiny_run, out)


def test_sigterm_checkpoints_mid_batch_exits_0_and_resumes_exactly(tmp_path):
    args = FAST + ["--train-batch-size", "2"]  # several optimizer steps per batch, so the stop lands mid-batch
    spo.main(args + ["--out", str(tmp_path / "reference")])
    out = tmp_path / "preempted"
    proc = run_spo(args + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "--resume" in stdout, "the stop message must say how to resume"
    assert (spo.checkpoint_dirs(out)[-1] / "pending_pairs.safetensors").is_file(), "expected a mid-batch checkpoint"
    resumed = run_spo(args + ["--out", str(out), "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert resumed.wait(timeout=120) == 0
    assert_same_run(tmp_path / "reference", out)


def test_an_update_follows_grad_accum_micro_batches_each_weighted_1_over_grad_accum():
    """accelerate's rule, as the official run: each micro-batch's loss counts 1 / grad_accum and the update comes
    after grad_accum of them, so it equals one AdamW step on the mean of their gradients."""
    cfg = spo.parse_args(FAST + ["--grad-accum", "2"])
    m = spo.setup_models(cfg, scorer=RuleScorer())
    gen = torch.Generator().manual_seed(0)
    pairs = [dict(x_t=torch.randn(2, 4, 2, 2, generator=gen), t=torch.tensor([901, 501]),
                  text=m.pipe.encode_prompts(["a red cat", "the dog"], (16, 16))["text"]) for _ in range(2)]
    for p in pairs:
        p.update(x_t_lose=p["x_t"], win=torch.randn(2, 4, 2, 2, generator=gen), lose=torch.randn(2, 4, 2, 2, generator=gen))
    uncond_1 = m.pipe.encode_negative(1, (16, 16))
    expected = []
    for p in pairs:  # the gradient of each micro-batch's own loss, by hand
        loss = spo.spo_loss(*spo.pair_log_probs(m.pipe, m.unet, m.unet, p, uncond_1, cfg), cfg.beta, cfg.eps)[0]
        expected.append(torch.autograd.grad(loss, m.lora_params))
    mean_grad = [(a + b) / 2 for a, b in zip(*expected)]
    norm = torch.cat([g.flatten() for g in mean_grad]).norm().item()  # before clipping, as the run reports it
    before = [p.detach().clone() for p in m.lora_params]
    reference = torch.optim.AdamW([torch.nn.Parameter(p.clone()) for p in before], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for param, g in zip(reference.param_groups[0]["params"], mean_grad):
        param.grad = g
    torch.nn.utils.clip_grad_norm_(reference.param_groups[0]["params"], cfg.max_grad_norm)
    reference.step()
    group, step = [], lambda p: spo.train_micro_batch(m.pipe, m.unet, m.unet, p, uncond_1, m.lora_params, m.optimizer,
                                                      m.scaler, m.autocast, cfg, 1, group)
    assert step(pairs[0]) is None and len(group) == 1, "the first micro-batch only accumulates"
    assert all(torch.equal(p, b) for p, b in zip(m.lora_params, before))
    torch.testing.assert_close([p.grad for p in m.lora_params], [g / 2 for g in expected[0]], rtol=1e-5, atol=1e-8)
    record = step(pairs[1])
    assert record["pairs"] == 4 and group == [], "the second completes the group: an update over both"
    # AdamW's first step barely depends on the gradient's scale: the norm pins it (and it is what gets clipped)
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-5), "the update's gradient is the group's mean"
    assert all(p.grad is None for p in m.lora_params), "an update starts the next group from zero"
    torch.testing.assert_close(list(m.lora_params), reference.param_groups[0]["params"], rtol=1e-5, atol=1e-7)


def test_max_grad_norm_0_never_clips_as_the_reference_and_a_bound_clips_to_it():
    """--max-grad-norm 0 reproduces the official run, whose clip call never clips (README); a bound clips the
    gradient the optimizer steps on, while the log keeps the norm before clipping."""
    at_step = []
    for bound in ("0", "1e-6"):
        cfg = spo.parse_args(FAST + ["--max-grad-norm", bound])
        m = spo.setup_models(cfg, scorer=RuleScorer())
        m.optimizer.step = lambda *a, **k: at_step.append(torch.cat([p.grad.flatten() for p in m.lora_params]).norm())
        gen = torch.Generator().manual_seed(0)
        pair = dict(x_t=torch.randn(2, 4, 2, 2, generator=gen), t=torch.tensor([901, 501]),
                    text=m.pipe.encode_prompts(["a red cat", "the dog"], (16, 16))["text"])
        pair.update(x_t_lose=pair["x_t"], win=torch.randn(2, 4, 2, 2, generator=gen),
                    lose=torch.randn(2, 4, 2, 2, generator=gen))
        record = spo.train_micro_batch(m.pipe, m.unet, m.unet, pair, m.pipe.encode_negative(1, (16, 16)),
                                       m.lora_params, m.optimizer, m.scaler, m.autocast, cfg, 1, [])
        assert record["grad_norm"] > 1e-3, record
        expected = record["grad_norm"] if bound == "0" else 1e-6
        assert at_step[-1].item() == pytest.approx(expected, rel=1e-4), (bound, at_step[-1].item(), record)


def test_accumulation_groups_span_prompt_batches_and_resume_exactly(tmp_path):
    """With one pair per micro-batch and groups of 2, a prompt batch that keeps an odd number of pairs hands half a
    group to the next batch (the official run's accelerate counts micro-batches across batches). A stop right
    then checkpoints the gradients of that half group, and --resume continues bitwise."""
    args = FAST + ["--train-batch-size", "1", "--grad-accum", "2"]
    spo.main(args + ["--out", str(tmp_path / "reference")])
    records = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pairs"] == 2 for r in records), "every update has a whole group, across batch boundaries too"
    kept = {(r["epoch"], r["batch"]): r["pairs_kept"] for r in records}  # per prompt batch, in order
    assert len(kept) == 4, "each batch should keep at least 2 pairs, or this test cannot find its batches"
    assert len(records) == sum(kept.values()) // 2, "groups run on across batches and epochs; only the last half goes"
    odd_before = [i for i in range(1, 4) if sum(list(kept.values())[:i]) % 2 == 1]
    assert odd_before, f"no batch starts with half a group: pairs kept per batch {list(kept.values())}"
    out = tmp_path / "stopped"  # stopped while sampling that batch (4 judgements per batch): half a group waits
    assert spo.train(spo.parse_args(args + ["--out", str(out)]), scorer=SignalDuring(4 * odd_before[0] + 1)) is None
    assert (spo.checkpoint_dirs(out)[-1] / "group_grads.safetensors").is_file(), "the half group must be saved"
    broken = tmp_path / "broken"  # the same checkpoint without those gradients: a clear error, not a silent restart
    shutil.copytree(out, broken)
    (spo.checkpoint_dirs(broken)[-1] / "group_grads.safetensors").unlink()
    with pytest.raises(SystemExit) as exit_:
        spo.main(args + ["--out", str(broken), "--resume"])
    assert exit_.value.code == 2
    spo.main(args + ["--out", str(out), "--resume"])
    assert_same_run(tmp_path / "reference", out)


def test_resume_with_another_setting_is_refused(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    saved = json.loads((out / "config.json").read_text())
    for flag, value in (("--threshold", saved["threshold"] + 0.05), ("--lora-alpha", saved["lora_alpha"] * 2)):
        with pytest.raises(SystemExit) as exit_info:
            spo.main(FAST + ["--out", str(out), "--resume", flag, str(value)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "these settings differ from the run" in err
        assert flag[2:].replace("-", "_") in err, err


def test_resume_with_other_prompts_is_refused_before_the_models_load(tiny_run, tmp_path, capsys, monkeypatch):
    """The checkpoint's position counts prompts of its own prompt list: other prompts are refused, in seconds: the
    check used to come after SD's weights had loaded."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(spo.TINY_PROMPTS[::-1]))  # the same prompts, in another order
    monkeypatch.setattr(spo, "setup_models", lambda *a, **k: pytest.fail("the models loaded before the check"))
    with pytest.raises(SystemExit) as exit_info:
        spo.main(FAST + ["--out", str(out), "--resume", "--prompts", str(prompts)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == (
        f"error: --resume: the prompts or the number of ranks differ from the run in {out}"), err


def test_resume_says_when_the_folder_holds_another_programs_run(tiny_run, dataset, tmp_path, capsys):
    """--resume on an SPM run (or an SPM --resume on a spo.py run) listed every setting as changed."""
    spm_run, spo_run = tmp_path / "spm", tmp_path / "spo"
    spm_run.mkdir()
    (spm_run / "config.json").write_text(json.dumps({"command": "train", "lr": 3e-6}))
    with pytest.raises(SystemExit) as exit_info:
        spo.main(FAST + ["--out", str(spm_run), "--resume"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: --resume: {spm_run} is not a spo.py run (its config.json holds no spo.py settings)")
    shutil.copytree(tiny_run, spo_run)
    assert pm.main(["train", "--model", "tiny", "--data", str(dataset), "--out", str(spo_run), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --resume: {spo_run} is not a preference_model.py train run (its config.json holds other settings)")


def test_the_math_and_model_settings_cannot_change_on_resume():
    """A resumed run may change only where and how it runs, never what it computes."""
    fixed = {"model", "k", "beta", "eps", "threshold", "steps", "divert_start_step", "num_inner_step", "eta", "cfg",
             "lr", "weight_decay", "lora_rank", "lora_alpha", "seed", "sample_batch_size", "train_batch_size",
             "grad_accum", "resolution", "max_grad_norm"}
    fixed &= {f.name for f in dataclasses.fields(spo.Config)}
    assert not fixed & set(spo.CHANGEABLE_ON_RESUME), f"changeable on resume: {sorted(fixed & set(spo.CHANGEABLE_ON_RESUME))}"


def test_a_setting_missing_from_an_old_run_counts_as_its_default(tiny_run, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(tiny_run, out)
    config = json.loads((out / "config.json").read_text())
    del config["num_inner_step"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        spo.main(FAST + ["--out", str(out), "--resume", "--num-inner-step", str(spo.Config.num_inner_step + 1)])
    assert exit_info.value.code == 2 and "num_inner_step" in capsys.readouterr().err


def test_resume_starts_from_the_newest_checkpoint(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    names = [d.name for d in spo.checkpoint_dirs(out)]
    assert len(names) == 2 and names == sorted(names)
    capsys.readouterr()
    spo.main(FAST + ["--out", str(out), "--resume"])
    assert f"from {names[-1]} " in capsys.readouterr().out


def test_a_resume_from_mid_epoch_trains_every_batch_of_the_later_epochs(tiny_run, tmp_path):
    """Resuming from a checkpoint at (epoch 0, batch 1) goes on at epoch 0's batch 1, and epoch 1 starts at its
    batch 0 again (not at batch 1), so the run ends exactly as the uninterrupted one."""
    out = tmp_path / "mid"
    spo.main(FAST + ["--out", str(out), "--save-every", "1"])
    names = [d.name for d in spo.checkpoint_dirs(out)]
    assert names[0] == "epoch-0000_batch-000001_pair-00000", names
    for d in spo.checkpoint_dirs(out)[1:]:  # as if the run died right after its first checkpoint
        shutil.rmtree(d)
    (out / "pytorch_lora_weights.safetensors").unlink()
    spo.main(FAST + ["--out", str(out), "--resume", "--save-every", "1"])
    assert_same_run(tiny_run, out)
    assert {(r["epoch"], r["batch"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())} == {
        (e, b) for e in (0, 1) for b in (0, 1)}, "every batch of every epoch must train"


def test_keep_keeps_the_newest_checkpoints(tiny_run, tmp_path):
    out = tmp_path / "kept"
    spo.main(FAST + ["--out", str(out), "--keep", "1"])
    assert [d.name for d in spo.checkpoint_dirs(out)] == [spo.checkpoint_dirs(tiny_run)[-1].name]


def test_overwrite_starts_the_run_afresh(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    spo.main(FAST[:-1] + ["1", "--out", str(out), "--overwrite"])
    assert len(spo.checkpoint_dirs(out)) == 1, "the replaced run's checkpoints survived --overwrite"
    assert {json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()} == {0}


def test_is_spo_run_needs_all_of_spo_settings_in_a_json_object(tmp_path):
    """--overwrite deletes only a spo.py run: a config.json with just some of its keys (another tool's config) or a
    non-object, or none at all, is not one."""
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(spo.Config())))
    assert spo.is_spo_run(tmp_path)
    for other in ({"beta": 0.1, "eps": 1e-8, "k": 4}, ["divert_start_step", "k", "beta", "eps", "threshold"], "x"):
        (tmp_path / "config.json").write_text(json.dumps(other))
        assert not spo.is_spo_run(tmp_path), f"{other!r} taken for a spo.py run"
    (tmp_path / "config.json").write_text("{bad")
    assert not spo.is_spo_run(tmp_path) and not spo.is_spo_run(tmp_path / "absent")


def test_cleanup_of_an_unstarted_run_spares_a_run_with_a_checkpoint(tmp_path):
    """remove_unstarted_run removes only what a fresh run wrote before its first checkpoint: once a checkpoint
    exists the run is resumable and stays; before that, a folder the run made goes, and a folder it found empty is
    emptied but kept."""
    out = tmp_path / "run"
    (out / "checkpoints" / "epoch-0001_batch-000000_pair-00000").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    D.remove_unstarted_run(out, created=True)
    assert (out / "config.json").is_file(), "a run with a checkpoint must never be removed"
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").mkdir()  # made, but still empty: nothing to resume from
    D.remove_unstarted_run(out, created=False)
    assert out.is_dir() and not any(out.iterdir()), "a folder the user made is emptied, not removed"
    (out / "config.json").write_text("{}")
    D.remove_unstarted_run(out, created=True)
    assert not out.exists(), "a folder the run made is removed"


def test_cleanup_of_an_unstarted_run_behind_a_link_keeps_the_link(tmp_path):
    """--out given as a link to a folder: cleaning up a failed fresh run removes the files the run wrote behind the
    link, never the link itself (even if the run believed it made the folder)."""
    target, link = tmp_path / "target", tmp_path / "run"
    target.mkdir()
    link.symlink_to(target)
    (link / "config.json").write_text("{}")
    (link / "samples").mkdir()
    D.remove_unstarted_run(link, created=True)
    assert link.is_symlink() and target.is_dir(), "the link must stay"
    assert not any(target.iterdir()), "the run's files behind the link must go"


def test_remove_unfinished_clears_crash_leftovers_of_both_namings_only(tmp_path):
    """A crash mid-save leaves ".NAME.tmp" (atomic_folder) or "NAME.tmp" (older versions): both go; finished
    checkpoints and files that only end in .tmp stay."""
    done = tmp_path / "epoch-0001_batch-000000_pair-00000"
    for name in (done.name, ".epoch-0002_batch-000000_pair-00000.tmp", "epoch-0002_batch-000000_pair-00000.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.tmp").write_text("the user's")
    D.remove_unfinished(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [done.name, "notes.tmp"], sorted(tmp_path.iterdir())


def test_a_checkpoint_position_must_be_three_non_negative_integers(tmp_path):
    """progress.json is validated before anything loads: a negative or short position is a UserError."""
    for position in ([-1, 0, 0], [0, 0], [0, 0, 1.5]):
        (tmp_path / "progress.json").write_text(json.dumps(dict(position=position, global_step=0, prompts_sha256="x")))
        with pytest.raises(UserError, match="lacks a valid position"):
            spo.load_checkpoint(tmp_path, None, None, None, "cpu", [])
    (tmp_path / "progress.json").write_text(json.dumps(dict(position=[0, 0, 0], global_step=-1, prompts_sha256="x")))
    with pytest.raises(UserError, match="lacks a valid position"):
        spo.load_checkpoint(tmp_path, None, None, None, "cpu", [])


def test_pending_pairs_without_every_tensor_resume_needs_are_refused(tmp_path, monkeypatch):
    """A mid-batch checkpoint's pending_pairs.safetensors must hold the pairs and their shuffle ("perm"): one
    without them (an older version's) is a UserError naming the file, not a KeyError deep in the loop."""
    monkeypatch.setattr(spo, "load_lora", lambda unet, path: None)  # only the pairs file is under test
    monkeypatch.setattr(spo, "load_optimizer_state", lambda *args: None)
    (tmp_path / "progress.json").write_text(json.dumps(dict(position=[0, 1, 2], global_step=1, prompts_sha256="x")))
    pairs = {k: torch.zeros(2, 1) for k in ("x_t", "x_t_lose", "t", "win", "lose", "text")}
    save_file(pairs, tmp_path / "pending_pairs.safetensors")
    with pytest.raises(UserError, match="pending_pairs.safetensors lacks some of the pairs' tensors"):
        spo.load_checkpoint(tmp_path, None, None, None, "cpu", [])
    save_file({**pairs, "perm": torch.arange(2)}, tmp_path / "pending_pairs.safetensors")
    progress, pending = spo.load_checkpoint(tmp_path, None, None, None, "cpu", [])
    assert progress["position"] == [0, 1, 2] and torch.equal(pending["perm"], torch.arange(2))


def test_group_gradients_that_do_not_match_the_lora_are_refused(tmp_path, monkeypatch):
    """An unfinished accumulation group's saved gradients must be one per LoRA tensor: another count is a
    UserError naming the file; a matching file puts each gradient back on its tensor."""
    monkeypatch.setattr(spo, "load_lora", lambda unet, path: None)  # only the gradients file is under test
    monkeypatch.setattr(spo, "load_optimizer_state", lambda *args: None)
    (tmp_path / "progress.json").write_text(json.dumps(dict(position=[0, 1, 0], global_step=0, prompts_sha256="x",
                                                            group=[[0.7, 1.0, 1.0, 2]])))
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    save_file({"0": torch.ones(2)}, tmp_path / "group_grads.safetensors")
    with pytest.raises(UserError, match="group_grads.safetensors does not match the LoRA's 2 tensors"):
        spo.load_checkpoint(tmp_path, None, None, None, "cpu", params)
    save_file({"0": torch.ones(2), "1": torch.full((3,), 2.0)}, tmp_path / "group_grads.safetensors")
    spo.load_checkpoint(tmp_path, None, None, None, "cpu", params)
    assert torch.equal(params[1].grad, torch.full((3,), 2.0)), "each saved gradient goes back on its own tensor"


def test_read_metrics_drops_only_a_torn_last_line(tmp_path):
    """Only the last line can be cut short by a kill; a damaged line before it is a UserError, never silently
    the end of the records."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in D.read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2 is not a metrics record"):
        D.read_metrics(path)
    assert D.read_metrics(tmp_path / "absent.jsonl") == []


def test_stop_signal_sets_a_flag_a_second_ctrl_c_interrupts_and_exit_restores_handlers():
    """The first SIGTERM/SIGINT only sets the flag; a second SIGINT raises KeyboardInterrupt (a second SIGTERM does
    not); leaving the block puts the previous handlers back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with D.StopSignal() as stop:
        assert stop.signum is None
        try:
            stop.handle(signal.SIGINT, None)  # the loop finishes its step and checkpoints
        except KeyboardInterrupt:
            pytest.fail("the first SIGINT must only set the flag, not interrupt")
        assert stop.signum == signal.SIGINT
    with D.StopSignal() as stop:
        stop.handle(signal.SIGTERM, None)
        stop.handle(signal.SIGTERM, None)  # a cluster's repeated SIGTERM is not a Ctrl-C
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)
    assert {s: signal.getsignal(s) for s in before} == before, "StopSignal must restore the previous handlers"


def test_a_finite_loss_with_a_non_finite_gradient_skips_the_update():
    """The skip follows the gradient's norm, not only the loss: an inf gradient behind a finite loss must leave the
    LoRA and the optimizer untouched, and the record says why."""
    cfg = spo.parse_args(FAST)
    m = spo.setup_models(cfg, scorer=RuleScorer())
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 2, 2, generator=gen)
    pairs = dict(x_t=x_t, x_t_lose=x_t, t=torch.tensor([901, 501]), win=torch.randn(2, 4, 2, 2, generator=gen),
                 lose=torch.randn(2, 4, 2, 2, generator=gen),
                 text=m.pipe.encode_prompts(["a red cat", "the dog"], (16, 16))["text"])
    hook = m.lora_params[0].register_hook(lambda g: torch.full_like(g, float("inf")))
    before = [p.detach().clone() for p in m.lora_params]
    record = spo.train_micro_batch(m.pipe, m.unet, m.unet, pairs, m.pipe.encode_negative(1, (16, 16)), m.lora_params,
                                   m.optimizer, m.scaler, m.autocast, cfg, 1, [])
    hook.remove()
    assert math.isfinite(record["loss"]) and not math.isfinite(record["grad_norm"])
    assert record.get("skipped") == "non-finite gradient", record
    assert all(torch.equal(p, b) for p, b in zip(m.lora_params, before)), "a non-finite gradient must not update"
    assert not m.optimizer.state, "a skipped update must not touch the optimizer's state"


def test_device_problem_names_a_cuda_index_past_the_last_device(monkeypatch):
    """cuda:N exists only for N < device_count (indices start at 0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.device_problem("cuda:1") is None and D.device_problem("cuda") is None
    assert "has 2 CUDA devices" in (D.device_problem("cuda:2") or ""), "cuda:2 on a 2-GPU machine must be refused"
    assert "must be cpu or cuda" in D.device_problem("gpu")


def test_an_output_path_that_is_a_broken_link_is_named(tmp_path):
    """A dangling symlink as --out is refused up front, by name: mkdir would fail on it only after the models load."""
    dangling = tmp_path / "run"
    dangling.symlink_to(tmp_path / "nowhere")
    for is_file in (False, True):
        assert "is a broken link" in (D.output_problem(dangling, "--out", is_file=is_file) or ""), is_file
    assert not (tmp_path / "nowhere").exists()


def test_written_files_get_the_mode_the_umask_gives_any_file(tiny_run, tmp_path):
    """safetensors' save_file makes 0600 files: a LoRA on a shared cluster that nobody else could read. Written
    files get what open() would give them: 0666 less the umask (0644 under the usual 022)."""
    D.atomic_write(tmp_path / "a.safetensors", lambda tmp: save_file({"x": torch.zeros(1)}, tmp))
    with D.atomic_folder(tmp_path / "folder") as tmp:
        save_file({"x": torch.zeros(1)}, tmp / "b.safetensors")
    (tmp_path / "plain.txt").write_text("")  # the mode of a file made by open()
    written = [tmp_path / "a.safetensors", tmp_path / "folder" / "b.safetensors",
               tiny_run / "pytorch_lora_weights.safetensors", *spo.checkpoint_dirs(tiny_run)[-1].iterdir()]
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in written}
    assert set(modes.values()) == {oct((tmp_path / "plain.txt").stat().st_mode & 0o777)}, modes


def test_runs_from_before_sdxl_resume(tiny_run, tmp_path):
    """config.json of older runs lacks the settings added since (vae, num_inner_step, pool_at_last_step): their
    defaults apply, so --resume accepts the run."""
    out = tmp_path / "old"
    shutil.copytree(tiny_run, out)
    config = json.loads((out / "config.json").read_text())
    for key in ("vae", "num_inner_step", "pool_at_last_step"):
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    spo.main(FAST + ["--out", str(out), "--resume", "--epochs", "3"])  # one more epoch
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


def test_pickle_checkpoint_that_runs_code_is_refused(tmp_path, capsys):
    marker, evil = tmp_path / "pwned.txt", tmp_path / "spm.bin"
    torch.save({"model.logit_scale": Exploit(str(marker))}, evil)
    with pytest.raises(SystemExit) as exit_info:
        spo.main(FAST + ["--out", str(tmp_path / "run"), "--preference-checkpoint", str(evil)])
    assert exit_info.value.code == 2 and str(evil) in capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's code ran"


def test_pickled_optimizer_state_is_refused_on_resume(tiny_run, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned.txt"
    shutil.copytree(tiny_run, out)
    torch.save({"optimizer": Exploit(str(marker))}, spo.checkpoint_dirs(out)[-1] / "optimizer.pt")
    with pytest.raises(SystemExit) as exit_info:
        spo.main(FAST + ["--out", str(out), "--resume", "--epochs", "3"])
    assert exit_info.value.code == 2 and "unreadable" in capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's code ran"


def test_truncated_safetensors_is_refused_by_path(tiny_run, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    data = (tiny_run / "pytorch_lora_weights.safetensors").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as exit_info:
        spo.main(FAST + ["--out", str(tmp_path / "run"), "--init-lora", str(cut)])
    assert exit_info.value.code == 2 and str(cut) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_flags_naming_files_are_checked_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """A non-LoRA or other-rank --init-lora and a missing local judge file were refused only after the pipeline
    loaded (minutes for SDXL); the prompts flag given a folder said "no such file"."""
    monkeypatch.setattr(spo, "Pipeline", lambda *a, **k: pytest.fail("the pipeline loaded before the flags' check"))
    not_lora, rank_8 = tmp_path / "weights.safetensors", tmp_path / "rank8.safetensors"
    save_file({"conv.weight": torch.zeros(4, 4)}, str(not_lora))
    save_file({"unet.a.to_q.lora.down.weight": torch.zeros(8, 32), "unet.a.to_q.lora.up.weight": torch.zeros(32, 8)},
              str(rank_8))
    for flags, message in [
        (["--init-lora", str(not_lora)], f"--init-lora {not_lora} holds no UNet LoRA weights"),
        (["--init-lora", str(rank_8)], f"--init-lora {rank_8} has LoRA rank 8, this run uses --lora-rank 4"),
        (["--preference-checkpoint", str(tmp_path / "spm.bin")], "--preference-checkpoint: no such file or folder"),
        (["--preference-processor", "./nope"], "--preference-processor: no such file or folder: ./nope"),
        (["--prompts", str(tmp_path)], f"--prompts: {tmp_path} is a folder, not a file"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            spo.main(FAST + ["--out", str(tmp_path / "run")] + flags)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, (flags, err)
    assert not (tmp_path / "run").exists()
    # Not refused: "owner/repo" where a folder "owner" exists here is still a hub id (a clone of owner/repo makes
    # one), and --random-init reads no model files at all.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    spo.parse_args(FAST + ["--pretrained", "owner/repo", "--preference-model", "owner/clip"])
    spo.parse_args(FAST + ["--random-init", "--pretrained", "/nonexistent/sd", "--vae", "./nope"])


def test_init_lora_rank_is_the_unet_lora_rank_and_a_home_path_is_local(tmp_path, monkeypatch):
    """--init-lora's rank is its UNet LoRA's: text-encoder weights of another rank are left out, two UNet ranks are
    refused. A path that starts with ~ is local: it is read from $HOME and must exist there."""
    run, lora = ["--out", str(tmp_path / "run")], tmp_path / "lora.safetensors"
    unet = {"unet.a.to_q.lora.down.weight": torch.zeros(4, 32), "unet.a.to_q.lora.up.weight": torch.zeros(32, 4)}
    save_file({**unet, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(8, 32)}, str(lora))
    spo.parse_args(FAST + run + ["--init-lora", str(lora)])
    save_file({**unet, "unet.b.to_k.lora.down.weight": torch.zeros(8, 32)}, str(lora))
    with pytest.raises(UserError, match="has LoRA rank 4, 8, this run uses --lora-rank 4"):
        spo.parse_args(FAST + run + ["--init-lora", str(lora)])
    monkeypatch.setenv("HOME", str(tmp_path))
    spo.parse_args(FAST + run + ["--vae", "~/lora.safetensors"])  # there: the models' own loading judges it
    with pytest.raises(UserError, match="--vae: no such file or folder: ~/nope"):
        spo.parse_args(FAST + run + ["--vae", "~/nope"])


def test_a_hub_name_that_fails_offline_says_only_the_local_cache_was_searched(monkeypatch):
    """Offline, huggingface_hub blames a missing model_index.json; the line must say the hub was not asked."""
    from huggingface_hub import constants

    err = OSError("owner/repo does not appear to have a file named model_index.json.")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline, local = (str(D.cannot_load("the pipeline", n, err, "--pretrained")) for n in ("owner/repo", "./sd"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    online = str(D.cannot_load("the pipeline", "owner/repo", err, "--pretrained"))
    assert "only the local Hugging Face cache was searched" in offline and "with --pretrained" in offline, offline
    assert "cache" not in local and "cache" not in online, (local, online)


def nan_loss_at(monkeypatch, bad_calls):
    """Make spo_loss return NaN on the given call numbers (1-based; None: every call)."""
    real, calls = spo.spo_loss, []

    def flaky(*args):
        calls.append(1)
        loss, ratio_w, ratio_l = real(*args)
        return (loss * float("nan") if bad_calls is None or len(calls) in bad_calls else loss), ratio_w, ratio_l

    monkeypatch.setattr(spo, "spo_loss", flaky)


def test_one_nan_loss_is_skipped_and_the_run_finishes(monkeypatch, tmp_path):
    nan_loss_at(monkeypatch, {2, 4})  # two bad steps, not in a row: a good step between resets the count
    out = tmp_path / "nan-once"
    spo.main(FAST + ["--out", str(out), "--max-bad-steps", "2"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("skipped") for m in metrics] == [None, "non-finite loss", None, "non-finite loss"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_nan_every_step_aborts_after_max_bad_steps_keeping_checkpoints(monkeypatch, tmp_path, capsys):
    nan_loss_at(monkeypatch, None)
    out = tmp_path / "nan-always"
    with pytest.raises(SystemExit) as exit_info:
        spo.main(FAST + ["--out", str(out), "--max-bad-steps", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.splitlines()[-1].startswith("error: 3 non-finite steps in a row"), \
        f"the error must end the progress bars' line, not join it: {err[-300:]!r}"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "an aborted run must not look finished"


# ---- SDXL: two text encoders, size conditioning, candidates that run num_inner_step steps on their own ----


def test_sdxl_sampler_equals_diffusers_pipeline():
    """Our conditioning (both encoders' penultimate states, the pooled embedding, the size ids, zeros for an empty
    negative prompt) and DDIM loop against diffusers' StableDiffusionXLPipeline, with the same initial latents."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(str(D.tiny_pipeline_path("tiny-sdxl")))
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    pipe = D.Pipeline("tiny-sdxl")
    assert pipe.is_sdxl and pipe.vae_scale == 2
    prompts = ["a red cat", "the dog on the lake"]
    # cfg 1 and 5, an empty (zeroed) and a real negative prompt, a non-square size (height and width not swapped)
    for cfg_scale, negative, (h, w) in ((1.0, "", (32, 32)), (5.0, "", (32, 32)), (5.0, "a dog", (32, 48))):
        latents = torch.randn((2, 4, h // 2, w // 2), generator=torch.Generator().manual_seed(0))
        expected = ref(prompts, negative_prompt=[negative] * 2 if negative else None, num_inference_steps=6,
                       guidance_scale=cfg_scale, eta=0.0, latents=latents, height=h, width=w,
                       output_type="pt").images * 2 - 1
        cond, uncond = pipe.encode_prompts(prompts, (h, w)), pipe.encode_negative(2, (h, w), negative)
        ours = pipe.decode(D.ddim_sample(pipe, cond, uncond, latents, 6, cfg_scale))
        err = (ours.clamp(-1, 1) - expected).abs().max()
        assert err < 1e-4, f"images differ from diffusers by {err:.2e} at cfg {cfg_scale}, negative {negative!r}, {h}x{w}"


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_empty_negative_prompt_follows_the_checkpoints_force_zeros(force_zeros, tmp_path):
    """An empty negative prompt is zeros only where model_index.json says force_zeros_for_empty_prompt (SDXL base
    does); else it is the encoded "", as diffusers' encode_prompt gives it."""
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "sdxl"
    shutil.copytree(D.tiny_pipeline_path("tiny-sdxl"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": force_zeros}))
    ref = StableDiffusionXLPipeline.from_pretrained(str(folder))
    _, negative, _, negative_pooled = ref.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=True)
    pipe = D.Pipeline(str(folder))
    ours = pipe.encode_negative(1, (32, 32))
    assert (ours["text"].abs().max() == 0) == force_zeros
    # --save-merged and --benchmark hand diffusers our parts: its pipeline must treat "" as the checkpoint says
    exported = sample.diffusers_pipeline(pipe)
    assert exported.config.force_zeros_for_empty_prompt == force_zeros, "the exported pipeline lost force_zeros"
    torch.testing.assert_close(ours["text"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], negative_pooled, rtol=0, atol=1e-6)


def sdxl_reference_replay(pipe, cond, uncond, score_fn, cfg, generator):
    """The official multi_sample_pipeline_sdxl's control flow, driven by hand: a countdown of inner steps, caches of
    (x_t, x_{t-1}, t) per candidate, a judgement when the countdown hits 0 or at the last step (which never starts
    a pool). Written as the reference is, independently of spo.sample_candidate_pool's loop; returns its pairs."""
    b, k, n_inner = len(cond["text"]), cfg.k, cfg.num_inner_step
    timesteps = D.ddim_timesteps(cfg.steps)
    step = lambda eps, t, x: D.ddim_step(eps, t, x, pipe.alphas_cumprod, 1000 // cfg.steps, cfg.eta)
    randn = lambda *shape: torch.randn(shape, generator=generator)
    x = randn(b, 4, cfg.resolution // 2, cfg.resolution // 2)
    inner_left, current, nxt, ts, pairs = 0, [], [], [], []

    def collect(images, t_images):
        win, lose, valid = spo.pick_win_lose(score_fn(images, t_images.expand(k * b)).view(k, b), cfg.threshold)
        p = torch.arange(b)
        for cur, new, t in zip(current, nxt, ts):
            pairs.append(dict(x_t=cur[win, p][valid], x_t_lose=cur[lose, p][valid], win=new[win, p][valid],
                              lose=new[lose, p][valid], t=t.expand(b)[valid], prompt=p[valid]))

    for i, t in enumerate(timesteps):
        rows = torch.arange(len(x)) % b  # candidate j of prompt p sits at row j * b + p
        eps = D.predict_noise(pipe.unet, x, t.expand(len(x)), D.take(cond, rows), D.take(uncond, rows), cfg.cfg)
        x0, mean, std = step(eps, t, x)
        std = std.view(-1, 1, 1, 1)
        if (i >= cfg.divert_start_step and inner_left == 0) or i == len(timesteps) - 1:
            inner_left = n_inner
            if i == cfg.divert_start_step:
                children = mean[None] + std[None] * randn(k, *mean.shape)
                current, nxt, ts = [x.expand(k, *x.shape)], [children], [t]
                x = children.flatten(0, 1)
            elif i != len(timesteps) - 1:
                collect(pipe.decode(x0), t)
                pick = torch.randint(0, k, (b,), generator=generator) * b + torch.arange(b)
                children = mean[pick][None] + std[pick][None] * randn(k, b, *mean.shape[1:])
                current, nxt, ts = [x[pick].expand(k, b, *x.shape[1:])], [children], [t]
                x = children.flatten(0, 1)
            else:  # the last step: every candidate goes on alone, and the final images are judged at t = 0
                new = mean + std * randn(*mean.shape)
                current, nxt, ts = current + [x.view(k, b, *x.shape[1:])], nxt + [new.view(k, b, *x.shape[1:])], ts + [t]
                collect(pipe.decode(new), torch.zeros_like(t))
        else:
            new = mean + std * randn(*mean.shape)
            if i >= cfg.divert_start_step:
                inner_left -= 1
                current, nxt, ts = current + [x.view(k, b, *x.shape[1:])], nxt + [new.view(k, b, *x.shape[1:])], ts + [t]
            x = new
    return {key: torch.cat([p[key] for p in pairs]) for key in pairs[0]}


@pytest.mark.parametrize("num_inner_step", [3, 0])
def test_sdxl_pairs_match_a_hand_driven_replay(num_inner_step):
    """20 steps, candidates branch at steps 4, 8, 12, 16 and run 3 steps on their own: every transition of the
    winner's and the loser's chunk is a pair with its own parent x_t and the timestep it was taken at."""
    pipe = D.Pipeline("tiny-sdxl")
    cfg = spo.Config(model="tiny-sdxl", steps=20, divert_start_step=4, k=2, num_inner_step=num_inner_step,
                     pool_at_last_step=False, cfg=5.0, eta=1.0, threshold=0.2, resolution=16)
    prompts = ["a red cat", "the dog", "a beautiful lake"]
    cond, uncond = pipe.encode_prompts(prompts, (16, 16)), pipe.encode_negative(3, (16, 16))
    # Prompts 0 and 1 pass the threshold at every pool, so every chunk (the last, judged at t = 0, too) is paired;
    # prompt 2 rarely does, so the threshold's mask is tested too.
    factor = torch.tensor([10000.0, 10000.0, 30.0]).repeat(2)  # sample-major: (k * b,)
    score_fn = lambda images, t: factor * images.float().mean(dim=(1, 2, 3)) * (1 + t.float() / 1000)
    pairs, scores = spo.sample_candidate_pool(pipe, pipe.unet, cond, uncond, score_fn, cfg,
                                              torch.Generator().manual_seed(7))
    expected = sdxl_reference_replay(pipe, cond, uncond, score_fn, cfg, torch.Generator().manual_seed(7))
    pools = spo.pool_steps(cfg)
    assert pools == ([4, 8, 12, 16] if num_inner_step == 3 else list(range(4, 19)))
    assert len(scores) == 2 * 3 * len(pools), "one judgement per pool, each of k * b candidates"
    assert len(expected["t"]) < 3 * 16, "the threshold should drop some pairs, or the valid mask goes untested"
    # Every step from 4 on is paired (with no inner steps, the last pool's members differ by one small step's noise
    # alone, too little for the threshold: its two transitions, t = 51 and 1, are not)
    paired = D.ddim_timesteps(20)[4:] if num_inner_step == 3 else D.ddim_timesteps(20)[4:-2]
    assert set(paired.tolist()) <= set(expected["t"].tolist()), "some pool's chunk is never paired: test it harder"
    for key in ("x_t", "x_t_lose", "win", "lose", "t"):
        assert torch.equal(pairs[key], expected[key]), f"pairs differ from the replay in {key}"
    inner = pairs["x_t_lose"].ne(pairs["x_t"]).flatten(1).any(1)
    timesteps = D.ddim_timesteps(20)
    first_of_chunk = torch.isin(pairs["t"], timesteps[pools])
    assert torch.equal(inner, ~first_of_chunk), "only a pool's first transition shares its parent"
    for key, value in D.take(cond, expected["prompt"]).items():
        assert torch.equal(pairs[key], value), f"pairs carry another prompt's {key}"


class HostSyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make the host wait for the device: a tensor read as a Python number or bool, and the
    ops whose output size depends on the data (nonzero, boolean-mask indexing)."""
    aten = torch.ops.aten
    SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func.overloadpacket in (self.aten.index, self.aten.index_put, self.aten.index_put_) and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in args[1])
        self.count += func.overloadpacket in self.SYNCING or masked
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_sampler_step_loop_never_waits_for_the_device(model):
    """On a GPU a host-device sync inside the step loop stalls the kernel queue at every step. The sampler may
    sync once it is done (choosing the kept pairs), so the count must not grow with the number of steps."""
    pipe, counts = D.Pipeline(model), []
    spm = pm.load_preference_model("spm", "tiny", "tiny", "tiny")
    prompts = ["a red cat", "the dog"]
    cond, uncond = pipe.encode_prompts(prompts, (16, 16)), pipe.encode_negative(2, (16, 16))
    for steps in (8, 16):
        cfg = spo.Config(model=model, steps=steps, divert_start_step=2, k=2, threshold=0.0, resolution=16,
                         num_inner_step=1 if model == "tiny-sdxl" else 0)
        with HostSyncCounter() as counter:
            spo.sample_candidate_pool(pipe, pipe.unet, cond, uncond, spo.make_score_fn(spm, prompts, 2), cfg,
                                      torch.Generator().manual_seed(0))
        counts.append(counter.count)
    assert counts[0] == counts[1], f"host-device syncs grow with the steps: {counts[0]} in 8 steps, {counts[1]} in 16"


FAST_XL = ["--model", "tiny-sdxl", "--steps", "8", "--divert-start-step", "2", "--resolution", "16",
           "--sample-batch-size", "2", "--train-batch-size", "4", "--epochs", "2"]


class SignalDuring:
    """The tiny SPM, sending this process SIGTERM while it judges the n-th pool: a preemption during SAMPLING."""

    def __init__(self, n):
        self.spm, self.n = pm.load_preference_model("spm", "tiny", "tiny", "tiny"), n

    def __getattr__(self, name):
        return getattr(self.spm, name)

    def judge(self, *args, **kwargs):
        self.n -= 1
        if self.n == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.spm.judge(*args, **kwargs)


@torch.no_grad()
def sdxl_unet_out(unet, io):
    return unet(io["sample"], io["timestep"], io["encoder_hidden_states"], added_cond_kwargs=io["added_cond_kwargs"]).sample


def sdxl_unet_io():
    return dict(sample=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), timestep=torch.tensor([501]),
                encoder_hidden_states=torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1)),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])})


@pytest.mark.parametrize("num_inner_step", ["3", "0"])
def test_sdxl_spo_runs_resume_exactly_and_the_lora_loads_in_diffusers(num_inner_step, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    args = ["--num-inner-step", num_inner_step] + FAST_XL  # the epochs last
    ref = tmp_path / "ref"
    spo.main(args + ["--out", str(ref)])
    metrics = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    # 8 steps from step 2 on: at most 6 pairs per prompt, 12 per batch of 2, in steps of up to 4 pairs
    assert metrics and all(0 < m["pairs"] <= 4 and m["pairs_kept"] <= 12 and math.isfinite(m["loss"]) for m in metrics)
    out = tmp_path / "resumed"
    if num_inner_step == "3":  # stopped while sampling batch 1 (2 judgements per batch): the checkpoint keeps its pairs
        cfg = spo.parse_args(args[:-1] + ["1", "--out", str(out)])
        assert spo.train(cfg, scorer=SignalDuring(3)) is None, "the signal must stop the run"
        pending = load_file(str(spo.checkpoint_dirs(out)[-1] / "pending_pairs.safetensors"))
        assert {"x_t", "x_t_lose", "t", "win", "lose", "text", "pooled", "time_ids", "perm"} <= set(pending)
    else:  # stopped at the end of epoch 0, with gradient checkpointing, which must not change the numbers
        cfg = spo.parse_args(args[:-1] + ["1", "--out", str(out), "--gradient-checkpointing"])
        assert spo.setup_models(cfg).pipe.unet.is_gradient_checkpointing
        spo.main(args[:-1] + ["1", "--out", str(out), "--gradient-checkpointing"])
    spo.main(args + ["--out", str(out), "--resume"])
    assert_same_run(ref, out)

    # The trained LoRA in diffusers' SDXL pipeline: the UNet computes what ours computes with it.
    pipe = StableDiffusionXLPipeline.from_pretrained(str(D.tiny_pipeline_path("tiny-sdxl")))
    io = sdxl_unet_io()
    base = sdxl_unet_out(pipe.unet, io)
    pipe.load_lora_weights(str(ref))
    ours = D.Pipeline("tiny-sdxl").unet
    D.inject_lora(ours, 4, 4)
    D.load_lora(ours, ref / "pytorch_lora_weights.safetensors")
    assert not torch.allclose(sdxl_unet_out(pipe.unet, io), base), "diffusers must attach the trained LoRA"
    torch.testing.assert_close(sdxl_unet_out(pipe.unet, io), sdxl_unet_out(ours, io), rtol=0, atol=1e-5)


def test_sdxl_sample_compare_and_merged_pipeline_render_base_plus_lora(tmp_path, capsys):
    """sample.py on the tiny SDXL model with a LoRA in our layout: --compare writes base and LoRA images, and the
    --save-merged folder, rendered by diffusers' StableDiffusionXLPipeline, equals our base + LoRA image."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = D.Pipeline("tiny-sdxl")
    torch.manual_seed(0)
    D.inject_lora(pipe.unet, 4, 4)
    for layer in D.lora_layers(pipe.unet):
        torch.nn.init.normal_(layer.lora.up.weight, std=0.05)
    lora = tmp_path / "lora.safetensors"
    D.save_lora(pipe.unet, lora)
    merged, out = tmp_path / "merged", tmp_path / "out"
    sample.main(["--model", "tiny-sdxl", "--lora", str(lora), "--prompt", "a red cat", "--steps", "4", "--compare",
                 "--out", str(out), "--save-merged", str(merged)])
    assert len(list(out.glob("*-lora.png"))) == 1 and len(list(out.glob("*-base.png"))) == 1
    ref = StableDiffusionXLPipeline.from_pretrained(str(merged))
    assert isinstance(ref.scheduler, DDIMScheduler), "the merged folder should carry the DDIM scheduler"
    ref.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(5)
    theirs = ref(["a red cat"], num_inference_steps=4, guidance_scale=5.0, height=32, width=32, generator=gen,
                 output_type="pt").images * 2 - 1
    ours = sample.generate(pipe, ["a red cat"], [5], 4, 5.0, 0.0, 32, 32)
    with D.lora_disabled(pipe.unet):
        base = sample.generate(pipe, ["a red cat"], [5], 4, 5.0, 0.0, 32, 32)
    assert (ours.clamp(-1, 1) - theirs).abs().max() < 1e-4, "the merged SDXL pipeline must render base + LoRA"
    assert (ours - base).abs().max() > 1e-3, "the LoRA should change the image"


def test_spm_training_runs_on_the_sdxl_pipeline(dataset, tmp_path):
    """`preference_model.py train --model tiny-sdxl`: the noisy x0-predictions come from the SDXL UNet, which needs
    the pooled embedding and size ids (it raises without them)."""
    out = tmp_path / "spm-xl"
    code = pm.main(["train", "--model", "tiny-sdxl", "--data", str(dataset), "--out", str(out), "--resolution", "16",
                    "--max-steps", "2", "--eval-every", "2", "--batch-size", "8", "--eval-timesteps", "0", "501"])
    assert code == 0 and (out / "spm.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert set(records[-1]["accuracy"]) == {"0", "501"}
    # The SDXL presets train on PickScore's labels (threshold 0.1); evaluation leaves out what PickScore calls a tie.
    assert json.loads((out / "config.json").read_text())["pickscore_labels"] == 0.1
    assert records[-1]["pairs"] < 64, "PickScore's ties should be left out of the validation accuracy"


def test_pickscore_labels_follow_pickscore_on_the_full_size_images(dataset):
    from PIL import Image
    import pyarrow.parquet as pq

    stub = lambda images, prompts: torch.tensor([0.0, math.log(3)])  # softmax (0.25, 0.75): p_1 - p_0 = 0.5
    assert pm.pickscore_labeller(stub, 0.4)("a cat", None, None) == (0.0, 1.0)
    assert pm.pickscore_labeller(stub, 0.6)("a cat", None, None) == (0.5, 0.5), "below the threshold: a tie"
    equal = lambda images, prompts: torch.tensor([1.0, 1.0])  # p_0 - p_1 = 0 does not exceed 0
    assert pm.pickscore_labeller(equal, 0.0)("a cat", None, None) == (0.5, 0.5), "equal scores: a tie, even at 0"
    pickscore = pm.PickScoreOnImages("tiny", "tiny")
    units = pm.row_groups(pm.find_shards(str(dataset), pm.SPLITS["validation"]))
    sizes = []
    record = lambda caption, *images: sizes.append([image.size for image in images]) or (1.0, 0.0)
    next(pm.read_rows(units, 16, True, labeller=record))
    assert sizes == [[(32, 32), (32, 32)]], f"the labeller must see the full-size 32 x 32 images, saw {sizes}"
    rows = list(pm.read_rows(units, 16, True, labeller=pm.pickscore_labeller(pickscore, 0.0)))
    table = pq.read_table(next(dataset.glob("validation_unique-*.parquet"))).to_pylist()
    table = [r for r in table if r["has_label"]]
    assert len(rows) == len(table) == 64
    human = [(r["label_0"], r["label_1"]) for r in table]
    ours = [(row[3], row[4]) for row in rows]
    assert ours != human, "the labels must be PickScore's, not the humans'"
    for row, r in zip(rows, table):
        s0, s1 = pickscore([Image.open(io.BytesIO(r[c])).convert("RGB") for c in ("jpg_0", "jpg_1")], [r["caption"]])
        assert (row[3], row[4]) == ((1.0, 0.0) if s0 > s1 else (0.0, 1.0)), "the label must follow PickScore's ranking"


def test_sdxl_random_init_needs_no_download_even_with_a_vae_preset(tmp_path, monkeypatch):
    """--random-init builds every part, the VAE included (the preset's --vae is a hub id: no download offline),
    and leaves no temporary folder behind (each run left its tokenizers' folder in /tmp)."""
    __import__("diffusers")  # imported first, it makes torch's compile cache folder in the temporary folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pipe = D.Pipeline(D.PRESETS["sdxl"]["pretrained"], device="meta", random_init="sdxl", vae="/nonexistent/vae")
    assert pipe.is_sdxl and pipe.vae.config.scaling_factor == 0.13025
    assert pipe.tokenizer_2("a red cat").input_ids, "the tokenizers must outlive their folder"
    pm.load_preference_model("spm", None, None, None, device="meta", random_init=True)
    assert list(tmp_path.iterdir()) == [], "--random-init left files in the temporary folder"


class Exploit:
    """Unpickling this would run code: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("force_upcast", [True, False])
def test_an_sdxl_vae_that_asks_for_upcast_runs_in_fp32(force_upcast, tmp_path):
    folder = tmp_path / "sdxl"
    shutil.copytree(D.tiny_pipeline_path("tiny-sdxl"), folder)
    path = folder / "vae" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), force_upcast=force_upcast)))
    pipe = D.Pipeline(str(folder), dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    assert pipe.vae.dtype == (torch.float32 if force_upcast else torch.bfloat16)


@pytest.mark.parametrize("key, value", [("shift_factor", 0.1), ("latents_mean", [0.0] * 4)])
def test_a_vae_with_latent_statistics_is_refused(key, value, tmp_path):
    """diffusers' SDXL pipeline decodes z * latents_std / scaling_factor + latents_mean (and SD3 adds a shift_factor)
    where a VAE declares them; our decode and the SPM's encode apply scaling_factor only."""
    folder = tmp_path / "sdxl"
    shutil.copytree(D.tiny_pipeline_path("tiny-sdxl"), folder)
    path = folder / "vae" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **{key: value})))
    with pytest.raises(D.UserError) as err:
        D.Pipeline(str(folder))
    assert str(err.value) == (f"--pretrained {folder}: its VAE sets {key}, which SD1.5 and SDXL VAEs do not and "
                              "this code does not apply"), str(err.value)
    with pytest.raises(D.UserError, match=f"^--vae {folder / 'vae'}: its VAE sets {key}"):
        D.Pipeline("tiny-sdxl", vae=str(folder / "vae"))


# ---- spo.py on several ranks: torchrun with gloo on the CPU ----

DDP_RUN = """
import os, sys
from pathlib import Path
sys.path.insert(0, {project!r})
import torch
import diffusion, spo
torch.set_num_threads(1)
rank, world = spo.setup_distributed()
cfg = spo.parse_args(sys.argv[1:])
trained, real_step = [], spo.train_micro_batch
def recording_step(pipe, policy, reference, micro, *args):  # each pair this rank trains on, by its winner's sum
    trained.extend(micro["win"].double().flatten(1).sum(1).tolist())
    return real_step(pipe, policy, reference, micro, *args)
spo.train_micro_batch = recording_step
seeds, real_pool = [], spo.sample_candidate_pool
def recording_pool(*args):  # the seed of each prompt batch's sampling noise
    seeds.append(args[-1].initial_seed())
    return real_pool(*args)
spo.sample_candidate_pool = recording_pool
Path(cfg.out + f".pid{{rank}}").write_text(str(os.getpid()))  # so a test can signal one rank
spo.dist.barrier()
pipe = spo.train(cfg, rank=rank, world=world)
if pipe is not None:  # every rank's LoRA, to compare them, and the pairs it trained on
    diffusion.save_lora(pipe.unet, cfg.out + f".rank{{rank}}.safetensors")
    Path(cfg.out + f".pairs{{rank}}.txt").write_text(repr(trained))
    Path(cfg.out + f".seeds{{rank}}.txt").write_text(repr(seeds))
spo.dist.destroy_process_group()
"""


def torchrun(tmp_path, nproc, args, **popen):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_RUN.format(project=str(Path(__file__).resolve().parent)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, **popen)


DDP_ARGS = FAST + ["--train-batch-size", "2", "--grad-accum", "2"]  # groups that span prompt batches, too


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One uninterrupted two-rank run."""
    tmp = tmp_path_factory.mktemp("ddp")
    proc = torchrun(tmp, 2, DDP_ARGS + ["--out", str(tmp / "run")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return tmp / "run"


def test_two_ranks_train_to_identical_loras(ddp_run):
    rank0, rank1 = (load_file(f"{ddp_run}.rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "DDP ranks ended with different LoRA weights"
    metrics = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["pairs"] <= 2 * 2 * 2 for m in metrics), "an update: 2 micro-batches of 2 pairs per rank"
    pairs0, pairs1 = (eval(Path(f"{ddp_run}.pairs{r}.txt").read_text()) for r in (0, 1))
    assert pairs0 and len(pairs0) == len(pairs1), "the ranks must train on equally many pairs"
    assert not set(pairs0) & set(pairs1), "the ranks must train on different shares of the pooled pairs"
    seeds0, seeds1 = (eval(Path(f"{ddp_run}.seeds{r}.txt").read_text()) for r in (0, 1))
    assert len(seeds0) == 2 and not set(seeds0) & set(seeds1), "each rank must sample its prompts with its own noise"


def test_world_size_1_equals_the_single_process_run(tmp_path):
    spo.main(FAST + ["--out", str(tmp_path / "single")])
    proc = torchrun(tmp_path, 1, FAST + ["--out", str(tmp_path / "world1")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert_same_run(tmp_path / "single", tmp_path / "world1")


def test_a_run_folder_in_use_stops_every_rank_with_the_same_line(ddp_run, tmp_path):
    """Rank 0 holds the lock; had only it stopped, rank 1 would die in the barrier with a dead-peer traceback."""
    out = tmp_path / "run"
    shutil.copytree(ddp_run, out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "spo.py", *DDP_ARGS,
           "--out", str(out), "--resume"]
    with D.run_folder_lock(out):
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    output = proc.stdout
    line = f"error: --out {out} is in use by another run that is still going"
    codes = re.findall(r"exitcode: (-?\d+)", output)  # torchrun's report of each failed rank
    assert output.count(line) == 2 and codes and set(codes) == {"2"}, output[-3000:]


def test_sigterm_to_one_rank_stops_all_and_resume_under_torchrun_is_exact(ddp_run, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(tmp_path, 2, DDP_ARGS + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 200
    while not ((out / "metrics.jsonl").exists() and Path(f"{out}.pid1").exists()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(int(Path(f"{out}.pid1").read_text()), signal.SIGTERM)  # rank 1 only
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "--resume" in output and spo.checkpoint_dirs(out), "rank 0 must write the checkpoint and say how to resume"
    assert not Path(f"{out}.rank0.safetensors").exists(), "the run must have stopped before its end"
    proc = torchrun(tmp_path, 2, DDP_ARGS + ["--out", str(out), "--resume"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert_same_run(ddp_run, out)


EXCHANGE = """
import sys
sys.path.insert(0, {project!r})
import torch, spo
rank, world = spo.setup_distributed()
for counts in [(0, 3), (0, 0), (2, 5)]:
    n = counts[rank]
    pairs = dict(t=torch.arange(n) + 100 * rank, x_t=torch.full((n, 4, 2, 2), float(rank)))
    got = spo.exchange_pairs(pairs, world)
    expected_t = torch.cat([torch.arange(c) + 100 * r for r, c in enumerate(counts)])
    assert torch.equal(got["t"], expected_t), (rank, counts, got["t"])
    assert got["x_t"].shape == (sum(counts), 4, 2, 2)
print("rank", rank, "ok")
spo.dist.destroy_process_group()
"""


def test_pair_exchange_with_uneven_and_empty_ranks(tmp_path):
    """Ranks with (0, n) and (0, 0) kept pairs neither hang nor crash; all get every pair in rank order."""
    script = tmp_path / "exchange.py"
    script.write_text(EXCHANGE.format(project=str(Path(__file__).resolve().parent)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 2


# ---- sample.py: the sampler against diffusers, LoRA files in every layout, exports, grids, eval ----

import sample  # noqa: E402

PIPELINE = GOLDEN / "pipeline"  # a tiny SD1.5-shaped pipeline whose UNet is lora/unet_base
# The golden pipeline through the tiny preset, few steps: each run takes about a second.
GOLDEN_RUN = ["--model", "tiny", "--pretrained", str(PIPELINE), "--height", "16", "--width", "16", "--steps", "3"]


@pytest.fixture(scope="module", autouse=True)
def tiny_models(spo_cache):
    """Built before any test runs, so that no test's stderr holds the one-time 'built ...' line."""
    D.tiny_pipeline_path()
    pm.tiny_spm_paths()


@pytest.fixture(scope="module")
def lora_io():
    return load_file(str(LORA / "lora_io.safetensors"))


def base_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(LORA / "unet_base")).eval()


def diffusers_pipeline(path=PIPELINE):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, prompts, seeds, steps, cfg, eta=0.0):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, eta=eta, height=16, width=16,
                generator=generators, output_type="pt").images * 2 - 1


# ---- the sampler: sample.py's generate path equals diffusers' pipeline ----


@pytest.mark.parametrize("cfg,eta", [(1.0, 0.0), (5.0, 0.0), (5.0, 1.0)])
def test_generate_equals_diffusers_pipeline_for_the_same_seeds(golden_pipe, cfg, eta):
    """Same seeds, same noise: diffusers draws each image's latents (and with eta > 0 its step noise) from that
    image's generator, and so does generate(); with cfg 1 there is no guidance, with 5 it is batched."""
    prompts, seeds = ["a red cat", "the dog on the lake"], [3, 11]  # not consecutive: seeds[i], not seeds[0] + i
    expected = diffusers_images(diffusers_pipeline(), prompts, seeds, 6, cfg, eta)
    ours = sample.generate(golden_pipe, prompts, seeds, 6, cfg, eta, 16, 16)
    diff = (ours.clamp(-1, 1) - expected).abs().max().item()
    assert diff < 1e-4, f"images differ from diffusers by {diff} at cfg {cfg}, eta {eta}"
    alone = sample.generate(golden_pipe, prompts[1:], seeds[1:], 6, cfg, eta, 16, 16)
    assert (alone - ours[1:]).abs().max() < 1e-5, "an image must not depend on the batch it is rendered in"


# The released checkpoints' own schedulers (their scheduler_config.json): SD1.5 and the merged SPO SD1.5 ship PNDM,
# SDXL base ships Euler. The official inference scripts sample with these, not with DDIM.
RELEASED_SCHEDULERS = {
    "tiny": dict(_class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                 clip_sample=False, num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False,
                 skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", trained_betas=None),
    "tiny-sdxl": dict(_class_name="EulerDiscreteScheduler", beta_end=0.012, beta_schedule="scaled_linear",
                      beta_start=0.00085, clip_sample=False, interpolation_type="linear", num_train_timesteps=1000,
                      prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
                      steps_offset=1, timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False),
}


def with_released_scheduler(model, folder):
    """A copy of the tiny pipeline folder whose scheduler is the released checkpoints' (model_index.json too)."""
    shutil.copytree(D.tiny_pipeline_path(model), folder)
    config = RELEASED_SCHEDULERS[model]
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, scheduler=["diffusers", config["_class_name"]])))
    return folder


def test_a_scheduler_config_our_ddim_does_not_implement_is_refused(tmp_path):
    """diffusers' DDIM (and so the official code) would clip x0 or space the steps otherwise: not silently ignored."""
    folder = tmp_path / "pipe"
    shutil.copytree(D.tiny_pipeline_path("tiny-sdxl"), folder)  # SDXL: no pipeline corrects clip_sample (below)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), clip_sample=True, timestep_spacing="trailing")))
    with pytest.raises(UserError, match="asks DDIM for clip_sample=True, timestep_spacing='trailing'"):
        D.Pipeline(str(folder))
    assert D.Pipeline(str(folder), ddim=False).scheduler.config.clip_sample  # --scheduler checkpoint: diffusers'
    index = json.loads((folder / "model_index.json").read_text())
    for entry in ("DDIMScheduler", ["diffusers"], ["diffusers", "UNet2DConditionModel"], ["x", "NoSuchScheduler"]):
        (folder / "model_index.json").write_text(json.dumps(dict(index, scheduler=entry)))
        with pytest.raises(UserError, match="names no diffusers scheduler"):
            D.Pipeline(str(folder), ddim=False)


def test_an_outdated_sd1_scheduler_config_is_corrected_as_diffusers_pipeline_does(tmp_path, capsys):
    """steps_offset 0 and clip_sample on in an SD1.x folder: diffusers' StableDiffusionPipeline, which the official
    train_spo.py loads (then DDIMScheduler.from_config of its scheduler), corrects both, and so must we. SDXL's
    pipeline corrects nothing, and there spo.py refuses steps_offset 0: the last step, t = 0 -> 0, has no noise."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = tmp_path / "sd"
    shutil.copytree(GOLDEN / "pipeline", folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), steps_offset=0, clip_sample=True)))
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    pipe = D.Pipeline(str(folder))
    prompts = ["a red cat", "the dog on the lake"]
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond, uncond = pipe.encode_prompts(prompts, (16, 16)), pipe.encode_negative(2, (16, 16))
    expected = ref(prompts, num_inference_steps=6, guidance_scale=5.0, eta=0.0, latents=latents, height=16, width=16,
                   output_type="pt").images * 2 - 1
    ours = pipe.decode(D.ddim_sample(pipe, cond, uncond, latents, 6, 5.0))
    assert (ours.clamp(-1, 1) - expected).abs().max() < 1e-4, "images differ from diffusers' corrected pipeline"
    assert D.ddim_timesteps(6, 1000, pipe.steps_offset)[-1] == 1

    sdxl = tmp_path / "sdxl"
    shutil.copytree(D.tiny_pipeline_path("tiny-sdxl"), sdxl)
    path = sdxl / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), steps_offset=0)))
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        spo.main(["--model", "tiny-sdxl", "--pretrained", str(sdxl), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and err.startswith("error: ") and "steps_offset 0" in err, err
    assert not out.exists(), "a refused run must leave nothing"


def test_a_scheduler_config_that_leaves_out_steps_offset_reads_as_diffusers_pipeline_reads_it(tmp_path):
    """A config file without steps_offset gets the class default, 0, which the pipeline corrects to 1 in place; a
    DDIMScheduler.from_config of the corrected config then takes the default again, as in the official
    train_spo.py. Both our schedulers must follow."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = with_released_scheduler("tiny", tmp_path / "pipe")
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "steps_offset"}))
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    settings = lambda config: {k: v for k, v in config.items() if k != "_diffusers_version"}
    ours = D.Pipeline(str(folder), ddim=False).scheduler.config  # --scheduler checkpoint
    assert settings(ours) == settings(ref.scheduler.config)
    assert ref.scheduler.config.steps_offset == 1
    assert D.Pipeline(str(folder)).steps_offset == DDIMScheduler.from_config(ref.scheduler.config).config.steps_offset


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_scheduler_checkpoint_samples_as_diffusers_pipeline_with_the_checkpoints_scheduler(model, tmp_path):
    """--scheduler checkpoint: the folder's own PNDM (SD1.5) or Euler (SDXL) scheduler, stepped as diffusers'
    pipeline does, reproduces the official inference scripts' pipeline call; DDIM does not."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    folder = with_released_scheduler(model, tmp_path / "pipe")
    ref = DiffusionPipeline.from_pretrained(str(folder))
    ref.set_progress_bar_config(disable=True)
    pipe = D.Pipeline(str(folder), ddim=False)
    name = RELEASED_SCHEDULERS[model]["_class_name"]
    assert type(pipe.scheduler).__name__ == name == type(ref.scheduler).__name__
    prompts, seeds = ["a red cat", "the dog on the lake"], [3, 11]  # not consecutive: seeds[i], not seeds[0] + i
    for cfg in (1.0, 5.0):
        expected = ref(prompts, num_inference_steps=6, guidance_scale=cfg, height=32, width=32, output_type="pt",
                       generator=[torch.Generator().manual_seed(s) for s in seeds]).images * 2 - 1
        ours = sample.generate(pipe, prompts, seeds, 6, cfg, 0.0, 32, 32, scheduler=pipe.scheduler)
        err = (ours.clamp(-1, 1) - expected).abs().max().item()
        assert err < 1e-4, f"{name} images differ from diffusers' pipeline by {err:.2e} at cfg {cfg}"
        ddim = sample.generate(pipe, prompts, seeds, 6, cfg, 0.0, 32, 32)
        assert (ddim.clamp(-1, 1) - expected).abs().max() > 1e-3, "DDIM should not reproduce another scheduler"
    if model == "tiny":  # the command line: the PNG holds that image, records the scheduler and remakes itself
        out = tmp_path / "cat.png"
        sample.main(["--model", "tiny", "--pretrained", str(folder), "--scheduler", "checkpoint", "--prompt",
                     "a red cat", "--seed", "3", "--steps", "6", "--cfg", "5", "--out", str(out)])
        png = Image.open(out)
        assert png.text["sampler"] == name and "--scheduler=checkpoint" in png.text["command"]
        pixels = torch.tensor(list(png.getdata()), dtype=torch.float32).T.reshape(3, 32, 32) / 127.5 - 1
        assert (pixels - expected[0]).abs().max() <= 1.01 / 127.5, f"the PNG should hold the {name} image"


def test_scheduler_checkpoint_names_the_scheduler_only_for_its_own_errors(monkeypatch):
    """A scheduler that cannot run in our loop is one line naming it; an error raised outside diffusers'
    schedulers (a bug of ours, here in the guidance) keeps its own type and traceback."""
    pipe = D.Pipeline("tiny", ddim=False)
    in_a_scheduler = {}  # a function whose code lives in a file of a "schedulers" folder, as diffusers' do
    exec(compile("def step(*args, **kwargs):\n    raise ValueError('needs another loop')\n",
                 str(Path("diffusers", "schedulers", "scheduling_fake.py")), "exec"), in_a_scheduler)
    monkeypatch.setattr(pipe.scheduler, "step", in_a_scheduler["step"])
    with pytest.raises(UserError, match="cannot sample 2 steps in this loop .ValueError: needs another loop"):
        sample.generate(pipe, ["a cat"], [0], 2, 5.0, 0.0, 32, 32, scheduler=pipe.scheduler)

    def guidance_with_a_bug(*args):
        raise TypeError("ours")
    monkeypatch.setattr(sample, "predict_noise", guidance_with_a_bug)
    with pytest.raises(TypeError, match="ours"):
        sample.generate(pipe, ["a cat"], [0], 2, 5.0, 0.0, 32, 32, scheduler=pipe.scheduler)


def test_a_flow_matching_checkpoint_scheduler_is_refused_before_the_exports(tmp_path, capsys):
    """A scheduler without init_noise_sigma and scale_model_input cannot run StableDiffusionPipeline's loop: it
    ended in a traceback, after --export-webui had written its file."""
    folder = tmp_path / "pipe"
    shutil.copytree(D.tiny_pipeline_path("tiny"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, scheduler=["diffusers",
                                                                              "FlowMatchEulerDiscreteScheduler"])))
    webui = tmp_path / "w.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--model", "tiny", "--pretrained", str(folder), "--scheduler", "checkpoint", "--lora",
                     str(LORA / "pytorch_lora_weights.safetensors"), "--export-webui", str(webui), "--prompt", "a cat",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == ("error: --scheduler checkpoint: FlowMatchEulerDiscreteScheduler is not "
                                                 "a noise-prediction scheduler that StableDiffusionPipeline's loop "
                                                 "can step (a flow-matching one?)"), err
    assert not webui.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "TCDScheduler"])
def test_a_stochastic_checkpoint_scheduler_draws_each_images_noise_from_its_own_generator(name):
    """Euler ancestral and TCD draw fresh noise at every step: as diffusers' pipeline with a generator per image,
    image i's step noise comes from generator i, so an image is the same alone as in a batch. diffusers' pipeline
    also passes eta=0 to a step that takes one: TCD's own default, 0.3, gave other images."""
    import diffusers
    from diffusers import DiffusionPipeline

    folder = str(D.tiny_pipeline_path("tiny"))
    ref = DiffusionPipeline.from_pretrained(folder)
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    pipe = D.Pipeline(folder, ddim=False)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    prompts, seeds = ["a red cat", "the dog on the lake"], [3, 11]
    expected = ref(prompts, num_inference_steps=6, guidance_scale=5.0, height=32, width=32, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images * 2 - 1
    ours = sample.generate(pipe, prompts, seeds, 6, 5.0, 0.0, 32, 32, scheduler=pipe.scheduler)
    err = (ours.clamp(-1, 1) - expected).abs().max().item()
    assert err < 1e-4, f"{name} images differ from diffusers' pipeline by {err:.2e}"
    alone = sample.generate(pipe, prompts[1:], seeds[1:], 6, 5.0, 0.0, 32, 32, scheduler=pipe.scheduler)
    assert (alone - ours[1:]).abs().max() < 1e-5, "an image must not depend on the batch it is rendered in"


# ---- LoRA files: every layout, applied or merged ----


def test_golden_lora_loads_and_reproduces_the_golden_unet_output(lora_io):
    unet = base_unet()
    base = unet_out(unet, lora_io)
    modules = sample.load_lora_modules(str(LORA), unet)  # the folder: finds pytorch_lora_weights.safetensors
    assert len(modules) == 32 and {(d.shape[0], a) for d, _, a in modules.values()} == {(4, 4.0)}, (
        "expected 32 layers of rank 4 with alpha = rank (the official file stores no alpha)")
    with D.lora_merged(unet, modules):
        merged = unet_out(unet, lora_io)
    assert torch.equal(unet_out(unet, lora_io), base), "leaving lora_merged must restore the exact base weights"
    down, up, alpha = next(iter(modules.values()))
    failing = {**modules, "mid_block.attentions.0.proj_in": (down, up, alpha)}  # merged layers first, then a misfit
    with pytest.raises(RuntimeError), D.lora_merged(unet, failing):
        pass
    assert torch.equal(unet_out(unet, lora_io), base), "a merge that fails midway must restore what it changed"
    D.apply_lora(unet, modules)
    torch.testing.assert_close(unet_out(unet, lora_io), lora_io["out_lora"], rtol=0, atol=1e-4,
                               msg=lambda m: f"applied golden LoRA differs from the golden output: {m}")
    torch.testing.assert_close(merged, lora_io["out_lora"], rtol=0, atol=1e-4,
                               msg=lambda m: f"merged golden LoRA differs from the golden output: {m}")


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_webui_export_round_trips_and_diffusers_loads_it_alike(tmp_path, lora_io, alpha):
    """alpha 8 with rank 4 doubles the branch: diffusers must read the .alpha entries as we write them."""
    unet = base_unet()
    modules = {n: (d, u, alpha) for n, (d, u, _) in sample.load_lora_modules(str(LORA), unet).items()}
    path = tmp_path / "spo_webui.safetensors"
    D.save_lora_webui(modules, path, unet)
    keys = load_file(str(path))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys), "webui keys must be lora_unet_<path>.lora_down/lora_up.weight and .alpha"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in keys
    back = sample.load_lora_modules(str(path), unet)
    assert back.keys() == modules.keys(), "webui names did not map back to the same modules"
    for name, (down, up, a) in modules.items():
        assert torch.equal(back[name][0], down) and torch.equal(back[name][1], up) and back[name][2] == a, name
    D.apply_lora(unet, modules)
    ours = unet_out(unet, lora_io)
    pipe = diffusers_pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    torch.testing.assert_close(unet_out(pipe.unet, lora_io), ours, rtol=0, atol=1e-4,
                               msg=lambda m: f"diffusers' loader reads our webui file differently: {m}")
    if alpha == 4.0:
        torch.testing.assert_close(ours, lora_io["out_lora"], rtol=0, atol=1e-4)


def test_alpha_is_read_wherever_the_file_declares_it(tmp_path):
    """PEFT layout with adapter_config.json, and our save_lora's diffusers metadata header: both give alpha 8."""
    unet = base_unet()
    official = load_file(str(LORA / "pytorch_lora_weights.safetensors"))
    peft = {k.removeprefix("unet.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
            for k, v in official.items()}
    peft_keys = json.loads((LORA / "lora_keys.json").read_text())["peft_state_dict_keys_before_conversion"]
    assert sorted(peft) == sorted(peft_keys), "the PEFT layout here must be PEFT's real key names"
    (tmp_path / "peft").mkdir()
    save_file(peft, tmp_path / "peft" / "adapter_model.safetensors")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    from_peft = sample.load_lora_modules(str(tmp_path / "peft"), unet)
    reference = sample.load_lora_modules(str(LORA), unet)
    assert all(torch.equal(from_peft[n][1], reference[n][1]) and from_peft[n][2] == 8.0 for n in reference)
    D.inject_lora(unet, 4, 8.0)
    D.save_lora(unet, tmp_path / "ours.safetensors")
    assert {a for _, _, a in sample.load_lora_modules(str(tmp_path / "ours.safetensors"), base_unet()).values()} == {8.0}


def test_applied_and_merged_lora_give_the_same_image():
    images = {}
    for merge in (False, True):
        pipe = D.Pipeline(str(PIPELINE))
        modules = sample.load_lora_modules(str(LORA), pipe.unet)
        lora_on = sample.lora_switch(pipe.unet, modules, 1.5, merge)
        if not merge:  # applied: the branch is scaled by 1.5 * alpha / r, and each layer keeps the LoRA's own alpha
            layers = dict(pipe.unet.named_modules())
            assert all((layers[n].alpha, layers[n].scale) == (a, 1.5 * a / d.shape[0])
                       for n, (d, _, a) in modules.items()), "apply_lora changed a layer's alpha or scale"
        with lora_on(True):
            images[merge] = sample.generate(pipe, ["a red cat"], [7], 4, 5.0, 0.0, 16, 16)
        with lora_on(False):
            base = sample.generate(pipe, ["a red cat"], [7], 4, 5.0, 0.0, 16, 16)
    diff = (images[True] - images[False]).abs().max().item()
    assert diff < 1e-4, f"merged and applied LoRA images differ by {diff}"
    assert (images[True] - base).abs().max() > 1e-3, "the LoRA at scale 1.5 should change the image"


def test_save_merged_folder_loads_in_diffusers_and_renders_like_base_plus_lora(tmp_path, capsys):
    """The merged UNet is W + scale * alpha/r * up @ down, at the run's --lora-scale (1.5 here)."""
    folder = tmp_path / "merged"
    sample.main(GOLDEN_RUN + ["--lora", str(LORA), "--lora-scale", "1.5", "--save-merged", str(folder)])
    assert f"merged pipeline written to {folder}" in capsys.readouterr().out
    theirs = diffusers_images(diffusers_pipeline(folder), ["a red cat"], [5], 4, 5.0)
    pipe = D.Pipeline(str(PIPELINE))
    D.apply_lora(pipe.unet, sample.load_lora_modules(str(LORA), pipe.unet), 1.5)
    ours = sample.generate(pipe, ["a red cat"], [5], 4, 5.0, 0.0, 16, 16)
    diff = (ours.clamp(-1, 1) - theirs).abs().max().item()
    assert diff < 1e-4, f"the merged pipeline renders {diff} away from base + LoRA"
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir()), "temporary folder left behind"


def test_peft_alpha_pattern_matches_module_path_ends(tmp_path):
    """PEFT's alpha_pattern applies to a module whose path ends in the pattern at a dot boundary, nowhere else."""
    unet = base_unet()
    official = load_file(str(LORA / "pytorch_lora_weights.safetensors"))
    peft = {"base_model.model." + k.removeprefix("unet.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
            for k, v in official.items()}
    save_file(peft, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 4, "alpha_pattern": {"o_k": 3.0, "down_blocks.0": 2.0, "attn1.to_q": 8.0}}))
    modules = sample.load_lora_modules(str(tmp_path), unet)
    alphas = {n: a for n, (_, _, a) in modules.items()}
    assert {a for n, a in alphas.items() if n.endswith(".attn1.to_q")} == {8.0}
    assert {a for n, a in alphas.items() if not n.endswith(".attn1.to_q")} == {4.0}, (
        "a pattern matched inside a path (down_blocks.0) or inside a name (o_k for to_k)")


def test_a_webui_alpha_tensor_wins_over_a_declared_alpha(tmp_path):
    unet = base_unet()
    modules = {n: (d, u, 8.0) for n, (d, u, _) in sample.load_lora_modules(str(LORA), unet).items()}
    D.save_lora_webui(modules, tmp_path / "w.safetensors", unet)
    save_file(load_file(str(tmp_path / "w.safetensors")), tmp_path / "both.safetensors",
              metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4})})
    assert {a for _, _, a in sample.load_lora_modules(str(tmp_path / "both.safetensors"), unet).values()} == {8.0}


def test_peft_keys_with_the_adapter_name_load_like_plain_ones(tmp_path, lora_io):
    unet = base_unet()
    official = load_file(str(LORA / "pytorch_lora_weights.safetensors"))
    named = {"base_model.model." + k.removeprefix("unet.").replace(".lora.down.", ".lora_A.default.")
             .replace(".lora.up.", ".lora_B.default."): v for k, v in official.items()}
    save_file(named, tmp_path / "named.safetensors")
    D.apply_lora(unet, sample.load_lora_modules(str(tmp_path / "named.safetensors"), unet))
    torch.testing.assert_close(unet_out(unet, lora_io), lora_io["out_lora"], rtol=0, atol=1e-4)


# ---- SDXL LoRA ----
# The tiny SDXL pipeline has SDXL's block layout (layers_per_block 2, attention from the second level down, a
# text_time embedding), so its webui files carry the block numbers of SDXL itself; only the widths are tiny.


@pytest.fixture(scope="module")
def tiny_sdxl(spo_cache):
    return D.tiny_pipeline_path("tiny-sdxl")


def sdxl_unet(path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(path), subfolder="unet").eval()


def sdxl_out(unet, seed=0):
    """The tiny SDXL UNet's output for seeded inputs: latents, text (b, 16, 64), pooled text (b, 32), size ids."""
    g = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    added = dict(text_embeds=torch.randn(2, 32, generator=g), time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 20]), text, added_cond_kwargs=added).sample


def attention_linears(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attentions." in n}


def random_lora(unet, rank, alpha):
    """A LoRA on every Linear of the attention blocks (proj_in/out, feed-forward too), with non-zero up weights."""
    g = torch.Generator().manual_seed(1)
    draw = lambda *shape: torch.randn(*shape, generator=g)
    return {n: (draw(rank, m.in_features) / rank, draw(m.out_features, rank) * 0.05, alpha)
            for n, m in attention_linears(unet).items()}


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_our_sdxl_lora_file_loads_in_diffusers_with_the_same_output(tiny_sdxl, tmp_path, alpha):
    """save_lora on the SDXL UNet: StableDiffusionXLPipeline.load_lora_weights must read it as we apply it."""
    from diffusers import StableDiffusionXLPipeline

    unet = D.Pipeline("tiny-sdxl").unet
    D.inject_lora(unet, 4, alpha)
    torch.manual_seed(0)
    for layer in D.lora_layers(unet):
        torch.nn.init.normal_(layer.lora.up.weight, std=0.05)
    D.save_lora(unet, tmp_path / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") for k in load_file(str(tmp_path / "pytorch_lora_weights.safetensors")))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    base = sdxl_out(pipe.unet)
    pipe.load_lora_weights(str(tmp_path))
    theirs = sdxl_out(pipe.unet)
    assert not torch.allclose(theirs, base), "diffusers attached nothing (wrong key prefix?)"
    torch.testing.assert_close(theirs, sdxl_out(unet), rtol=0, atol=1e-4,
                               msg=lambda m: f"diffusers' SDXL loader reads our file differently: {m}")


@pytest.mark.parametrize("arch", ["sdxl", "tiny-sdxl", "sd15", "tiny"])
def test_sgm_names_land_on_the_same_modules_in_diffusers(arch, tmp_path):
    """Every attention-block Linear of the architecture (built on the meta device: names only, so the real SDXL and
    SD1.5 too), named the SGM/LDM way (SDXL: as save_lora_webui writes it), goes through diffusers' own converter
    (what load_lora_weights does before PEFT). Each module's weights hold its index, so any wrong block number
    (input/output swapped, L for L + 1, a lost + 1) lands some index on another module and fails here."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft

    with torch.device("meta"):
        unet = UNet2DConditionModel(**D.ARCHITECTURES[arch]["unet"])
    names = list(attention_linears(unet))
    index = lambda i: torch.full((1, 1), float(i))
    if D.is_sdxl_unet(unet):
        modules = {n: (index(i), index(i), 1.0) for i, n in enumerate(names)}
        D.save_lora_webui(modules, tmp_path / "w.safetensors", unet)
        state = load_file(str(tmp_path / "w.safetensors"))
    else:  # SD1.x files are exported with diffusers' names; the LDM names some webui SD1.x LoRAs use are read
        stems = ["lora_unet_" + D.sgm_name(n, unet.config.layers_per_block).replace(".", "_") for n in names]
        state = {f"{stem}.{part}": index(i) for i, stem in enumerate(stems)
                 for part in ("lora_down.weight", "lora_up.weight")}
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in state), "the SGM/LDM layout names input_blocks, middle_block and output_blocks only"
    example = {"sdxl": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # the issue's example
               "sd15": "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"}.get(arch)
    assert example is None or f"{example}.lora_down.weight" in state
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    converted = convert_unet_state_dict_to_peft(converted)  # `unet.<module>.lora_A.weight`, as PEFT receives it
    landed = {k.removeprefix("unet.").removesuffix(".lora_A.weight"): names[int(v.item())]
              for k, v in converted.items() if k.endswith(".lora_A.weight")}
    wrong = [(ours, theirs) for theirs, ours in landed.items() if theirs != ours]
    assert not wrong, f"{len(wrong)} of {len(names)} land elsewhere in diffusers, e.g. (ours, theirs): {wrong[:2]}"
    assert len(landed) == len(names), f"diffusers kept {len(landed)} of {len(names)} modules"


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_sdxl_webui_export_round_trips_and_diffusers_loads_it_alike(tiny_sdxl, tmp_path, alpha):
    """The SGM-named file reads back to the same modules, and diffusers' SDXL pipeline gives our UNet output."""
    from diffusers import StableDiffusionXLPipeline

    unet = sdxl_unet(tiny_sdxl)
    modules = random_lora(unet, 4, alpha)
    path = tmp_path / "spo_sdxl_webui.safetensors"
    D.save_lora_webui(modules, path, unet)
    assert "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_out_0.alpha" in load_file(str(path)), (
        "up_blocks.0.attentions.2 is SGM's output_blocks.2.1, and to_out.0 is written to_out_0")
    back = D.lora_modules(*D.read_lora_file(path), unet)
    assert back.keys() == modules.keys(), "SGM names did not map back to the same modules"
    for name, (down, up, a) in modules.items():
        assert torch.equal(back[name][0], down) and torch.equal(back[name][1], up) and back[name][2] == a, name
    D.apply_lora(unet, modules)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    base = sdxl_out(pipe.unet)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    theirs = sdxl_out(pipe.unet)
    assert not torch.allclose(theirs, base), "diffusers attached nothing"
    torch.testing.assert_close(theirs, sdxl_out(unet), rtol=0, atol=1e-4,
                               msg=lambda m: f"diffusers' loader reads our SDXL webui file differently: {m}")


def test_ldm_named_sd15_lora_loads_like_the_golden_file(tmp_path, lora_io):
    """The golden LoRA renamed the LDM way (input_blocks_1_1_..., as some SD1.5 webui files are) is no SDXL LoRA:
    we and diffusers both load it to the golden output."""
    unet = base_unet()
    modules = sample.load_lora_modules(str(LORA), unet)
    state = {}
    for name, (down, up, alpha) in modules.items():
        stem = "lora_unet_" + D.sgm_name(name, unet.config.layers_per_block).replace(".", "_")
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
    save_file(state, tmp_path / "ldm.safetensors")
    back = sample.load_lora_modules(str(tmp_path / "ldm.safetensors"), unet)
    assert back.keys() == modules.keys(), "LDM names did not map to the golden file's modules"
    D.apply_lora(unet, back)
    torch.testing.assert_close(unet_out(unet, lora_io), lora_io["out_lora"], rtol=0, atol=1e-4)
    pipe = diffusers_pipeline()  # its loader renames SGM/LDM blocks only when handed the UNet config (SDXL's always)
    pipe.load_lora_weights(str(tmp_path), weight_name="ldm.safetensors", unet_config=pipe.unet.config)
    torch.testing.assert_close(unet_out(pipe.unet, lora_io), lora_io["out_lora"], rtol=0, atol=1e-4,
                               msg=lambda m: f"diffusers reads the LDM names onto other modules: {m}")


def lora_pair(stem, width, out):  # a LoRA on one layer: down (4, width), up (out, 4)
    return {f"{stem}.lora_down.weight": torch.zeros(4, width), f"{stem}.lora_up.weight": torch.zeros(out, 4)}


FAMILY_CASES = [  # (the UNet, a LoRA's tensors, a piece of the message): what only one family has decides
    ("sdxl", lora_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 768, 64), "this is an SD1.x LoRA"),
    ("sdxl", {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": torch.zeros(4, 768)},
     "this is an SD1.x LoRA"),
    ("sd15", lora_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1", 32, 64), "this is an SDXL LoRA"),
    ("sd15", {"unet.add_embedding.linear_1.lora.down.weight": torch.zeros(4, 80)}, "this is an SDXL LoRA"),
    ("sd15", lora_pair("lora_unet_label_emb_0_0", 80, 128), "this is an SDXL LoRA"),
    ("sdxl", {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": torch.zeros(4, 32)},
     "made for another model: .*attn2.to_k.lora.down.weight reads a 32-wide text context, this model's cross-attention "
     "is 64 wide"),  # the tiny SD1.5 LoRA on the tiny SDXL: neither family's real width
]


@pytest.mark.parametrize("family,tensors,message", FAMILY_CASES, ids=[f"{f}-{next(iter(t))[:40]}" for f, t, _ in FAMILY_CASES])
def test_a_lora_of_the_other_family_is_named_as_such(tiny_sdxl, family, tensors, message):
    unet = sdxl_unet(tiny_sdxl) if family == "sdxl" else base_unet()
    with pytest.raises(UserError, match=message):
        D.lora_modules(tensors, {"alpha": None, "alpha_pattern": {}}, unet)


def test_sdxl_webui_export_of_a_layer_outside_the_attention_blocks_is_refused(tiny_sdxl, tmp_path):
    unet = sdxl_unet(tiny_sdxl)
    modules = {"time_embedding.linear_1": (torch.zeros(4, 32), torch.zeros(128, 4), 4.0)}
    with pytest.raises(UserError, match="attention-block layers only, not time_embedding.linear_1"):
        D.save_lora_webui(modules, tmp_path / "w.safetensors", unet)
    assert not (tmp_path / "w.safetensors").exists()


def test_sample_exports_an_sdxl_webui_lora_that_renders_the_same_images(tiny_sdxl, tmp_path, capsys):
    """sample.py --model tiny-sdxl --lora FILE --export-webui OUT, then --lora OUT: the same image, pixel for pixel."""
    from PIL import Image

    unet = sdxl_unet(tiny_sdxl)
    D.inject_lora(unet, 4, 8.0)
    torch.manual_seed(0)
    for layer in D.lora_layers(unet):
        torch.nn.init.normal_(layer.lora.up.weight, std=0.5)
    ours, webui = tmp_path / "ours.safetensors", tmp_path / "webui.safetensors"
    D.save_lora(unet, ours)
    sample.main(["--model", "tiny-sdxl", "--lora", str(ours), "--export-webui", str(webui)])
    assert f"webui LoRA written to {webui}" in capsys.readouterr().out
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in load_file(str(webui))), "SDXL: SGM names"
    images = {}
    for name, lora in [("ours", ["--lora", str(ours)]), ("webui", ["--lora", str(webui)]), ("base", [])]:
        sample.main(["--model", "tiny-sdxl", "--steps", "3", "--prompt", "a red cat", "--seed", "3", "--out",
                     str(tmp_path / f"{name}.png")] + lora)
        images[name] = Image.open(tmp_path / f"{name}.png").tobytes()
    assert images["webui"] == images["ours"], "the exported webui file renders another image than the original"
    assert images["ours"] != images["base"], "the LoRA should change the image"


# ---- the command line on the tiny model: grid, eval, PNG settings ----


def test_compare_writes_pairs_and_a_readable_grid(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "compare"
    sample.main(["--model", "tiny", "--lora", str(LORA), "--prompt", "a photo of a cat", "--prompt", "a red dog",
                 "--n", "2", "--steps", "3", "--compare", "--out", str(out)])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 9 and "000-a-photo-of-a-cat-seed1-base.png" in pngs and "001-a-red-dog-seed0-lora.png" in pngs
    grid = Image.open(out / "compare.png")
    grid.load()
    # 32 px tiles are enlarged 4x so captions fit: 2 seeds a row, each a base | LoRA pair, 8 px between pairs.
    assert grid.width == 2 * (2 * 128) + 8 and grid.height > 2 * 128, f"unexpected grid size {grid.size}"
    base = Image.open(out / "000-a-photo-of-a-cat-seed0-base.png").convert("RGB").resize((128, 128), Image.NEAREST)
    lora = Image.open(out / "000-a-photo-of-a-cat-seed0-lora.png").convert("RGB").resize((128, 128), Image.NEAREST)
    assert grid.crop((0, 0, 128, 128)).tobytes() == base.tobytes(), "the grid's first tile must be the base image"
    assert grid.crop((128, 0, 256, 128)).tobytes() == lora.tobytes(), "the grid's second tile must be the LoRA image"
    # Each PNG's settings and command are its own: a base image was made without the LoRA, so neither says --lora.
    base, lora = (Image.open(out / f"000-a-photo-of-a-cat-seed0-{tag}.png").text for tag in ("base", "lora"))
    assert base["lora"] == "none" and "lora_mode" not in base and "--lora" not in base["command"], (
        f"a base image records a LoRA: {base}")
    assert lora["lora"] == str(LORA) and lora["lora_mode"] == "applied" and f"--lora={LORA}" in lora["command"]


def test_score_lists_each_base_image_next_to_its_lora_image(tmp_path, capsys):
    sample.main(["--model", "tiny", "--lora", str(LORA), "--prompt", "a photo of a cat", "--prompt", "a red dog",
                 "--n", "2", "--steps", "3", "--compare", "--score", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[lines.index("pickscore       spm  image") + 1:]]
    expected = [f"{i:03d}-{slug}-seed{seed}-{tag}.png" for i, slug in enumerate(["a-photo-of-a-cat", "a-red-dog"])
                for seed in (0, 1) for tag in ("base", "lora")]
    assert [Path(row[2]).name for row in rows] == expected, "each base image, then its LoRA image"
    assert all(Path(row[2]).is_file() and math.isfinite(float(row[0])) for row in rows)


def test_eval_reports_win_rate_computed_from_the_scores_it_lists(tmp_path, capsys):
    from PIL import Image

    assert sample.summarize([1.0, 2.0, 3.0], [1.0, 1.0, 4.0])["lora_win_rate"] == 0.5, "a tie counts half a win"

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red dog\n")
    out = tmp_path / "eval"
    sample.main(["--model", "tiny", "--lora", str(LORA), "--lora-scale", "20", "--eval", str(prompts), "--n", "2",
                 "--steps", "3", "--out", str(out)])
    report = json.loads((out / "eval.json").read_text())
    assert len(report["pairs"]) == 4 and report["settings"]["steps"] == 3
    for name in ("pickscore", "spm"):
        base = [p["base"][name] for p in report["pairs"]]
        lora = [p["lora"][name] for p in report["pairs"]]
        wins = sum(1.0 if b < l else 0.5 if b == l else 0.0 for b, l in zip(base, lora))
        m = report["metrics"][name]
        assert m["lora_win_rate"] == wins / 4 and m["pairs"] == 4, f"{name} win rate is not from the listed scores"
        assert abs(m["base_mean"] - sum(base) / 4) < 1e-9 and abs(m["lora_mean"] - sum(lora) / 4) < 1e-9
        lo, hi = m["win_rate_ci95"]
        assert 0 <= lo <= m["lora_win_rate"] <= hi <= 1, f"{name}: the 95% interval must contain the win rate"
    assert "LoRA wins" in capsys.readouterr().out
    grid = Image.open(out / "compare.png")
    grid.load()
    assert grid.width == 2 * 256 + 8
    # The listed scores are the images' own: re-score one saved PNG independently with preference_model.py.
    # At the tiny processor's size (32) PickScore's resize and crop do nothing, so both preprocessings agree.
    # The first and the last pair: each prompt's images are scored against that prompt, not the first one.
    assert report["pairs"][0]["prompt"] != report["pairs"][-1]["prompt"]
    for kind, checkpoint in [("pickscore", None), ("spm", "tiny")]:
        model = pm.load_preference_model(kind, "tiny", "tiny", checkpoint)
        for pair in (report["pairs"][0], report["pairs"][-1]):
            with torch.no_grad():
                score = model.score(pm.load_image(out / pair["lora_image"]), model.tokenize([pair["prompt"]]), 0).item()
            assert abs(score - pair["lora"][kind]) < 1e-4, (
                f"{kind} in eval.json differs from scoring the PNG of {pair['prompt']!r} itself")


def test_every_png_carries_its_settings_and_remakes_itself(tmp_path):
    from PIL import Image

    first = tmp_path / "first.png"
    sample.main(GOLDEN_RUN + ["--lora", str(LORA), "--merge", "--prompt", "a red cat", "--seed", "11", "--cfg", "3",
                              "--negative-prompt", "none", "--lora-scale", "1.5", "--eta", "0.5",
                              "--out", str(first)])  # "none" the text, once dropped as the 'not set' marker
    text = Image.open(first).text
    expected = dict(prompt="a red cat", negative_prompt="none", seed="11", steps="3", cfg="3.0", eta="0.5",
                    height="16", width="16", sampler="DDIM", model="tiny", pretrained=str(PIPELINE), lora=str(LORA),
                    lora_scale="1.5", lora_mode="merged", precision="fp32")
    assert {k: text.get(k) for k in expected} == expected, "PNG text chunks do not hold the generation settings"
    command = shlex.split(text["command"])
    assert command[:2] == ["python", "sample.py"]
    assert "--merge" in command, "the command must remake the image with the LoRA merged, as it was made"
    second = tmp_path / "second.png"
    sample.main(command[2:] + ["--out", str(second)])
    assert Image.open(second).tobytes() == Image.open(first).tobytes(), "the PNG's own command made another image"


def test_a_random_init_png_remakes_itself(tmp_path):
    """--random-init weights come from a fixed seed, and the PNG's command says --random-init (it once left it out,
    and the command loaded the real model)."""
    from PIL import Image

    first, second = tmp_path / "first.png", tmp_path / "second.png"
    sample.main(["--model", "tiny", "--random-init", "--prompt", "a red cat", "--steps", "2", "--out", str(first)])
    text = Image.open(first).text
    command = shlex.split(text["command"])
    assert "--random-init" in command and text["weights"] == "random-init"
    sample.main(command[2:] + ["--out", str(second)])
    assert Image.open(second).tobytes() == Image.open(first).tobytes(), "the PNG's own command made another image"


def test_png_text_round_trips_any_text(tmp_path):
    from PIL import Image

    settings = {"prompt": "une île, 湖 \"quoted\"\nsecond line", "seed": 3, "cfg": 7.5}
    D.save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", settings)
    assert Image.open(tmp_path / "a.png").text == {k: str(v) for k, v in settings.items()}


def test_compare_grid_shows_every_seed_of_the_first_16_prompts(tmp_path, monkeypatch):
    """The grid has one row per prompt for the first GRID_ROWS (16) prompts, each with all --n seeds as base | LoRA
    pairs in job order, and records the seeds it shows: seed .. seed + n - 1."""
    from PIL import Image

    prompts = [a for i in range(17) for a in ("--prompt", f"prompt {i}")]
    args = sample.parse_args(["--model", "tiny", "--lora", str(LORA), "--compare", "--n", "2", "--seed", "5",
                              "--out", str(tmp_path)] + prompts)
    args.sampler_name = "DDIM"  # run() sets it from the loaded scheduler
    jobs = sample.jobs_of(args)  # 17 prompts x 2 seeds
    base = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(len(jobs))]
    lora = [Image.new("RGB", (8, 8), (0, i, 0)) for i in range(len(jobs))]
    seen = {}
    grid = lambda tiles, captions, cols: seen.update(tiles=tiles, captions=captions, cols=cols) or tiles[0]
    monkeypatch.setattr(sample, "captioned_grid", grid)
    monkeypatch.setattr(sample, "save_png", lambda image, path, settings: seen.update(settings=settings))
    sample.save_compare_grid(args, jobs, base, lora, tmp_path / "compare.png")
    expected = [image for i in range(32) for image in (base[i], lora[i])]  # prompts 0-15, both seeds each
    assert len(seen["tiles"]) == 64 and all(a is b for a, b in zip(seen["tiles"], expected)), (
        f"the grid should show the 32 pairs of the first 16 prompts, base then LoRA, got {len(seen['tiles'])} tiles")
    assert seen["cols"] == 2 and seen["captions"][-1] == "base | LoRA, seed 6: prompt 15", seen["captions"][-1]
    assert seen["settings"]["seed"] == "5..6", f"the grid's seeds are 5 and 6, it says {seen['settings']['seed']}"


def test_wilson_interval_solves_wilsons_equation_at_95_percent():
    """Each end of the 95% Wilson interval is a root pi of (p - pi)^2 = z^2 pi (1 - pi) / n with z = 1.959964 (Wilson
    1927), for fractional wins (ties count half) too; 0 and n wins give the exact ends 0 and 1."""
    z = 1.959964
    for wins, n in ((7, 10), (2.5, 4), (1, 3), (19.5, 20), (40, 100), (0, 5), (5, 5)):
        p = wins / n
        lo, hi = sample.wilson_interval(wins, n)
        assert lo <= p <= hi and lo < hi, f"{wins}/{n}: [{lo}, {hi}] must contain {p}"
        for end in (lo, hi):
            gap = (p - end) ** 2 - z * z * end * (1 - end) / n
            assert abs(gap) < 1e-12, f"{wins}/{n}: {end} is no end of the 95% Wilson interval [{lo}, {hi}]"
    assert sample.wilson_interval(0, 5)[0] == 0.0 and sample.wilson_interval(5, 5)[1] == 1.0
    lo, hi = sample.wilson_interval(7, 10)  # the textbook example: 7 of 10, 95% interval 0.3968 to 0.8922
    assert (round(lo, 4), round(hi, 4)) == (0.3968, 0.8922), f"got [{lo}, {hi}]"


def test_files_written_names_eval_json(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    args = sample.parse_args(["--model", "tiny", "--lora", str(LORA), "--eval", str(tmp_path / "prompts.txt"),
                              "--out", str(tmp_path)])
    assert tmp_path / "eval.json" in sample.files_written(args)


# ---- bad input: one line, exit 2, nothing written ----


@pytest.fixture(scope="module")
def bad_loras(tmp_path_factory):
    """LoRA files that must be refused, each next to the golden UNet they do not fit."""
    folder = tmp_path_factory.mktemp("bad_loras")
    good = load_file(str(LORA / "pytorch_lora_weights.safetensors"))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"
    files = {
        "unknown": {**good, "unet.nowhere.to_q.lora.down.weight": torch.zeros(4, 32)},
        "sdxl": {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)},
        "sdxl_diffusers": {**good, key.replace("0.attn1.to_q.lora.up", "1.attn2.to_k.lora.down"): torch.zeros(4, 2048)},
        "rank": {**good, key: torch.zeros(32, 8)},  # up of rank 8 against down of rank 4
        "shape": {**good, key.replace(".up.", ".down."): torch.zeros(4, 48)},  # in-features 48 for a 32-wide layer
        "text_encoder": {**good, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
        "nan": {**good, key: torch.full((32, 4), float("nan"))},  # it rendered black images with exit code 0
        "rank0": {**good, key: torch.zeros(32, 0), key.replace(".up.", ".down."): torch.zeros(0, 32)},
        "alpha": {**good, key.replace("lora.up.weight", "alpha"): torch.tensor([4.0, 4.0])},
        "alpha_only": {**good, key.replace("attn1.to_q.lora.up.weight", "ff.net.2.alpha"): torch.tensor(4.0)},
    }
    for name, state in files.items():
        save_file(state, folder / f"{name}.safetensors")
    save_file(good, folder / "metadata.safetensors", metadata={"lora_adapter_metadata": "[1, 2]"})
    save_file(good, folder / "alpha0.safetensors", metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 0}'})
    return folder


BAD_SAMPLES = [  # (flags after GOLDEN_RUN --prompt ..., a piece of the one-line message)
    (["--lora", "{bad}/unknown.safetensors"], "1 LoRA keys match no module of this UNet, e.g. unet.nowhere"),
    (["--lora", "{bad}/sdxl.safetensors"], "this is an SDXL LoRA"),
    (["--lora", "{bad}/sdxl_diffusers.safetensors"], "but the model is SD1.5-style (cross-attention width 32)"),
    (["--lora", "{bad}/rank.safetensors"], "do not fit its Linear(32 -> 32) with one rank r"),
    (["--lora", "{bad}/shape.safetensors"], "down (4, 48) and up (32, 4)"),
    (["--lora", "{bad}/text_encoder.safetensors"], "text-encoder LoRA weights are not supported"),
    (["--lora", "{bad}/nan.safetensors"], "holds non-finite weights"),
    (["--lora", "{bad}/rank0.safetensors"], "down (0, 32) and up (32, 0) shapes"),
    (["--lora", "{bad}/alpha.safetensors"], "must be one number > 0, got [4.0, 4.0]"),
    (["--lora", "{bad}/alpha_only.safetensors"], "transformer_blocks.0.ff.net.2 lacks its down and up weight"),
    (["--device", "tpu"], "--device must be cpu or cuda[:N], got tpu"),
    (["--pretrained", "{bad}/unknown.safetensors"], "is a file: it takes a diffusers folder"),
    (["--lora", "{bad}/metadata.safetensors"], "its LoRA settings are not a JSON object"),
    (["--lora", "{bad}/alpha0.safetensors"], "need lora_alpha > 0"),  # 0 once meant alpha = rank, silently
    (["--cfg", "nan"], "argument --cfg: must be a finite number, got 'nan'"),
    (["--seed", "-1"], "--seed and the seeds after it (--n) must be in [0, 2^64)"),
    (["--seed", str(2**64 - 1), "--n", "2"], "--seed and the seeds after it (--n) must be in [0, 2^64)"),
    (["--out", ""], "--out is empty: give it a value or leave the flag out"),
    (["--lora", "{bad}/missing.safetensors"], "--lora: no such file or folder"),
    (["--lora", "{bad}"], "holds no single LoRA file"),
    (["--height", "30"], "--height must be a positive multiple of 8, got 30"),
    (["--width", "20"], "--width must be a positive multiple of 8, got 20"),
    (["--height", "0"], "--height must be a positive multiple of 8, got 0"),  # once the preset's size, silently
    (["--benchmark", "1", "--compare", "--lora", "{bad}/unknown.safetensors"], "--benchmark times the base model's"),
    (["--n", "0"], "--n must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),  # range(0, n, 0) would fail mid-run
    (["--steps", "0"], "--steps must be >= 1"),
    (["--eta", "-0.5"], "--eta must be in [0, 1]"),
    (["--eta", "1.5"], "--eta must be in [0, 1]"),
    (["--steps", "1000"], "--steps must be < 1000"),
    (["--scheduler", "checkpoint", "--eta", "1"], "--eta is DDIM's: with --scheduler checkpoint leave it 0"),
    (["--scheduler", "checkpoint", "--random-init"], "--random-init has none"),
    (["--random-init", "--score"], "--score and --eval would judge noise with downloaded scorers"),
    (["--merge", "--precision", "bf16"], "--merge and --save-merged need --precision fp32"),
    (["--lora", "{lora}", "--precision", "bf16"], "--merge and --save-merged need --precision fp32"),  # --save-merged
    (["--export-webui", "{bad}"], "--export-webui must name a .safetensors file"),
    (["--out", "{bad}/unknown.safetensors"], "is a file, not a folder"),
    (["--out", "{bad}/unknown.safetensors/sub"], "cannot be written"),
    (["--prompts", "{bad}/nope.txt"], "--prompts: no such file"),
    (["--n", "2", "--out", "{out}.png"], "one PNG file but this run writes 2 images"),
    (["--compare"], "pass --lora"),
    (["--model", "sdxl3"], "invalid choice: 'sdxl3'"),
    (["--vae", "/nonexistent/vae"], "--vae: no such file or folder: /nonexistent/vae"),  # not the hub's message
    (["--steps", "many"], "invalid int value: 'many'"),
    (["--pretrained", "/nonexistent/sd"], "--pretrained: no such file or folder: /nonexistent/sd"),
    (["--pretrained", "~nosuchuser/sd"], "--pretrained: no such file or folder: ~nosuchuser/sd"),  # a traceback once
    (["--lora", "n" * 300], "file name too long: nnnn"),
    (["--out", "{out}/" + "n" * 240 + ".png"], "a name in it is too long"),  # found once the images were made
    (["--lora="], "--lora is empty"),  # `--lora=$LORA` with the variable unset made base-model images
    (["--vae="], "--vae is empty"),
    (["--prompts", "/dev/null"], "--prompts: /dev/null is not a regular file"),
    (["--prompts", "{bad}"], "is a folder, not a file"),
    (["--height", str(10**30)], "--height must be at most 16384 pixels"),
]


@pytest.mark.parametrize("flags,message", BAD_SAMPLES, ids=[" ".join(f).replace("{bad}/", "")[:60] for f, _ in BAD_SAMPLES])
def test_sample_bad_input_exits_2_with_one_line_and_writes_nothing(flags, message, tmp_path, bad_loras, capsys):
    out = tmp_path / "out"
    flags = [f.format(bad=bad_loras, out=out, lora=LORA) for f in flags]
    exports = ["--save-merged", str(tmp_path / "merged"), "--export-webui", str(tmp_path / "w.safetensors")]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--out", str(out)] + flags + (exports if "--lora" in flags else []))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, f"got {err!r}"
    assert list(tmp_path.iterdir()) == [], "a refused run must write nothing"


def test_export_webui_never_overwrites_a_file(tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"  # exporting onto its own input replaced the trained LoRA
    shutil.copy(LORA / "pytorch_lora_weights.safetensors", lora)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(GOLDEN_RUN + ["--lora", str(lora), "--export-webui", str(lora)])
    assert exit_info.value.code == 2 and f"--export-webui {lora} exists" in capsys.readouterr().err
    assert lora.read_bytes() == (LORA / "pytorch_lora_weights.safetensors").read_bytes()
    fifo = tmp_path / "fifo"  # anything already there, not only a file: a pipe was replaced in silence
    os.mkfifo(fifo)
    with pytest.raises(SystemExit):
        sample.main(GOLDEN_RUN + ["--lora", str(lora), "--export-webui", str(fifo)])
    assert f"--export-webui {fifo} exists" in capsys.readouterr().err and fifo.is_fifo()


def test_outputs_in_each_others_place_are_refused_before_anything_is_written(tmp_path, capsys):
    """--save-merged replaces its folder whole: a webui file exported into it was deleted with exit code 0. An --out
    folder at the webui file's path failed with a traceback after the export."""
    lora = str(LORA / "pytorch_lora_weights.safetensors")
    merged, webui, alone = tmp_path / "merged", tmp_path / "merged" / "w.safetensors", tmp_path / "w.safetensors"
    for flags, message in [
            (["--save-merged", str(merged), "--export-webui", str(webui)],
             f"--export-webui {webui} and --save-merged {merged} overlap"),
            (["--save-merged", str(alone), "--export-webui", str(alone)],
             f"--export-webui {alone} and --save-merged {alone} overlap"),
            (["--export-webui", str(alone), "--prompt", "a cat", "--out", str(alone)],
             f"--export-webui {alone} and --out {alone} overlap")]:
        with pytest.raises(SystemExit) as exit_info:
            sample.main(GOLDEN_RUN + ["--lora", lora] + flags)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err == f"error: {message}: give each output its own place", err
        assert list(tmp_path.iterdir()) == [], "a refused run must write nothing"
    sample.main(GOLDEN_RUN + ["--lora", lora, "--export-webui", str(alone), "--prompt", "a cat", "--out",
                              str(tmp_path / "images")])  # the webui file beside the images, or among them, is fine
    assert alone.is_file() and len(list((tmp_path / "images").glob("*.png"))) == 1


def test_an_out_folder_named_with_a_quoted_tilde_is_checked_where_it_is_written(tmp_path, monkeypatch, capsys):
    """A quoted '~/imgs' is the folder "~" here, as for mkdir: the check for files a run would replace must look
    there too (it once looked in the home folder, and the second run overwrote the first's images)."""
    monkeypatch.chdir(tmp_path)
    sample.main(GOLDEN_RUN + ["--prompt", "a cat", "--out", "~/imgs"])
    assert len(list((tmp_path / "~" / "imgs").glob("*.png"))) == 1
    with pytest.raises(SystemExit) as exit_info:
        sample.main(GOLDEN_RUN + ["--prompt", "a cat", "--out", "~/imgs"])
    assert exit_info.value.code == 2 and "already holds 000-a-cat-seed0.png" in capsys.readouterr().err


def test_merging_defaults_to_fp32_on_cuda(monkeypatch, tmp_path):
    """fp16 is CUDA's default precision, but a merge into half weights rounds small LoRA updates away, so
    --save-merged and --merge were refused unless --precision fp32 was spelled out (the README's example failed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    lora = str(LORA / "pytorch_lora_weights.safetensors")
    assert sample.parse_args(GOLDEN_RUN + ["--device", "cuda", "--prompt", "a cat"]).precision == "fp16"
    for flags in (["--merge", "--prompt", "a cat"], ["--save-merged", str(tmp_path / "merged")]):
        assert sample.parse_args(GOLDEN_RUN + ["--device", "cuda", "--lora", lora] + flags).precision == "fp32"


def test_ctrl_c_while_sampling_is_one_line_and_leaves_whole_images(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the second batch: no traceback, exit 130 as a shell expects, and the first image is a whole PNG."""
    from PIL import Image

    calls, generate = [], sample.generate

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)
    monkeypatch.setattr(sample, "generate", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--n", "2", "--batch-size", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and err[-1].startswith("stopped: the images written so far are complete"), err
    assert [p.name for p in tmp_path.iterdir()] == ["000-a-red-cat-seed0.png"]
    Image.open(tmp_path / "000-a-red-cat-seed0.png").load()


def test_images_with_nan_pixels_are_reported_not_passed_off_as_pictures(tmp_path, capsys):
    """A guidance scale that overflows (or fp16 overflowing in a VAE) makes NaN pixels, which save as black."""
    sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--n", "2", "--cfg", "1e30", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "warning: 2 of 2 images have NaN or inf pixels" in err and "fp16 overflow" not in err, (
        "an fp32 run has no fp16 to blame: " + err)
    sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--out", str(tmp_path), "--overwrite"])
    assert "NaN" not in capsys.readouterr().err


def test_sample_never_overwrites_an_image_unless_told(tmp_path, capsys):
    """A second run onto the same --out is refused before anything is drawn (it replaced the first run's images in
    silence); --overwrite replaces them. A .jpg --out was quietly made a folder of PNGs."""
    from PIL import Image

    out = tmp_path / "cat.png"
    sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--out", str(out)])
    first = out.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        sample.main(GOLDEN_RUN + ["--prompt", "a red dog", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"error: --out {out} already holds cat.png: pass --overwrite to " \
        "replace them, or another --out", err
    assert out.read_bytes() == first, "the refused run must leave the first image as it was"
    sample.main(GOLDEN_RUN + ["--prompt", "a red dog", "--out", str(out), "--overwrite"])
    assert out.read_bytes() != first and Image.open(out).text["prompt"] == "a red dog"
    sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--prompt", "a red dog", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit):  # a folder: only the names this run would write count
        sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--n", "2", "--out", str(tmp_path / "run")])
    assert "already holds 000-a-red-cat-seed0.png: pass" in capsys.readouterr().err
    sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--seed", "1", "--out", str(tmp_path / "run")])
    compare = GOLDEN_RUN + ["--lora", str(LORA), "--compare", "--prompt", "a red cat", "--prompt", "a red dog",
                            "--n", "2", "--out", str(tmp_path / "compare")]
    sample.main(compare)  # the names a --compare run checks are exactly the files it writes
    assert sorted(sample.files_written(sample.parse_args(compare[:-2] + ["--out", str(tmp_path / "x")]))) == sorted(
        (tmp_path / "x") / p.name for p in (tmp_path / "compare").iterdir())
    with pytest.raises(SystemExit):
        sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--out", str(tmp_path / "cat.jpg")])
    assert "images are written as PNG, so name a .png file or a folder" in capsys.readouterr().err
    assert not (tmp_path / "cat.jpg").exists()


def test_an_export_onto_a_file_is_one_problem_not_two(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        sample.main(GOLDEN_RUN + ["--lora", str(LORA), "--save-merged", str(tmp_path / "afile")])
    assert capsys.readouterr().err.strip() == f"error: --save-merged {tmp_path / 'afile'} is a file, not a folder"


def test_no_prompt_is_refused_unless_only_exporting(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(GOLDEN_RUN + ["--out", str(tmp_path / "out")])
    assert "no prompt" in capsys.readouterr().err
    sample.main(GOLDEN_RUN + ["--lora", str(LORA), "--export-webui", str(tmp_path / "w.safetensors")])
    assert (tmp_path / "w.safetensors").is_file() and not (tmp_path / "out").exists()


def test_sample_cli_subprocess_reports_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "--model", "tiny", "--prompt", "a cat", "--height", "33",
                             "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert result.returncode == 2 and result.stderr.strip() == "error: --height must be a positive multiple of 8, got 33"


def test_a_single_image_out_that_is_a_folder_is_refused(tmp_path, capsys):
    """--out cat.png names one image: an existing folder of that name is refused before anything is drawn."""
    folder = tmp_path / "cat.png"
    folder.mkdir()
    assert D.output_problem(folder, "--out", is_file=True) == f"--out {folder} is a folder, not a file"
    with pytest.raises(SystemExit) as exit_info:
        sample.main(GOLDEN_RUN + ["--prompt", "a red cat", "--out", str(folder)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"error: --out {folder} is a folder, not a file", err
    assert list(folder.iterdir()) == [], "a refused run must write nothing"


def test_eval_takes_no_other_prompts(tmp_path):
    """--eval reads its prompts from its file alone: --prompts (like --prompt) next to it is refused."""
    (tmp_path / "prompts.txt").write_text("a cat\n")
    for extra in (["--prompt", "a dog"], ["--prompts", str(tmp_path / "prompts.txt")]):
        with pytest.raises(UserError, match="--eval takes its prompts from its file alone"):
            sample.parse_args(["--model", "tiny", "--lora", str(LORA), "--eval", str(tmp_path / "prompts.txt"),
                               "--out", str(tmp_path / "out")] + extra)


def test_sample_accepts_each_flag_at_the_edge_of_its_range(tmp_path):
    """Valid edges: the largest seed (2^64 - 1 with --n 1), --eta 1 (DDPM), sizes a multiple of 8 but not of 16."""
    args = sample.parse_args(GOLDEN_RUN + ["--prompt", "a red cat", "--seed", str(2**64 - 1), "--eta", "1", "--height",
                                           "24", "--width", "40", "--out", str(tmp_path / "out")])
    assert (args.seed, args.eta, args.height, args.width) == (2**64 - 1, 1.0, 24, 40)


def test_an_upper_case_png_out_names_one_image(tmp_path):
    """--out CAT.PNG is the run's one image, as cat.png is, not a refused image suffix."""
    args = sample.parse_args(GOLDEN_RUN + ["--prompt", "a red cat", "--out", str(tmp_path / "CAT.PNG")])
    assert sample.one_png(args) and sample.files_written(args) == [tmp_path / "CAT.PNG"]


def test_random_init_refuses_eval_as_it_refuses_score(tmp_path):
    """--random-init with --eval would judge noise with downloaded scorers: refused before any model loads."""
    (tmp_path / "prompts.txt").write_text("a cat\n")
    with pytest.raises(UserError, match="--score and --eval would judge noise with downloaded scorers"):
        sample.parse_args(["--model", "tiny", "--random-init", "--lora", str(LORA), "--eval",
                           str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "out")])


def test_benchmark_ignores_the_images_out_holds_and_a_refusal_counts_the_others(tmp_path):
    """--benchmark writes nothing, so images already in --out do not stop it; a refused run counts the rest."""
    out = tmp_path / "out"
    out.mkdir()
    for seed in (0, 1):
        (out / f"000-a-red-cat-seed{seed}.png").write_bytes(b"")
    flags = GOLDEN_RUN + ["--prompt", "a red cat", "--n", "2", "--out", str(out)]
    assert sample.parse_args(flags + ["--benchmark", "1"]).benchmark == 1
    with pytest.raises(UserError, match=r"already holds 000-a-red-cat-seed0\.png and 1 more of this run's files: "):
        sample.parse_args(flags)


def test_a_missing_or_non_lora_file_is_refused_before_the_pipeline_loads(tmp_path):
    """parse_args loads no model: a --lora typo or a file of other weights used to cost a pipeline load first."""
    save_file({"conv.weight": torch.zeros(4, 4)}, str(tmp_path / "weights.safetensors"))
    flags = GOLDEN_RUN + ["--prompt", "a red cat", "--out", str(tmp_path / "out")]
    for lora, message in [(tmp_path / "nope.safetensors", "--lora: no such file or folder"),
                          (tmp_path / "weights.safetensors", "holds no UNet LoRA weights")]:
        with pytest.raises(UserError, match=message):
            sample.parse_args(flags + ["--lora", str(lora)])


def test_exports_need_a_lora_and_never_replace_a_merged_folder(tmp_path):
    """--save-merged and --export-webui without --lora are refused, and so is a --save-merged folder that exists."""
    for export in (["--save-merged", str(tmp_path / "merged")], ["--export-webui", str(tmp_path / "w.safetensors")]):
        with pytest.raises(UserError, match="--merge, --save-merged and --export-webui need --lora"):
            sample.parse_args(GOLDEN_RUN + export)
    (tmp_path / "merged").mkdir()  # a pipeline folder a former run saved
    with pytest.raises(UserError, match=f"--save-merged {re.escape(str(tmp_path / 'merged'))} exists"):
        sample.parse_args(GOLDEN_RUN + ["--lora", str(LORA), "--save-merged", str(tmp_path / "merged")])


# ---- training the step-aware preference model (preference_model.py train / eval) ----
# A tiny Pick-a-Pic-format dataset is drawn on the fly: flat-coloured 32 x 32 images with a patch. For prompts
# about something red the redder image wins, for the others the less red one (near-equal redness is a tie):
# the rule needs the prompt, and a random SPM, whatever its bias for red, starts near chance. A second dataset
# prefers the more vivid image (mean redness further from 0.5), a rule the step's noise can hide. The tiny SD
# pipeline's random VAE would mangle the colours on the way through encode/decode, so `identity_sd` swaps in a
# VAE that is the identity by construction (see identity_vae) and saves the pipeline folder that `--pretrained`
# gets; where a test trains in this process, the optimal denoiser for Gaussian data stands in for the random UNet
# (see wiener_denoiser). Training runs at --resolution 8 to keep the pipeline cheap.

CAPTIONS = ["a red cat", "a beautiful lake", "a photo of a red dog", "an image of the lake"]  # red ones: redder wins
TIE_MARGIN = 0.04  # pairs whose mean redness (in [0, 1]) differs by less are ties


def draw_image(gen):
    """A flat random colour with a random patch of another colour: (3, 32, 32) in [0, 1]."""
    x = torch.rand(3, 1, 1, generator=gen).expand(3, 32, 32).clone()
    top, left = torch.randint(0, 24, (2,), generator=gen).tolist()
    x[:, top:top + 8, left:left + 8] = torch.rand(3, 1, 1, generator=gen)
    return x


def jpeg(x):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def redness_rule(x0, x1, caption):
    """> 0 when image 0 wins: the redder one for prompts about something red, the less red one otherwise."""
    return (x0[0].mean() - x1[0].mean()).item() * (1 if "red" in caption else -1)


def vividness_rule(x0, x1, caption):
    """> 0 when image 0 wins: the one whose mean redness is further from 0.5, whatever the prompt. Not monotone in
    the pixels: a pixel change that makes one image win can make another lose."""
    return abs(x0[0].mean().item() - 0.5) - abs(x1[0].mean().item() - 0.5)


def pick_a_pic_rows(n, seed, unlabelled=0, rule=redness_rule):
    """n labelled pairs (the rule's winner wins, near-equal is a tie) plus `unlabelled` pairs without a label."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n + unlabelled):
        x0, x1 = draw_image(gen), draw_image(gen)
        caption = CAPTIONS[i % len(CAPTIONS)]
        diff = rule(x0, x1, caption)
        labels = (0.5, 0.5) if abs(diff) < TIE_MARGIN else (1.0, 0.0) if diff > 0 else (0.0, 1.0)
        rows.append(dict(caption=caption, jpg_0=jpeg(x0), jpg_1=jpeg(x1), label_0=labels[0],
                         label_1=labels[1], has_label=i < n, are_different=True, image_0_uid=f"{seed}-{i}-0",
                         image_1_uid=f"{seed}-{i}-1"))
    for row in rows:
        row["num_example_per_prompt"] = sum(r["caption"] == row["caption"] for r in rows)
    return rows


def write_shard(path, rows, row_group_size=64):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """DATA/train-*.parquet in two shards of several row groups, DATA/validation_unique-*.parquet with
    labelled pairs and some unlabelled ones (which validation must skip)."""
    folder = tmp_path_factory.mktemp("pickapic")
    train = pick_a_pic_rows(512, seed=1)
    write_shard(folder / "train-00000-of-00002.parquet", train[:256])
    write_shard(folder / "train-00001-of-00002.parquet", train[256:])
    write_shard(folder / "validation_unique-00000-of-00001.parquet", pick_a_pic_rows(64, seed=2, unlabelled=8))
    return folder


def identity_vae(k=50.0):
    """A one-block AutoencoderKL whose decode(encode(x)) is x by construction (to ~1e-3). Every residual branch
    is switched off (conv2 = 0). conv_in writes [x, +k, -k, -x] into the 8 channels, so the one GroupNorm sees
    mean 0 and std ~k/2 whatever x is, and conv_out reads SiLU(z) - SiLU(-z) = z exactly."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=1,
                        sample_size=8, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    s = vae.config.scaling_factor
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ".conv2." in name:
                p.zero_()
        for conv_in, gain in [(vae.encoder.conv_in, 1.0), (vae.decoder.conv_in, s)]:  # latents are x / s
            conv_in.weight.zero_()
            conv_in.bias.copy_(torch.tensor([0, 0, 0, k, -k, 0, 0, 0]))
            for c in range(3):
                conv_in.weight[c, c, 1, 1], conv_in.weight[c + 5, c, 1, 1] = gain, -gain
        for conv_out, gain in [(vae.encoder.conv_out, k / 2 / s), (vae.decoder.conv_out, k / 2)]:
            conv_out.weight.zero_()
            conv_out.bias.zero_()
            for c in range(3):
                conv_out.weight[c, c, 1, 1], conv_out.weight[c, c + 5, 1, 1] = gain, -gain
        vae.encoder.conv_out.bias[4:] = -30  # posterior log-variance: a sample is the mean
    return vae


@pytest.fixture(scope="module")
def identity_sd(tmp_path_factory):
    """The tiny SD pipeline with the identity VAE in place of its random one, as a folder for --pretrained."""
    from diffusion import tiny_pipeline_path

    folder = tmp_path_factory.mktemp("sd") / "tiny-sd-identity-vae"
    shutil.copytree(tiny_pipeline_path(), folder)
    shutil.rmtree(folder / "vae")
    identity_vae().save_pretrained(folder / "vae")
    return str(folder)


def test_identity_vae_round_trips_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.stack([draw_image(gen) for _ in range(8)]) * 2 - 1, 4)  # (8, 3, 8, 8)
    vae = identity_vae()
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        rec = vae.decode(latents / vae.config.scaling_factor).sample
    assert (latents[:, :3] - x).abs().max() < 0.01, "the scaled latent should be the image itself"
    assert (rec - x).abs().max() < 0.01, f"decode(encode(x)) should be x, max error {(rec - x).abs().max():.3f}"


def test_pick_a_pic_images_are_resized_and_cropped_as_the_clip_processor_does():
    """The reference dataset runs the CLIP processor at the SD resolution: transformers' int(R * long / short) for
    the long edge. At 49 x 98 and R = 8, int(98 * (8 / 49)) = 15 would crop a different window."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    gen = torch.Generator().manual_seed(0)
    for w, h in [(49, 98), (98, 49), (20, 8), (33, 71)]:
        image = Image.frombytes("RGB", (w, h), torch.randint(0, 256, (h * w * 3,), generator=gen,
                                                             dtype=torch.uint8).numpy().tobytes())
        processor = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8},
                                          do_normalize=False)  # rescaled to [0, 1]
        expected = torch.as_tensor(processor(images=image, return_tensors="pt")["pixel_values"][0]) * 2 - 1
        torch.testing.assert_close(pm.resize_crop(image, 8), expected, rtol=0, atol=1e-6)


def wiener_denoiser(pretrained):
    """A stand-in for diffusion.predict_noise that forgets the image as t grows, as a trained UNet does and the random
    tiny one (which barely reacts to its input) does not: the optimal denoiser for unit-variance Gaussian data (SD's
    scaling_factor makes latents about unit variance). E[eps | x_t] = sqrt(1 - a_t) x_t, so the x0-prediction is
    sqrt(a_t) x_t = a_t x0 + sqrt(a_t (1 - a_t)) noise: the image's share falls like a_t, to 0.008 at t = 951."""
    from diffusers import DDIMScheduler

    alphas_cumprod = DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler").alphas_cumprod

    def predict_noise(unet, x, t, *prompts_and_guidance, **more):  # neither the UNet nor the prompts matter here
        return (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * x
    return predict_noise


def test_denoised_pair_is_a_t_x0_plus_one_noise_shared_by_the_pair(identity_sd, monkeypatch):
    """Under the Wiener denoiser the pair's x0-predictions differ by exactly a_t times the clean images' difference:
    one noise for both (as the reference), the forward process at t, DDIM's x0 formula, encode and decode."""
    monkeypatch.setattr(pm, "predict_noise", wiener_denoiser(identity_sd))
    pipe, gen = D.Pipeline(identity_sd), torch.Generator().manual_seed(0)
    im0, im1 = (torch.stack([draw_image(gen) for _ in range(3)]) * 2 - 1 for _ in range(2))
    t = torch.tensor([0, 501, 951])
    cond, uncond = pipe.encode_prompts(["a red cat"] * 3, (32, 32)), pipe.encode_negative(1, (32, 32))
    x0, x1 = pm.denoised_pair(pipe, im0, im1, cond, uncond, t, gen, 5.0)
    a = pipe.alphas_cumprod[t].view(-1, 1, 1, 1)
    error = ((x0 - x1) - a * (im0 - im1)).abs().amax(dim=(1, 2, 3)) / (a * (im0 - im1)).abs().amax(dim=(1, 2, 3))
    assert (error < 0.01).all(), f"x0-prediction differences off a_t (im0 - im1) by {error.tolist()} (relative)"
    noise = (x0[1:] - a[1:] * im0[1:]) / (a[1:] * (1 - a[1:])).sqrt()
    assert abs(noise.std().item() - 1) < 0.05, f"noise std {noise.std():.3f} at scale sqrt(a (1 - a)), expected 1"


def test_denoised_pair_asks_the_unet_with_each_pairs_caption_and_the_cfg_scale(identity_sd, monkeypatch):
    """Both images of pair p are denoised under caption p (rows p and b + p) against the one negative row, with
    the guidance scale asked for (the Wiener denoiser above ignores prompts and guidance, so check the call)."""
    calls = []
    wiener = wiener_denoiser(identity_sd)

    def recording(unet, x, t, cond, uncond, cfg):
        calls.append((cond["text"].clone(), uncond["text"].clone(), cfg))
        return wiener(unet, x, t, cond, uncond, cfg)
    monkeypatch.setattr(pm, "predict_noise", recording)
    pipe, gen = D.Pipeline(identity_sd), torch.Generator().manual_seed(0)
    im0, im1 = (torch.stack([draw_image(gen) for _ in range(3)]) * 2 - 1 for _ in range(2))
    captions = ["a red cat", "a beautiful lake", "a photo of a red dog"]
    cond, uncond = pipe.encode_prompts(captions, (32, 32)), pipe.encode_negative(1, (32, 32))
    pm.denoised_pair(pipe, im0, im1, cond, uncond, torch.tensor([0, 501, 951]), gen, 3.5)
    (text, negative, cfg), = calls
    assert cfg == 3.5, f"denoised_pair must pass its cfg_scale on, passed {cfg}"
    assert torch.equal(text, cond["text"].repeat(2, 1, 1)), "image i of pair p must be denoised under caption p"
    assert torch.equal(negative, uncond["text"].expand(6, -1, -1)), "every row takes the one negative prompt"


def test_training_pixels_clamp_then_resize_and_pair_scores_use_t():
    """SPM training preprocesses as the reference: clamp to [0, 1], bicubic resize straight to S x S (no crop),
    clamp, normalise; pair_scores scores both images of each pair at the pair's t."""
    spm = pm.load_preference_model("spm", "tiny", "tiny", "tiny")  # trained-like: its scores depend on t
    gen = torch.Generator().manual_seed(0)
    images = 3 * (torch.rand(4, 3, 24, 40, generator=gen) * 2 - 1)  # overshooting decoder outputs, not square
    x = torch.nn.functional.interpolate((images / 2 + 0.5).clamp(0, 1), size=(32, 32), mode="bicubic",
                                        align_corners=False).clamp(0, 1)
    torch.testing.assert_close(pm.training_pixels(spm, images), (x - spm.mean) / spm.std, atol=1e-6, rtol=0,
                               msg=lambda m: f"training pixels are not clamp, resize to S x S, clamp: {m}")
    ids, t = spm.tokenize(CAPTIONS[:2]), torch.tensor([501, 951])
    with torch.no_grad():
        s0, s1 = pm.pair_scores(spm, images[:2], images[2:], ids, t)
        text = spm.encode_text(ids)
        for s, im in [(s0, images[:2]), (s1, images[2:])]:
            torch.testing.assert_close(s, spm.score_pixels(pm.training_pixels(spm, im), t, text), atol=1e-5, rtol=0,
                                       msg=lambda m: f"pair_scores differ from scoring each image at its t: {m}")
        assert (s0 - pm.pair_scores(spm, images[:2], images[2:], ids, torch.zeros_like(t))[0]).abs().min() > 1e-4


def test_the_spm_is_told_the_t_its_images_were_noised_at(dataset, identity_sd, tmp_path, monkeypatch):
    """Training and evaluation hand the SPM the same t at which denoised_pair noised the pair, not 0: the step
    awareness of the SPM (accuracy tests alone pass without it, since the images still change with t)."""
    events = []
    real_denoised, real_scores = pm.denoised_pair, pm.pair_scores

    def denoised(pipe, im0, im1, cond, uncond, t, *rest):
        events.append(("noised", t.tolist()))
        return real_denoised(pipe, im0, im1, cond, uncond, t, *rest)

    def scores(model, x0, x1, ids, t):
        events.append(("scored", t.tolist()))
        return real_scores(model, x0, x1, ids, t)

    monkeypatch.setattr(pm, "denoised_pair", denoised)
    monkeypatch.setattr(pm, "pair_scores", scores)
    assert pm.main(["train", "--model", "tiny", "--pretrained", identity_sd, "--data", str(dataset), "--out",
                    str(tmp_path / "run"), "--resolution", "8", "--max-steps", "2", "--eval-every", "2",
                    "--batch-size", "4", "--eval-timesteps", "0", "501"]) == 0
    noised = [i for i, (kind, _) in enumerate(events) if kind == "noised"]
    assert len(noised) >= 2 + 2, "two training steps and evaluations at t = 501"
    for i in noised:
        assert events[i + 1] == ("scored", events[i][1]), f"scored at {events[i + 1][1]}, noised at {events[i][1]}"
    assert any(t != 0 for i in noised for t in events[i][1])


@pytest.fixture(scope="module")
def trained(dataset, identity_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("spm_run") / "run"
    with pytest.MonkeyPatch.context() as patch:  # for this run only: later tests get the real predict_noise
        patch.setattr(pm, "predict_noise", wiener_denoiser(identity_sd))
        code = pm.main(["train", "--model", "tiny", "--pretrained", identity_sd, "--data", str(dataset), "--out",
                        str(out), "--resolution", "8", "--max-steps", "40", "--eval-every", "40", "--batch-size", "16",
                        "--lr", "1e-3"])
    assert code == 0
    return out


def test_training_lifts_accuracy_at_t0_from_chance(trained, capsys):
    evals = [r for r in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines()) if "accuracy" in r]
    first, last = evals[0], evals[-1]
    table = "\n".join(f"t={t:>4}: {first['accuracy'][t]:.3f} -> {last['accuracy'][t]:.3f}" for t in last["accuracy"])
    with capsys.disabled():
        print(f"\nvalidation accuracy by t, step 0 -> step {last['step']} ({last['pairs']} pairs):\n{table}")
    assert last["pairs"] == 64, "validation must skip the pairs without a label"
    assert 0.3 < first["accuracy"]["0"] < 0.7, f"an untrained SPM should be near chance, got {first['accuracy']}"
    assert last["accuracy"]["0"] > 0.8, f"training should learn the redness rule, got {last['accuracy']}"


def test_a_rule_linear_in_the_pixels_stays_readable_at_every_t(trained):
    """The image's share of the x0-prediction falls like a_t, yet the pair shares its noise (as in the reference),
    so the two predictions differ by exactly a_t times the clean images' difference (test_denoised_pair_is_...)
    and the sign of a redness comparison survives however small a_t is. One noise per image instead drops accuracy
    at t = 951 to about 0.65 here. For a rule that is not monotone in the pixels, see the next test."""
    last = [r for r in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines()) if "accuracy" in r][-1]
    assert min(last["accuracy"].values()) > 0.8, f"the shared noise should keep every t readable: {last['accuracy']}"


@pytest.fixture(scope="module")
def trained_on_vividness(identity_sd, tmp_path_factory):
    """An SPM trained on vividness_rule, 1024 training pairs, 300 steps (about 30 s on one core)."""
    folder = tmp_path_factory.mktemp("vivid")
    write_shard(folder / "train-00000-of-00001.parquet", pick_a_pic_rows(1024, seed=11, rule=vividness_rule))
    write_shard(folder / "validation_unique-00000-of-00001.parquet", pick_a_pic_rows(128, seed=12, rule=vividness_rule))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pm, "predict_noise", wiener_denoiser(identity_sd))
        code = pm.main(["train", "--model", "tiny", "--pretrained", identity_sd, "--data", str(folder), "--out",
                        str(folder / "run"), "--resolution", "8", "--max-steps", "300", "--eval-every", "300",
                        "--batch-size", "16", "--lr", "1e-3"])
    assert code == 0
    evals = [r for r in map(json.loads, (folder / "run" / "metrics.jsonl").read_text().splitlines()) if "accuracy" in r]
    return {int(t): a for t, a in evals[0]["accuracy"].items()}, {int(t): a for t, a in evals[-1]["accuracy"].items()}


def test_accuracy_on_a_rule_the_noise_can_hide_degrades_gracefully_with_t(trained_on_vividness, capsys):
    """Human preference is not monotone in the pixels, and neither is vividness (|redness - 0.5|). Its comparison
    of the two x0-predictions a_t x0_i + s_t noise mixes in the shared noise: |a_t r_0 + s_t n| vs |a_t r_1 + s_t n|
    flips with the noise once s_t n is comparable to a_t r, so accuracy falls as s_t / a_t grows, as the paper's SPM
    does, rather than collapsing at the first noisy step. This test's run, t = 0/251/501/701/951: .79/.90/.80/.79/.55.
    A pipeline that ignores t (clean images at every t) keeps them all high and fails here."""
    first, last = trained_on_vividness
    table = "\n".join(f"t={t:>4}: {first[t]:.3f} -> {last[t]:.3f}" for t in last)
    with capsys.disabled():
        print(f"\nvividness rule, validation accuracy by t, step 0 -> step 300 (128 pairs):\n{table}")
    assert all(0.3 < a < 0.7 for a in first.values()), f"an untrained SPM should be near chance: {first}"
    assert last[0] > 0.7, f"training should learn the vividness rule on clean images: {last}"
    noisy = [last[t] for t in (251, 501, 701, 951)]
    assert all(b < a + 0.05 for a, b in zip(noisy, noisy[1:])), f"accuracy should fall as t grows: {last}"
    assert last[501] > 0.65, f"gracefully: half-way through the noise the rule should still be read: {last}"
    assert last[951] < max(last.values()) - 0.2, f"at t = 951 the noise should hide most of the rule: {last}"


def test_metrics_and_checkpoint_files(trained):
    records = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 for r in steps)
    assert steps[0]["lr"] == 1e-3 and steps[1]["lr"] == 0, "DeepSpeed 0.12.3: --lr, then the log warmup from 0"
    assert (trained / "spm.safetensors").is_file() and (trained / "checkpoints" / "step-40" / "optimizer.pt").is_file()


@pytest.mark.parametrize("grad_accum", ["1", "2"])
def test_resume_ends_bitwise_equal_to_an_uninterrupted_run(dataset, identity_sd, tmp_path, grad_accum):
    """Same pairs, t, noise and optimizer state after the cut: every draw is seeded by the micro-batch index (with
    accumulation, micro-batches run ahead of steps: the checkpoint must bring back both counts)."""
    from safetensors.torch import load_file

    flags = ["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
             "--batch-size", "4", "--eval-every", "2", "--eval-timesteps", "0", "--grad-accum", grad_accum]
    assert pm.main([*flags, "--out", str(tmp_path / "full"), "--max-steps", "4"]) == 0
    assert pm.main([*flags, "--out", str(tmp_path / "cut"), "--max-steps", "2"]) == 0
    assert pm.main([*flags, "--out", str(tmp_path / "cut"), "--max-steps", "4", "--resume"]) == 0
    full, resumed = (load_file(tmp_path / run / "spm.safetensors") for run in ("full", "cut"))
    assert all(torch.equal(full[k], resumed[k]) for k in full), "a resumed run must end where an uninterrupted one does"
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


def test_resume_refuses_other_settings_and_another_world_size(dataset, identity_sd, tmp_path, capsys):
    """--resume continues the run in --out as it was set up: a changed setting (here --lr), or a checkpoint from
    another number of ranks (its stream position counts every rank's pairs), is refused, and the run stays."""
    out = tmp_path / "run"
    flags = ["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
             "--batch-size", "2", "--eval-timesteps", "0", "--out", str(out)]
    assert pm.main([*flags, "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert pm.main([*flags, "--max-steps", "2", "--resume", "--lr", "2e-3"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: these settings differ from the run in {out}: lr" in err, err
    progress = out / "checkpoints" / "step-1" / "progress.json"
    progress.write_text(json.dumps(dict(json.loads(progress.read_text()), world_size=2)))
    assert pm.main([*flags, "--max-steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: the run in {out} used 2 ranks, not 1" in err, err
    assert [r["step"] for r in records(out)] == [0, 1, 1], "a refused resume must leave the run as it was"


def test_an_spm_resume_with_an_unreadable_checkpoints_folder_is_refused(dataset, identity_sd, tmp_path, capsys):
    """As spo.py's: glob read a folder we may not read as empty, and --resume started over, dropping the metrics."""
    out = tmp_path / "run"
    flags = ["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
             "--batch-size", "2", "--eval-timesteps", "0", "--out", str(out), "--max-steps", "1"]
    assert pm.main(flags) == 0
    metrics = (out / "metrics.jsonl").read_text()
    (out / "checkpoints").chmod(0)
    try:
        result = subprocess.run(AS_A_USER + [
            sys.executable, "preference_model.py", *flags, "--resume"], capture_output=True, text=True,
            cwd=Path(__file__).parent)
    finally:
        (out / "checkpoints").chmod(0o700)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: permission denied: {out / 'checkpoints'}", result.stderr
    (out / "checkpoints" / "step-99").write_text("")  # a file is no checkpoint, however it is named
    assert (out / "metrics.jsonl").read_text() == metrics and pm.training_checkpoints(out) == [
        out / "checkpoints" / "step-1"]
    shutil.rmtree(out / "checkpoints")  # a run stopped before its first checkpoint starts over, and says so
    capsys.readouterr()
    assert pm.main(flags + ["--resume"]) == 0
    assert f"--resume: {out} holds no checkpoint yet: the run starts from the beginning" in capsys.readouterr().out


def test_a_moved_run_resumes_with_another_eval_every(dataset, identity_sd, tmp_path):
    """--out and --eval-every are not settings of the run: a moved run resumes in its new folder, with a new one."""
    flags = ["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
             "--batch-size", "2", "--eval-timesteps", "0"]
    assert pm.main([*flags, "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 0
    (tmp_path / "run").rename(tmp_path / "moved")
    assert pm.main([*flags, "--out", str(tmp_path / "moved"), "--max-steps", "2", "--eval-every", "1", "--resume"]) == 0
    assert (tmp_path / "moved" / "checkpoints" / "step-2").is_dir()


def test_a_run_killed_during_an_evaluation_resumes_from_the_checkpoint_before_it(dataset, identity_sd, tmp_path,
                                                                                   monkeypatch):
    """The checkpoint comes before the evaluation (which can outlast a preemption's grace period at SD1.5 size):
    a run killed during it loses no training, and --resume redoes that evaluation first."""
    from safetensors.torch import load_file

    flags = ["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
             "--batch-size", "4", "--eval-every", "2", "--eval-timesteps", "0", "--max-steps", "4"]
    assert pm.main([*flags, "--out", str(tmp_path / "full")]) == 0
    real, calls = pm.evaluate, []

    def killed_at_step_2(*args, **kwargs):  # the second evaluation: step 0's comes first
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)
    monkeypatch.setattr(pm, "evaluate", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        pm.main([*flags, "--out", str(tmp_path / "cut")])
    assert json.loads((tmp_path / "cut" / "checkpoints" / "step-2" / "progress.json").read_text())["step"] == 2
    monkeypatch.setattr(pm, "evaluate", real)
    assert pm.main([*flags, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, resumed = (load_file(tmp_path / run / "spm.safetensors") for run in ("full", "cut"))
    assert all(torch.equal(full[k], resumed[k]) for k in full), "a resumed run must end where an uninterrupted one does"
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


def test_resume_drops_what_was_logged_after_its_checkpoint(dataset, identity_sd, tmp_path, monkeypatch):
    """A run killed between checkpoints has logged steps that --resume trains again: metrics.jsonl keeps only what
    came up to the checkpoint, so the resumed run's file equals an uninterrupted run's, each step once."""
    flags = ["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
             "--batch-size", "2", "--eval-every", "2", "--eval-timesteps", "0", "--max-steps", "4"]
    assert pm.main([*flags, "--out", str(tmp_path / "full")]) == 0
    real, calls = pm.preference_loss, []

    def killed_in_step_4(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real(*args)
    monkeypatch.setattr(pm, "preference_loss", killed_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        pm.main([*flags, "--out", str(tmp_path / "cut")])
    assert [r["step"] for r in records(tmp_path / "cut")] == [0, 1, 2, 2, 3], "step 3 logged after the checkpoint"
    monkeypatch.setattr(pm, "preference_loss", real)
    assert pm.main([*flags, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


def test_sigterm_stops_training_after_a_step_with_a_checkpoint_and_resume_is_exact(dataset, identity_sd, tmp_path):
    from safetensors.torch import load_file

    flags = ["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
             "--batch-size", "4", "--max-steps", "12", "--eval-every", "12", "--eval-timesteps", "0"]
    assert pm.main([*flags, "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "preference_model.py", *flags, "--out", str(out)], text=True,
                            cwd=Path(__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and '"loss"' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.05)  # the first optimizer step is logged: the signal lands mid-run
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "--resume" in stdout, "the stop message must say how to resume"
    step = json.loads(next((out / "checkpoints").glob("step-*/progress.json")).read_text())["step"]
    assert 1 <= step < 12 and not (out / "spm.safetensors").exists(), f"stopped at step {step}: not mid-run"
    assert pm.main([*flags, "--out", str(out), "--resume"]) == 0
    full, resumed = (load_file(tmp_path / run / "spm.safetensors") for run in ("full", "stopped"))
    assert all(torch.equal(full[k], resumed[k]) for k in full), "a resumed run must end where an uninterrupted one does"
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == metrics.read_text()


def test_preference_loss_equals_hand_computation():
    s0, s1 = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 3.0, 0.5])
    label_0, label_1 = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    n = torch.tensor([1.0, 2.0, 4.0])
    ce0 = math.log(1 + math.exp(1.0 - 2.0))  # -log softmax([2, 1])[0]
    ce1 = math.log(1 + math.exp(1.0 - 3.0))  # -log softmax([1, 3])[1]
    tie = 0.5 * math.log(2) + 0.5 * math.log(2) + math.log(0.5)  # equal scores on a tie cost exactly 0
    w = [1 / 1, 1 / 2, 1 / 4]
    expected = (w[0] * ce0 + w[1] * ce1 + w[2] * tie) / sum(w)
    weighted, weights = pm.preference_loss(s0, s1, label_0, label_1, n)
    got = (weighted / weights).item()
    assert abs(got - expected) < 1e-6, f"loss {got}, hand computation {expected}"
    assert abs(tie) < 1e-12


def test_lr_schedule_is_log_warmup_then_linear_decay():
    """DeepSpeed's WarmupDecayLR (deepspeed/runtime/lr_schedules.py, 0.12.3 as the reference pins) leaves the
    optimizer's lr alone when it is built (v0.15.3 began to set warmup_min_lr there); the engine calls step()
    after every update, which sets the lr of iteration i = 0, 1, ...: so update k >= 1 runs at iteration k - 1's."""
    assert pm.lr_factor(0, 500, 8000) == 1 and pm.lr_factor(1, 500, 8000) == 0  # the optimizer's lr, then log(1)
    assert abs(pm.lr_factor(100, 500, 8000) - math.log(100) / math.log(500)) < 1e-12  # iteration 99
    assert pm.lr_factor(499, 500, 8000) < 1 and pm.lr_factor(501, 500, 8000) == 1  # iteration 500: decay starts
    assert pm.lr_factor(4251, 500, 8000) == 0.5 and pm.lr_factor(8001, 500, 8000) == 0
    assert [pm.lr_factor(k, 0, 10) for k in range(5)] == [1, 0, 1, 1, 0.875]  # DeepSpeed's max(2, warmup) too


def test_trained_checkpoint_drives_a_tiny_spo_run(trained, tmp_path):
    import spo

    ckpt = str(trained / "spm.safetensors")
    spo.main(["--model", "tiny", "--steps", "6", "--divert-start-step", "2", "--k", "3", "--resolution", "8",
              "--sample-batch-size", "4", "--epochs", "1", "--preference-checkpoint", ckpt, "--out", str(tmp_path / "spo")])
    assert (tmp_path / "spo" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "spo" / "config.json").read_text())["preference_checkpoint"] == ckpt


def test_eval_command_prints_the_accuracy_table(trained, dataset, identity_sd, capsys):
    code = pm.main(["eval", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
                    "--checkpoint", str(trained / "spm.safetensors"), "--eval-timesteps", "0", "501"])
    printed = capsys.readouterr().out
    assert code == 0 and "accuracy on 64 validation pairs" in printed
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "501"]
    last = [r for r in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines()) if "accuracy" in r][-1]
    assert abs(float(rows[0][1]) - last["accuracy"]["0"]) < 1e-3, "eval must reproduce the run's last evaluation"


def test_evaluation_noise_is_seeded_by_batch_and_t(dataset, identity_sd, monkeypatch):
    """Each (validation batch, t) draws its own noise from its own seed, the same in every evaluation: the accuracy
    at one t is not tied to another t's noise, and repeats exactly."""
    real, seeds = pm.denoised_pair, []

    def denoised(pipe, im0, im1, cond, uncond, t, generator, *rest):
        seeds.append(generator.initial_seed())
        return real(pipe, im0, im1, cond, uncond, t, generator, *rest)
    monkeypatch.setattr(pm, "denoised_pair", denoised)
    flags = ["eval", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
             "--batch-size", "32", "--eval-timesteps", "0", "251", "501"]
    assert pm.main(flags) == 0 and pm.main(flags) == 0
    assert len(seeds) == 8 and seeds[:4] == seeds[4:], f"two evaluations, 2 batches x 2 noisy t each: {seeds}"
    assert len(set(seeds[:4])) == 4, f"every (batch, t) must draw its own noise, seeds {seeds[:4]}"


def test_eval_scores_with_the_presets_released_spm_by_default(dataset, capsys):
    """eval --kind spm without --checkpoint evaluates the preset's SPM (for tiny, the tiny "trained" one), not a
    freshly initialised SPM, which would be plain PickScore."""
    flags = ["eval", "--model", "tiny", "--resolution", "8", "--data", str(dataset), "--eval-timesteps", "0"]
    assert pm.main(flags) == 0
    default = capsys.readouterr().out
    assert pm.main([*flags, "--checkpoint", pm.tiny_spm_paths()[2]]) == 0
    explicit = capsys.readouterr().out
    assert default.startswith("tiny: accuracy on 64"), default
    assert default.splitlines()[1:] == explicit.splitlines()[1:], (default, explicit)


def test_a_human_tie_counts_half_in_the_accuracy(dataset, identity_sd, tmp_path, capsys):
    """Validation pairs that humans called a tie count half whichever image the SPM prefers: all ties, 0.5."""
    import pyarrow.parquet as pq

    shutil.copytree(dataset, tmp_path / "ties")
    path = tmp_path / "ties" / "validation_unique-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row.update(label_0=0.5, label_1=0.5)
    write_shard(path, rows)
    code = pm.main(["eval", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data",
                    str(tmp_path / "ties"), "--eval-timesteps", "0", "501"])
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert code == 0 and [row[1] for row in table] == ["0.500", "0.500"], table


def corrupt(dataset, tmp_path, change):
    """A copy of the dataset whose validation row 5 is changed by change(row)."""
    import pyarrow.parquet as pq

    folder = tmp_path / "bad"
    shutil.copytree(dataset, folder)
    path = folder / "validation_unique-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    change(rows[5])
    write_shard(path, rows)
    return folder, path


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(jpg_1=b"not a jpeg"), "row 5, jpg_1: not a readable image"),
    (lambda r: r.update(label_0=0.7, label_1=0.3), "row 5: labels (0.7, 0.3) must each be 0, 0.5 or 1"),
    (lambda r: r.update(label_0=1.0, label_1=1.0), "row 5: labels (1.0, 1.0) must sum to 1"),
    (lambda r: r.update(caption=None), "row 5: caption must be a string, got None"),
    (lambda r: r.update(num_example_per_prompt=math.inf), "row 5: num_example_per_prompt must be a count in [1, 2^24]"),
    (lambda r: r.update(num_example_per_prompt=0), "row 5: num_example_per_prompt must be a count in [1, 2^24]"),
])
def test_bad_rows_are_named(dataset, tmp_path, capsys, change, message):
    folder, path = corrupt(dataset, tmp_path, change)
    code = pm.main(["eval", "--model", "tiny", "--data", str(folder), "--eval-timesteps", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{path}, {message}" in err, err


def test_a_run_its_data_refuses_before_any_checkpoint_leaves_nothing(dataset, tmp_path, capsys):
    """Bad rows show only when they are read: the run folder goes, so the same command runs again once the data is
    fixed (it used to stay, and --out 'already holds files' refused the rerun)."""
    folder, path = corrupt(dataset, tmp_path, lambda r: r.update(jpg_1=b"not a jpeg"))
    absent, empty, link = tmp_path / "absent", tmp_path / "empty", tmp_path / "link"
    empty.mkdir()
    link.symlink_to(empty)
    for out in (absent, empty, link):  # a folder the user made stays, empty again
        code = pm.main(["train", "--model", "tiny", "--resolution", "8", "--data", str(folder), "--out", str(out),
                        "--eval-timesteps", "0"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"{path}, row 5, jpg_1: not a readable image" in err, err
        assert not absent.exists() and empty.is_dir() and link.is_symlink() and not any(empty.iterdir())


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(dataset, identity_sd, tmp_path,
                                                                          monkeypatch):
    real, updates = pm.preference_loss, []
    monkeypatch.setattr(pm, "preference_loss", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: updates.append(1))
    out, printed = tmp_path / "out", io.StringIO()
    monkeypatch.setattr(sys, "stdout", printed)  # stdout and stderr in one stream, as in a terminal
    monkeypatch.setattr(sys, "stderr", printed)
    code = pm.main(["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data",
                    str(dataset), "--batch-size", "2", "--grad-accum", "1", "--eval-timesteps", "0", "--max-steps",
                    "20", "--out", str(out)])
    # the evaluation's report and the error start lines of their own, not the progress bar's
    lines = re.split(r"[\r\n]", printed.getvalue())
    assert code == 1 and any(line.startswith("error: 10 non-finite steps in a row") for line in lines), \
        f"the error must not join the progress bar's line: {printed.getvalue()[-300:]!r}"
    assert any(line.startswith("step 0: accuracy on") for line in lines), printed.getvalue()[:300]
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 10 and all(r["skipped"] == "non-finite gradient" for r in steps)
    assert not updates, "a skipped step must not update the SPM"


def test_updates_see_gradients_clipped_to_max_grad_norm_and_the_unclipped_norm_is_logged(dataset, identity_sd,
                                                                                         tmp_path, monkeypatch):
    """The optimizer steps on gradients of norm <= --max-grad-norm, those of sum(w * loss) / sum(w) clipped (after
    the rescale to that loss), while metrics.jsonl logs the norm before clipping."""
    real_step, norms = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "out"
    assert pm.main(["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data",
                    str(dataset), "--batch-size", "2", "--max-steps", "2", "--eval-timesteps", "0",
                    "--max-grad-norm", "1e-3", "--out", str(out)]) == 0
    logged = [r["grad_norm"] for r in records(out) if "loss" in r]
    assert len(norms) == 2 and all(n <= 1e-3 * (1 + 1e-4) for n in norms), f"unclipped updates: norms {norms}"
    assert all(n > 1e-2 for n in logged), f"the log should hold the norm before clipping, got {logged}"


def test_a_finite_step_resets_the_count_of_non_finite_steps_in_a_row(dataset, identity_sd, tmp_path, monkeypatch):
    """Only MAX_BAD_STEPS non-finite steps *in a row* stop a run: two bad steps then a good one, repeated, with a
    limit of 3, trains to the end, skipping the bad ones."""
    real, calls = pm.preference_loss, []

    def every_third_finite(*args):
        calls.append(1)
        weighted, weights = real(*args)
        return (weighted if len(calls) % 3 == 0 else weighted * float("nan")), weights
    monkeypatch.setattr(pm, "preference_loss", every_third_finite)
    monkeypatch.setattr(pm, "MAX_BAD_STEPS", 3)
    out = tmp_path / "out"
    code = pm.main(["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data",
                    str(dataset), "--batch-size", "2", "--eval-timesteps", "0", "--max-steps", "7", "--out", str(out)])
    steps = [r for r in records(out) if "loss" in r]
    assert code == 0, "a finite step must reset the count of non-finite steps in a row"
    assert [r["step"] for r in steps if "skipped" in r] == [1, 2, 4, 5, 7]


def test_every_micro_batch_draws_its_t_and_noise_from_its_own_seed(dataset, identity_sd, tmp_path, monkeypatch):
    """The generator of the training t and noise is seeded by the micro-batch's index, not the step's: with
    --grad-accum 2 the two micro-batches of an update draw different t (resume relies on the index too). t is
    drawn from all of the SPM's steps [0, 999]."""
    real_randint, seeds, ranges = torch.randint, [], []

    def randint(low, high, *args, generator=None, **kwargs):
        if generator is not None:
            seeds.append(generator.initial_seed())
            ranges.append((low, high))
        return real_randint(low, high, *args, generator=generator, **kwargs)
    monkeypatch.setattr(torch, "randint", randint)
    assert pm.main(["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data",
                    str(dataset), "--batch-size", "2", "--grad-accum", "2", "--max-steps", "2", "--eval-timesteps",
                    "0", "--out", str(tmp_path / "out")]) == 0
    assert seeds == [42 * 1_000_003 + micro for micro in range(4)], f"seeds {seeds}: one per micro-batch, in order"
    assert ranges == [(0, 1000)] * 4, f"t must be drawn from [0, 999], drawn from [low, high) = {ranges}"


def test_a_half_precision_run_keeps_the_frozen_sd_in_fp16_as_the_reference(dataset, identity_sd, tmp_path,
                                                                            monkeypatch):
    """The reference runs its SD in fp16 and its SPM in bf16: --precision bf16 autocasts the SPM to bf16 (no
    GradScaler) while the frozen UNet and VAE hold fp16 weights; fp32 keeps everything in fp32."""
    seen = {}
    real_pipeline = pm.Pipeline
    monkeypatch.setattr(pm, "Pipeline", lambda *a, **k: seen.setdefault("pipe", real_pipeline(*a, **k)))
    fp32 = pm.precision_setup(argparse.Namespace(device="cpu", precision="fp32"))
    assert fp32[1] == torch.float32 and isinstance(fp32[2], contextlib.nullcontext)
    code = pm.main(["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data",
                    str(dataset), "--batch-size", "2", "--max-steps", "2", "--eval-timesteps", "501", "--precision",
                    "bf16", "--out", str(tmp_path / "out")])
    assert code == 0
    assert seen["pipe"].unet.dtype == seen["pipe"].vae.dtype == torch.float16
    losses = [r["loss"] for r in records(tmp_path / "out") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    optimizer_state = torch.load(tmp_path / "out" / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)
    assert not optimizer_state["scaler"], "bf16 needs no GradScaler"


def test_missing_columns_are_named(dataset, tmp_path, capsys):
    import pyarrow.parquet as pq

    folder = tmp_path / "bad"
    shutil.copytree(dataset, folder)
    path = folder / "train-00001-of-00002.parquet"
    pq.write_table(pq.read_table(path).drop(["label_1", "has_label"]), path)
    code = pm.main(["train", "--model", "tiny", "--data", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {path}: missing Pick-a-Pic columns label_1, has_label"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["--max-steps", "0"], "--max-steps must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0, got 0.0"),  # clipping to 0 would zero every update
    (["--grad-accum", "0"], "--grad-accum must be > 0, got 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    (["--pickscore-labels", "1"], "--pickscore-labels must be in [0, 1) or none, got 1.0"),  # p_0 - p_1 > 1: all ties
    (["--eval-timesteps", "0", "1000"], "--eval-timesteps must be in [0, 999], got 1000"),
    (["--eval-timesteps", "0", "501", "0"], "--eval-timesteps names a t twice: 0 501 0"),  # t = 0 scored 1.34
    (["--cfg", "0.5"], "--cfg must be >= 1 (1: no guidance), got 0.5"),  # predict_noise would ignore it
    (["--resume"], "holds no run to resume"),
    (["--data", "/nonexistent/pickapic"], "--data: no such folder: /nonexistent/pickapic"),
    (["--data", "~nosuchuser/pickapic"], "--data: no such folder: ~nosuchuser/pickapic"),
    (["--data", "n" * 300], "file name too long"),
    (["--cfg", "nan"], "argument --cfg: must be a finite number, got 'nan'"),  # it trained a NaN SPM to exit 0
    (["--resolution", "7"], "--resolution must be a positive multiple of 8, got 7"),
    (["--resolution", "16392"], "--resolution must be at most 16384 pixels, got 16392"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--out", ""], "--out is empty: give it a value or leave the flag out"),
    (["--bogus"], "unrecognized arguments: --bogus"),  # argparse's errors once gave a traceback here
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(dataset, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code = pm.main(["train", "--model", "tiny", "--data", str(dataset), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_an_spm_run_folder_in_use_is_refused_to_a_second_run(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    with D.run_folder_lock(out):  # another train run, still going, made the folder and holds it
        code = pm.main(["train", "--model", "tiny", "--data", str(dataset), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: --out {out} is in use by another run that is still going", err
    assert out.is_dir() and not any(out.iterdir()), "the other run's folder must stay as it was"


def test_train_accepts_each_flag_at_the_edge_of_its_range(tmp_path, capsys):
    """Valid edges (--seed 2^32 - 1, --pickscore-labels 0, --cfg 1, an empty --out folder) pass the flag checks:
    only the one bad flag here, --resolution 7, is named."""
    (tmp_path / "out").mkdir()
    code = pm.main(["train", "--model", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                    "--seed", str(2**32 - 1), "--pickscore-labels", "0", "--cfg", "1", "--resolution", "7"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --resolution must be a positive multiple of 8, got 7", err


def test_each_epoch_reshuffles_the_row_groups_and_their_rows(dataset):
    train = pm.row_groups(pm.find_shards(str(dataset), "train"))
    in_order = stream_keys(pm.read_rows(train, 8, False), 512)
    starts = list(itertools.accumulate([0] + [n for *_, n in train]))
    group_of = {key: next(g for g in range(len(train)) if starts[g] <= i < starts[g + 1]) for i, key in enumerate(in_order)}
    assert len(group_of) == 512 and len(train) > 2
    stream = stream_keys(pm.read_rows(train, 8, False, seed=3), 1024)
    epochs = stream[:512], stream[512:]
    assert all(sorted(e) == sorted(in_order) for e in epochs), "an epoch must hold every pair once"
    group_orders = [list(dict.fromkeys(group_of[k] for k in e)) for e in epochs]
    assert group_orders[0] != group_orders[1], "both epochs read the row groups in one order"
    rows_of = lambda e, g: [k for k in e if group_of[k] == g]
    assert all(rows_of(epochs[0], g) != rows_of(epochs[1], g) for g in range(len(train)) if train[g][3] > 2), (
        "a row group's rows come in the same order in both epochs")


# ---- SPM training on several ranks: torchrun with gloo on the CPU ----

def stream_keys(rows, n):
    """The first n pairs of a read_rows stream, as comparable keys."""
    return [(c, i0.sum().item(), i1.sum().item(), l0) for c, i0, i1, l0, _, _ in itertools.islice(rows, n)]


def test_ranks_split_the_stream_disjointly_and_resume_in_place(dataset):
    """Two ranks' shares interleave back into the one-process stream (across an epoch boundary: 512 train
    pairs), a resumed share goes on where it stopped, and validation is split by whole batches."""
    train = pm.row_groups(pm.find_shards(str(dataset), "train"))
    single = stream_keys(pm.read_rows(train, 8, False, seed=3), 560)
    shares = [stream_keys(pm.read_rows(train, 8, False, seed=3, rank=r, world=2), 280) for r in (0, 1)]
    assert [row for pair in zip(*shares) for row in pair] == single
    assert stream_keys(pm.read_rows(train, 8, False, seed=3, skip=2 * 270, rank=1, world=2), 10) == shares[1][270:]
    valid = pm.row_groups(pm.find_shards(str(dataset), "validation_unique"))
    whole = stream_keys(pm.read_rows(valid, 8, True), 100)
    halves = [stream_keys(pm.read_rows(valid, 8, True, rank=r, world=2, block=16), 100) for r in (0, 1)]
    assert len(whole) == 64 and halves[0] == whole[:16] + whole[32:48] and halves[1] == whole[16:32] + whole[48:]


SPM_DDP_RUN = """
import json, os, sys
sys.path.insert(0, {project!r})
import torch
torch.set_num_threads(1)
import preference_model as pm
real_train, real_pair, real_evaluate, phase, seeds = pm.train_command, pm.denoised_pair, pm.evaluate, ["train"], []


def train_and_keep(args, rank, world):  # every rank's SPM at the end, to compare them
    model = real_train(args, rank, world)
    pm.save_checkpoint(model, f"{{args.out}}.rank{{rank}}.safetensors")
    return model


def denoised_pair(pipe, im0, im1, cond, uncond, t, generator, *rest):  # each noise draw's seed and pairs
    seeds.append((phase[0], generator.initial_seed(), [round(x, 3) for x in im0.flatten(1).sum(1).tolist()]))
    return real_pair(pipe, im0, im1, cond, uncond, t, generator, *rest)


def evaluate(*args, **kwargs):
    phase[0] = "eval"
    try:
        return real_evaluate(*args, **kwargs)
    finally:
        phase[0] = "train"


pm.train_command, pm.denoised_pair, pm.evaluate = train_and_keep, denoised_pair, evaluate
try:
    code = pm.main(sys.argv[1:])
finally:
    with open(sys.argv[sys.argv.index("--out") + 1] + ".seeds." + os.environ.get("RANK", "0"), "w") as f:
        json.dump(seeds, f)
sys.exit(code)
"""


def spm_torchrun(tmp_path, nproc, flags):
    """preference_model.py under torchrun; each rank also saves its SPM (OUT.rankR.safetensors) and the seed and
    pairs of each noise draw (OUT.seeds.R)."""
    script = tmp_path / "spm_ddp_run.py"
    script.write_text(SPM_DDP_RUN.format(project=str(Path(__file__).resolve().parent)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             str(script), *flags], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def ddp_flags(dataset, identity_sd):
    return ["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(dataset),
            "--batch-size", "4", "--grad-accum", "2", "--max-steps", "3", "--eval-every", "3",
            "--eval-timesteps", "0", "501"]


@pytest.fixture(scope="module")
def single_run(ddp_flags, tmp_path_factory):
    out = tmp_path_factory.mktemp("spm_single") / "run"
    assert pm.main([*ddp_flags, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def two_rank_run(ddp_flags, tmp_path_factory):
    """The flags above on two ranks, uninterrupted: (its folder, what it printed)."""
    tmp = tmp_path_factory.mktemp("spm_two_ranks")
    printed = spm_torchrun(tmp, 2, [*ddp_flags, "--out", str(tmp / "run")])
    return tmp / "run", printed


@pytest.fixture(scope="module")
def one_rank_run(ddp_flags, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spm_one_rank")
    spm_torchrun(tmp, 1, [*ddp_flags, "--out", str(tmp / "run")])
    return tmp / "run"


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_to_identical_spms(two_rank_run, single_run):
    from safetensors.torch import load_file

    out, printed = two_rank_run
    assert "4 pairs x 2 accumulation x 2 ranks = 16 pairs per update" in printed
    rank0, rank1, written = (load_file(p) for p in (f"{out}.rank0.safetensors", f"{out}.rank1.safetensors",
                                                   out / "spm.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], written[k]) for k in rank0), \
        "DDP ranks ended with different SPM weights"
    start = load_file(single_run / "spm.safetensors")
    assert any(not torch.equal(rank0[k], start[k]) for k in rank0), "the ranks must train on different pairs"
    logged = records(out)
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 3], "rank 0 alone writes the metrics, once per step"
    assert all(r["pairs"] == 64 for r in logged if "accuracy" in r), "evaluation must cover the whole validation set"
    # Validation split by whole batches with each batch's own noise: the same numbers as one process.
    assert logged[0] == records(single_run)[0]
    assert json.loads((out / "checkpoints" / "step-3" / "progress.json").read_text())["world_size"] == 2


def test_two_ranks_resume_where_they_stopped(ddp_flags, two_rank_run, tmp_path):
    """--resume under torchrun passes over every rank's pairs (micro-batches x batch size x ranks), so a 2-rank run
    stopped after step 1 and resumed ends with the weights and losses of an uninterrupted one."""
    from safetensors.torch import load_file

    full, cut = two_rank_run[0], tmp_path / "cut"
    spm_torchrun(tmp_path, 2, [*ddp_flags, "--out", str(cut), "--max-steps", "1"])
    spm_torchrun(tmp_path, 2, [*ddp_flags, "--out", str(cut), "--resume"])
    a, b = (load_file(run / "spm.safetensors") for run in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed 2-rank run must end where an uninterrupted one does"
    losses = [[r["loss"] for r in records(run) if "loss" in r] for run in (full, cut)]
    assert losses[0] == losses[1], losses


def test_ranks_draw_their_own_training_noise_and_each_validation_batchs_own(two_rank_run, one_rank_run):
    """Under torchrun each rank's micro-batches draw their t and noise from their own seeds (ranks that shared them
    would noise their pairs alike), while validation batch b, the same pairs as in one process, gets batch b's
    noise whichever rank evaluates it: the same numbers as one process."""
    ranks = [s for r in (0, 1) for s in json.loads(Path(f"{two_rank_run[0]}.seeds.{r}").read_text())]
    one = json.loads(Path(f"{one_rank_run}.seeds.0").read_text())
    train = [seed for phase, seed, _ in ranks if phase == "train"]
    assert len(train) == 3 * 2 * 2 and len(set(train)) == len(train), f"ranks or micro-batches share seeds: {train}"
    evals = [sorted([seed, pairs] for phase, seed, pairs in run if phase == "eval") for run in (ranks, one)]
    assert evals[0] and evals[0] == evals[1], f"validation batches or their noise depend on the rank: {evals}"


def test_world_size_1_under_torchrun_equals_the_single_process_run(one_rank_run, single_run):
    from safetensors.torch import load_file

    single, world1 = (load_file(run / "spm.safetensors") for run in (single_run, one_rank_run))
    assert all(torch.equal(single[k], world1[k]) for k in single), "world size 1 must train exactly as one process"
    assert (one_rank_run / "metrics.jsonl").read_text() == (single_run / "metrics.jsonl").read_text()


SPM_CLEAN_PAIRS_AT_T0 = """
import sys
sys.path.insert(0, {project!r})
import torch
torch.set_num_threads(1)
import preference_model as pm
pm.denoised_pair = lambda pipe, im0, im1, *rest: (im0, im1)  # clean images: no noise draw that depends on the split
pm.torch.randint = lambda low, high, size, **kw: torch.zeros(size, dtype=torch.long, device=kw.get("device"))  # t = 0
sys.exit(pm.main(sys.argv[1:]))
"""


def test_an_update_normalises_the_pair_weights_over_every_rank_and_micro_batch(identity_sd, tmp_path, monkeypatch):
    """The reference all-gathers the pairs of every GPU and only then normalises the weights 1 / (pairs of the
    prompt). So the same 8 pairs must give the same loss and gradient as one batch of 8, as 2 micro-batches of 4,
    and as 2 ranks of 4 (per-batch normalisation, averaged, gives other ones when the prompt counts differ)."""
    data = tmp_path / "data"
    data.mkdir()
    train = pick_a_pic_rows(16, seed=5)
    for i, row in enumerate(train):
        row["num_example_per_prompt"] = [1, 12, 3, 40, 2, 7, 25, 1][i % 8]
    write_shard(data / "train-00000-of-00001.parquet", train)
    write_shard(data / "validation_unique-00000-of-00001.parquet", pick_a_pic_rows(4, seed=6))
    flags = ["train", "--model", "tiny", "--pretrained", identity_sd, "--resolution", "8", "--data", str(data),
             "--max-steps", "1", "--eval-timesteps", "0"]
    monkeypatch.setattr(pm, "denoised_pair", lambda pipe, im0, im1, *rest: (im0, im1))  # as the script above
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: torch.zeros(size, dtype=torch.long))
    for name, split in [("batch", ["--batch-size", "8"]), ("micro", ["--batch-size", "4", "--grad-accum", "2"])]:
        assert pm.main([*flags, *split, "--out", str(tmp_path / name)]) == 0
    script = tmp_path / "clean_pairs.py"
    script.write_text(SPM_CLEAN_PAIRS_AT_T0.format(project=str(Path(__file__).resolve().parent)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *flags, "--batch-size", "4", "--out", str(tmp_path / "ranks")],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    batch, micro, ranks = ([r for r in records(tmp_path / run) if "loss" in r][0] for run in ("batch", "micro", "ranks"))
    for other in (micro, ranks):
        assert math.isclose(other["loss"], batch["loss"], rel_tol=1e-5), (other, batch)
        assert math.isclose(other["grad_norm"], batch["grad_norm"], rel_tol=1e-4), (other, batch)


SPM_BAD_ROW_ON_RANK_1 = """
import sys
sys.path.insert(0, {project!r})
import torch
torch.set_num_threads(1)
import preference_model as pm
real_read_rows = pm.read_rows


def read_rows(units, *args, rank=0, seed=None, **kwargs):  # rank 1 alone meets a bad row, in its second micro-batch
    for i, row in enumerate(real_read_rows(units, *args, rank=rank, seed=seed, **kwargs)):
        if rank == 1 and i == 5 and (seed is None) == {in_validation!r}:
            raise pm.UserError("shard.parquet, row 7: labels (0.7, 0.3) must each be 0, 0.5 or 1")
        yield row


pm.read_rows = read_rows
sys.exit(pm.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("in_validation", [False, True], ids=["training row", "validation row"])
def test_a_bad_row_on_another_rank_stops_every_rank_with_one_line_and_leaves_nothing(ddp_flags, tmp_path,
                                                                                     in_validation):
    """The rank that reads the row says which it is; the others, instead of waiting in a collective for a peer
    that is gone (torchrun then reports a dead peer), stop at the same micro-batch and say which rank stopped."""
    script = tmp_path / "bad_row.py"
    script.write_text(SPM_BAD_ROW_ON_RANK_1.format(project=str(Path(__file__).resolve().parent),
                                                   in_validation=in_validation))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *ddp_flags, "--out", str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    printed = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: shard.parquet, row 7: labels (0.7, 0.3) must each be 0, 0.5 or 1" in printed, printed[-3000:]
    assert "error: rank 1 stopped at input it cannot use" in printed, printed[-3000:]
    assert printed.count("Traceback") == printed.count("raise ChildFailedError") == 1, "only torchrun's own"
    assert not out.exists(), "a fresh run that stopped before its first checkpoint leaves nothing"


# ---- performance: full-size architectures without downloads, and the benchmark mode ----


RELEASED_SIZES = {  # parameter counts of the released checkpoints' parts
    "sd15": dict(unet=859_520_964, vae=83_653_863, text_encoder=123_060_480),
    "sdxl": dict(unet=2_567_463_684, vae=83_653_863, text_encoder=123_060_480, text_encoder_2=694_659_840),
}


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_random_init_builds_the_real_sizes(model, tmp_path):
    """--random-init must cost what the real model costs: its parts have the released parameter counts."""
    parts = D.random_pipeline_parts(model, tmp_path, device="meta")  # shapes only, no memory
    counts = {name: sum(p.numel() for p in parts[name].parameters()) for name in RELEASED_SIZES[model]}
    assert counts == RELEASED_SIZES[model]


def test_benchmark_smoke_on_cpu(capsys, monkeypatch):
    """A short --benchmark on the tiny model: the table and the per-prompt counts (no timing assertion, but the
    judge's text features, made slow here, are charged inside sampling: the sampling UNet's row is what remains)."""
    encode_text = pm.PickScoreModel.encode_text
    monkeypatch.setattr(pm.PickScoreModel, "encode_text", lambda self, ids: time.sleep(1) or encode_text(self, ids))
    spo.main(["--model", "tiny", "--random-init", "--benchmark", "1", "--steps", "6", "--divert-start-step", "2",
              "--k", "3", "--resolution", "16", "--threshold", "0", "--out", "/nonexistent/never-written"])
    out = capsys.readouterr().out
    for row in ("sampling UNet", "VAE decode", "preference model", "training forward/backward", "optimizer", "TFLOP"):
        assert row in out, f"missing {row!r} in:\n{out}"
    # 6 steps, pools of 3 from step 2: 2 + 1 + 3 * 3 UNet samples, 3 * 4 decodes and scores, 4 pairs at threshold 0
    assert "12 sampling UNet samples" in out and "12 VAE decodes" in out and "12 preference image" in out
    assert "4.0 training pairs from 4.0 parent latents" in out, "SD1.5 pairs share their parent"
    row = lambda name: float(re.search(rf"^{name} +([-0-9.]+)", out, re.M)[1])
    assert row("preference text") >= 0.25 and row("sampling UNet") > 0, out  # 1 s over 4 prompts
    assert not Path("/nonexistent/never-written").exists()


def test_compiled_benchmark_counts_flops_eagerly_and_compiles_only_while_warming_up(capsys, monkeypatch):
    """FlopCounterMode is a dispatch mode that torch.compile cannot trace (fullgraph then fails), so the counted
    batch runs eagerly and a compiled run warms up once more. Dynamo's cheap "eager" backend stands in for
    inductor; each graph it is handed is stamped with the candidate pool being sampled then (1: counted, 2:
    compiling, 3: timed)."""
    pools, graphs, compile = [], [], torch.compile
    sample_pool = spo.sample_candidate_pool
    monkeypatch.setattr(spo, "sample_candidate_pool", lambda *args: pools.append(1) or sample_pool(*args))

    def stamped(graph, inputs):
        graphs.append(len(pools))
        return graph.forward

    monkeypatch.setattr(torch, "compile", lambda model, mode, **kwargs: compile(model, backend=stamped, **kwargs))
    torch._dynamo.reset()
    try:
        spo.main(["--model", "tiny", "--random-init", "--benchmark", "1", "--steps", "4", "--divert-start-step", "1",
                  "--k", "2", "--resolution", "16", "--threshold", "0", "--compile", "--out", "/nonexistent/never"])
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "benchmark: CPU" in out and re.search(r"warm-up: [0-9.]+ s eager, counting FLOPs, [0-9.]+ s compiling", out)
    assert len(pools) == 3
    assert graphs and set(graphs) == {2}, f"graphs compiled while sampling pools {graphs}: only the second warms up"
    # the timed batch alone: 4 steps, pools of 2 from step 1 (1 + 1 + 2 * 2 samples), 3 pairs at threshold 0
    assert "6 sampling UNet samples" in out and "6 VAE decodes" in out and "3.0 training pairs" in out, out
    assert float(re.search(r"([0-9.e-]+) TFLOP per prompt", out)[1]) > 0, "the eager batch counts the FLOPs"


def test_sdxl_benchmark_counts_the_inner_steps(capsys):
    """SDXL's chunks: 8 steps, pools of 2 at steps 2 and 6, 3 inner steps. 6 transitions per prompt become pairs;
    the first of each chunk shares its parent, the 4 inner ones need a second: 10 parent latents."""
    spo.main(["--model", "tiny-sdxl", "--random-init", "--benchmark", "1", "--steps", "8", "--divert-start-step", "2",
              "--resolution", "16", "--sample-batch-size", "2", "--threshold", "0", "--out", "/nonexistent/never"])
    out = capsys.readouterr().out
    assert "13 sampling UNet samples" in out and "4 VAE decodes" in out  # 2 + 1 + 2 * 5; 2 judgements of 2
    assert "6.0 training pairs from 10.0 parent latents" in out


def test_sample_benchmark_smoke_on_cpu(capsys, monkeypatch):
    """sample.py --benchmark measures this sampler and diffusers' pipeline in one run and writes nothing; --benchmark N
    times N batches after one warm-up batch."""
    calls = []
    generate = sample.generate
    monkeypatch.setattr(sample, "generate",
                        lambda *args, **kwargs: calls.append(len(args[1])) or generate(*args, **kwargs))
    sample.main(["--model", "tiny", "--benchmark", "2", "--batch-size", "2", "--steps", "3", "--height", "16",
                 "--width", "16", "--out", "/nonexistent/never-written"])
    out = capsys.readouterr().out
    assert "this sampler" in out and "diffusers StableDiffusionPipeline" in out and out.count("images/s") == 2
    assert calls == [2, 2, 2], f"expected a warm-up and 2 timed batches of 2 images, got batches {calls}"
    assert not Path("/nonexistent/never-written").exists()


def test_help_documents_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        spo.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after hyphens too
    assert exit_info.value.code == 0
    for f in dataclasses.fields(spo.Config):
        assert "--" + f.name.replace("_", "-") in text, f"--help lacks --{f.name}"
    assert "passes over the prompts (default: 10, tiny: 2, tiny-sdxl: 2)" in text
    assert "candidates per pool (default: 4, sdxl: 2, tiny-sdxl: 2)" in text and "DPO temperature (default: 10.0)" in text


def test_decode_in_chunks_equals_one_batch():
    pipe = D.Pipeline("tiny")
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pipe.decode(latents, chunk=2), pipe.decode(latents, chunk=5), rtol=0, atol=1e-5)
