"""`stages` as a library: its one import surface (stages.__init__) names every public building
block, loads nothing heavy until a name is used, and the README's "Encoder and mixing as a library"
example runs as written."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

import stages


def test_every_name_of_the_surface_resolves_to_its_module():
    for name, module in stages._EXPORTS.items():
        value = getattr(stages, name)
        assert getattr(value, "__module__", module) == module, name
        assert value is getattr(sys.modules[module], name)


def test_importing_stages_loads_no_torch():
    code = "import sys, stages, stages.errors; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_the_readme_library_example_runs(tiny_model_config):
    from stages import compose_loser, derangement, load_encoder, make_losers, parse_lam_spec, sample_lams

    enc = load_encoder(str(tiny_model_config), "none", merge=16, attn_layer=-2)
    pixels_np = np.random.default_rng(0).integers(0, 256, (4, *enc.image_size, 3), dtype=np.uint8)
    sal = enc.saliency_from_pixels(pixels_np)
    keys, seed = ["a", "b", "c", "d"], 7
    lam = sample_lams(parse_lam_spec("beta:1.0"), seed, keys)
    partner = derangement(keys, seed)
    out = make_losers("mergemix", torch.from_numpy(pixels_np), torch.from_numpy(partner), torch.from_numpy(lam),
                      grid=enc.grid, patch=enc.patch, keys=keys, seed=seed, saliency=sal.grid.flatten(1))
    loser = compose_loser(pixels_np[0], pixels_np[partner[0]], out.mask[0].numpy())
    keep = np.kron(out.mask[0].numpy() == 255, np.ones(enc.patch, dtype=bool))[..., None]
    assert np.array_equal(loser, np.where(keep, pixels_np[0], pixels_np[partner[0]]))
    assert int((out.mask[0] == 255).sum()) == int(np.floor(lam[0] * enc.num_patches))
