"""Tests that read as the specification of this project.

Where the official SPO code defines the math, we check ours against the golden vectors taken from
it (../shared/golden, see its README). Everything runs offline on CPU in well under a minute.

    python -m pytest -x -q test_spo.py
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def test_pixels_outside_minus_one_one_are_accepted(golden_spm, spm_io):
    with torch.no_grad():
        overshooting = 3 * spm_io["square_images"]
        scores = golden_spm.score(overshooting, spm_io["square_input_ids"], spm_io["square_timesteps"])
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
])
def test_cli_bad_input_exits_2_with_one_line(capsys, tiny_spm, png_files, extra, message):
    code = pm.main(["score", "--model", "tiny", "--prompt", "a red cat", "--image", png_files[0], *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, "bad input should exit 2"
    assert len(err) == 1 and message in err[0], f"expected one error line about {message!r}, got {err}"
