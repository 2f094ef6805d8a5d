"""Synthetic B-mode phantoms: speckle statistics, the beamforming against an independent
convolution + Hilbert reference, echogenicity contrast, shadows and posterior enhancement,
sector geometry, determinism, the on-disk corpus and the ``make-phantoms`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
from PIL import Image
from scipy import ndimage

from anaus_core.phantoms import (
    KINDS,
    RAYLEIGH_MEAN_OVER_STD,
    Acoustics,
    Band,
    Ellipse,
    Fan,
    Pulse,
    ScanGeometry,
    Structure,
    beamform,
    build_beam_grid,
    fan_mask,
    generate_phantom,
    make_phantom_corpus,
    rayleigh_ratio,
    render_phantom,
    sample_acoustics,
    save_contact_sheet,
    scan_convert,
    scatterers_per_resolution_cell,
    simulate_envelope,
)
from anaus_core.phantoms.figure import KIND_COLOURS

# --- speckle statistics ----------------------------------------------------------------------


def _homogeneous_envelope(shape, lateral_sigma, pulse, seed, density=1.0):
    rng = np.random.default_rng(seed)
    envelope = simulate_envelope(
        np.ones(shape, dtype=np.float32), lateral_sigma_lines=lateral_sigma, pulse=pulse, rng=rng, density=density
    )
    return envelope[32:-32, 32:-32]  # away from the circular wrap


@pytest.mark.parametrize(
    "pulse, sigma_focus, growth",
    [
        (Pulse(carrier_period_px=2.0, sigma_px=1.3), 1.8, 0.0),  # uniform beam
        (Pulse(carrier_period_px=2.6, sigma_px=1.1), 1.5, 2.0),  # beam widening with depth
        (Pulse(carrier_period_px=2.2, sigma_px=1.5), 2.3, 1.0),
    ],
)
def test_homogeneous_speckle_is_fully_developed_rayleigh(pulse, sigma_focus, growth):
    """Issue: in homogeneous speckle the pre-log envelope has mean/std within 10 % of 1.91;
    the simulation is normalised so that E[envelope**2] = 1 for unit echogenicity."""
    n_depth, n_lines = 600, 320
    depth = np.linspace(-1.0, 1.0, n_depth)
    lateral_sigma = sigma_focus * np.sqrt(1.0 + (growth * depth) ** 2)
    envelope = _homogeneous_envelope((n_depth, n_lines), lateral_sigma, pulse, seed=11)
    ratio = rayleigh_ratio(envelope)
    assert abs(ratio / RAYLEIGH_MEAN_OVER_STD - 1.0) < 0.10, ratio
    assert abs(ratio / 1.91 - 1.0) < 0.10
    assert abs(float(np.mean(envelope.astype(np.float64) ** 2)) - 1.0) < 0.06
    # Rayleigh, not just the right moment ratio: P(E <= median) with E**2 exponential.
    median_theory = math.sqrt(math.log(2.0))
    assert abs(float(np.mean(envelope <= median_theory)) - 0.5) < 0.03


def test_sparse_scatterers_are_not_fully_developed_speckle():
    """The Rayleigh check can fail: with far fewer than one scatterer per resolution cell the
    envelope is spiky (mean/std well below 1.91)."""
    envelope = _homogeneous_envelope((600, 320), np.full(600, 1.5), Pulse(), seed=3, density=0.004)
    assert rayleigh_ratio(envelope) < 0.8 * RAYLEIGH_MEAN_OVER_STD


def test_sampled_acoustics_give_many_scatterers_per_resolution_cell():
    rng = np.random.default_rng(0)
    cells = [scatterers_per_resolution_cell(sample_acoustics(rng)) for _ in range(200)]
    assert min(cells) >= 10.0


def test_beamform_matches_direct_convolution_and_scipy_hilbert():
    """Independent reference: real RF built by direct convolutions (a unit-energy sampled
    Gaussian across lines, depth-dependent, then the RF pulse along depth), envelope by
    ``scipy.signal.hilbert``; margins are empty so linear and circular convolution agree."""
    rng = np.random.default_rng(5)
    n_depth, n_lines = 256, 64
    pulse = Pulse(carrier_period_px=2.3, sigma_px=1.2)
    lateral_sigma = np.linspace(0.9, 3.0, n_depth)
    scatterers = np.zeros((n_depth, n_lines), dtype=np.float32)
    scatterers[40:-40, 14:-14] = rng.standard_normal((n_depth - 80, n_lines - 28))

    blurred = np.zeros((n_depth, n_lines))
    for row in range(n_depth):
        offsets = np.arange(-12, 13)
        gaussian = np.exp(-0.5 * (offsets / lateral_sigma[row]) ** 2)
        gaussian /= np.sqrt(np.sum(gaussian**2))
        blurred[row] = np.convolve(scatterers[row].astype(np.float64), gaussian, mode="same")
    kernel = pulse.kernel()
    rf = np.stack([np.convolve(blurred[:, line], kernel, mode="same") for line in range(n_lines)], axis=1)
    reference = scipy.signal.hilbert(rf, axis=0)
    padded = np.zeros(1024)
    padded[: kernel.size] = kernel
    reference /= np.sqrt(np.sum(np.abs(scipy.signal.hilbert(padded)) ** 2))

    analytic = beamform(scatterers, lateral_sigma_lines=lateral_sigma, pulse=pulse)
    scale = np.sqrt(np.mean(np.abs(reference) ** 2))
    assert np.max(np.abs(analytic - reference)) < 2e-3 * scale
    assert np.allclose(analytic.real, rf / np.sqrt(np.sum(np.abs(scipy.signal.hilbert(padded)) ** 2)), atol=2e-3 * scale)


def test_envelope_intensity_follows_echogenicity():
    echogenicity = np.ones((600, 320), dtype=np.float32)
    echogenicity[:, 160:] = 4.0
    envelope = simulate_envelope(echogenicity, lateral_sigma_lines=np.full(600, 1.5), pulse=Pulse(), rng=np.random.default_rng(1))
    left = np.mean(envelope[40:-40, 40:140].astype(np.float64) ** 2)
    right = np.mean(envelope[40:-40, 180:280].astype(np.float64) ** 2)
    assert abs(right / left / 4.0 - 1.0) < 0.1


def test_attenuation_accumulates_along_the_beam():
    """An attenuating slab in some lines dims everything below it by exp(-2 * sum) in
    intensity, and nothing above it or beside it."""
    n_depth, n_lines = 600, 320
    attenuation = np.full((n_depth, n_lines), 0.0, dtype=np.float32)
    attenuation[200:220, 100:220] = 0.03  # 0.6 Np = 5.2 dB amplitude
    envelope = simulate_envelope(
        np.ones((n_depth, n_lines), dtype=np.float32),
        lateral_sigma_lines=np.full(n_depth, 1.5),
        pulse=Pulse(),
        rng=np.random.default_rng(2),
        attenuation=attenuation,
    )
    intensity = envelope.astype(np.float64) ** 2
    below = intensity[260:560, 120:200].mean()
    beside = intensity[260:560, 20:80].mean()
    above = intensity[40:180, 120:200].mean()
    assert abs(below / beside / math.exp(-2 * 0.6) - 1.0) < 0.15
    assert abs(above / beside - 1.0) < 0.15


# --- controlled phantoms: contrast, shadow, posterior enhancement -----------------------------

QUIET = Acoustics(texture_db=0.0)
SIZE = 160


def _sector(size=SIZE):
    half = 38.0
    r_max = min(size - 1.0, (0.5 * (size - 1) - 0.5) / math.sin(math.radians(half)))
    return ScanGeometry("sector", size, Fan(0.5 * (size - 1), -2.0, 6.0, r_max, half))


def _beam_coordinates(geometry):
    y, x = np.mgrid[0 : geometry.size, 0 : geometry.size].astype(np.float64)
    return geometry.to_beam_coordinates(x, y)


def _intensity_db(phantom, region):
    return 10.0 * math.log10(float(np.mean(phantom.envelope[region].astype(np.float64) ** 2)))


def _ring(mask, inner, outer):
    return ndimage.binary_dilation(mask, iterations=outer) & ~ndimage.binary_dilation(mask, iterations=inner)


@pytest.mark.parametrize("kind", ["linear", "sector"])
def test_cyst_is_anechoic_with_posterior_enhancement(kind):
    geometry = ScanGeometry("linear", SIZE) if kind == "linear" else _sector()
    cx, cy = geometry.from_unit_beam(0.5, 0.3)
    cyst = Structure(1, "cyst", Ellipse(cx, cy, 14.0, 14.0), echogenicity=0.0, attenuation=0.05)
    phantom = render_phantom(geometry=geometry, structures=[cyst], acoustics=QUIET, rng=np.random.default_rng(0))
    inside = ndimage.binary_erosion(phantom.label == 1, iterations=2)
    ring = _ring(phantom.label == 1, 3, 8) & fan_mask(SIZE, geometry.fan)
    assert phantom.image[inside].mean() < 0.2 * phantom.image[ring].mean()
    assert _intensity_db(phantom, inside) < _intensity_db(phantom, ring) - 20.0

    # Below the cyst along the beams vs. beside it at the same depths.
    lateral, depth = _beam_coordinates(geometry)
    cyst_lateral = lateral[phantom.label == 1]
    centre, half_width = 0.5 * (cyst_lateral.min() + cyst_lateral.max()), 0.5 * (cyst_lateral.max() - cyst_lateral.min())
    bottom = depth[phantom.label == 1].max()
    band = (depth > bottom + 4) & (depth < bottom + 40) & fan_mask(SIZE, geometry.fan)
    below = band & (np.abs(lateral - centre) < 0.5 * half_width)
    beside = band & (np.abs(lateral - centre) > 1.6 * half_width)
    assert below.sum() > 100 and beside.sum() > 200
    enhancement_db = _intensity_db(phantom, below) - _intensity_db(phantom, beside)
    assert enhancement_db > 3.0, enhancement_db
    assert phantom.image[below].mean() > phantom.image[beside].mean() + 10


@pytest.mark.parametrize("kind", ["linear", "sector"])
def test_layer_is_bright_and_casts_a_shadow(kind):
    geometry = ScanGeometry("linear", SIZE) if kind == "linear" else _sector()
    cx, cy = geometry.from_unit_beam(0.5, 0.25)
    length = 50.0 if kind == "linear" else 30.0  # leave tissue beside it inside the fan
    layer = Structure(1, "layer", Band(cx, cy, length=length, half_thickness=2.5), echogenicity=30.0, attenuation=9.0)
    phantom = render_phantom(geometry=geometry, structures=[layer], acoustics=QUIET, rng=np.random.default_rng(1))
    lateral, depth = _beam_coordinates(geometry)
    layer_lateral = lateral[phantom.label == 1]
    centre, half_width = 0.5 * (layer_lateral.min() + layer_lateral.max()), 0.5 * (layer_lateral.max() - layer_lateral.min())
    bottom = depth[phantom.label == 1].max()
    band = (depth > bottom + 6) & (depth < bottom + 60) & fan_mask(SIZE, geometry.fan)
    below = band & (np.abs(lateral - centre) < 0.6 * half_width)
    beside = band & (np.abs(lateral - centre) > 1.3 * half_width)
    assert below.sum() > 200 and beside.sum() > 200
    shadow_db = _intensity_db(phantom, below) - _intensity_db(phantom, beside)
    assert shadow_db < -8.0, shadow_db
    assert phantom.image[below].mean() < phantom.image[beside].mean() - 30
    top = (phantom.label == 1) & (depth < depth[phantom.label == 1].min() + 2.5)
    assert phantom.image[top].mean() > phantom.image[beside].mean() + 40


@pytest.mark.parametrize("kind, level_db", [("hypo", -9.0), ("hyper", 8.0)])
def test_organ_contrast_matches_its_echogenicity(kind, level_db):
    geometry = ScanGeometry("linear", SIZE)
    organ = Structure(1, kind, Ellipse(80.0, 80.0, 30.0, 22.0, 20.0), echogenicity=10 ** (level_db / 10), attenuation=1.0)
    phantom = render_phantom(geometry=geometry, structures=[organ], acoustics=QUIET, rng=np.random.default_rng(2))
    inside = ndimage.binary_erosion(phantom.label == 1, iterations=3)
    ring = _ring(phantom.label == 1, 3, 10)
    # The ring straddles the organ's depth range, so depth falloff cancels to first order.
    contrast = _intensity_db(phantom, inside) - _intensity_db(phantom, ring)
    assert abs(contrast - level_db) < 2.0, contrast
    image_contrast = phantom.image[inside].mean() - phantom.image[ring].mean()
    assert np.sign(image_contrast) == np.sign(level_db) and abs(image_contrast) > 20


def test_tissue_envelope_of_a_rendered_phantom_is_rayleigh_in_each_depth_band():
    """The full pipeline (attenuation, TGC, noise) keeps fully developed speckle in plain
    tissue: per depth band (gain constant inside it) mean/std stays near 1.91."""
    for geometry in (ScanGeometry("linear", 192), _sector(192)):
        phantom = render_phantom(geometry=geometry, structures=[], acoustics=QUIET, rng=np.random.default_rng(4))
        envelope = phantom.beam_envelope
        inner = envelope[:, 8:-8]
        ratios = [rayleigh_ratio(inner[start : start + 40]) for start in range(0, inner.shape[0] - 40, 40)]
        assert abs(np.median(ratios) / RAYLEIGH_MEAN_OVER_STD - 1.0) < 0.10, ratios
        # TGC leaves a falloff: the deepest band is darker than the first one.
        top = np.mean(inner[:40].astype(np.float64) ** 2)
        deep = np.mean(inner[-40:].astype(np.float64) ** 2)
        assert 10 * math.log10(top / deep) == pytest.approx(QUIET.falloff_db, abs=2.5)


# --- random phantoms ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_phantoms():
    return [generate_phantom(size=128, seed=21, index=index) for index in range(24)]


def test_random_phantoms_have_mixed_structures_and_both_geometries(random_phantoms):
    assert {phantom.geometry for phantom in random_phantoms} == {"linear", "sector"}
    kinds_seen = set()
    for phantom in random_phantoms:
        assert phantom.image.dtype == np.uint8 and phantom.image.shape == (128, 128)
        assert phantom.label.dtype == np.uint8 and phantom.label.shape == (128, 128)
        assert 3 <= len(phantom.structures) <= 6
        kinds = [structure["kind"] for structure in phantom.structures]
        assert set(kinds) <= set(KINDS) and len(set(kinds)) >= 2
        kinds_seen |= set(kinds)
        labels = [structure["label"] for structure in phantom.structures]
        assert labels == list(range(1, len(labels) + 1))
        present = set(np.unique(phantom.label).tolist()) - {0}
        assert present == set(labels)
        for structure in phantom.structures:
            assert structure["area_px"] == int(np.count_nonzero(phantom.label == structure["label"]))
    assert kinds_seen == set(KINDS)


def test_random_cysts_are_far_darker_than_surrounding_tissue(random_phantoms):
    """Labels line up with visible contrast in every random phantom: the whole labelled cyst
    (edge pixels included, where the point-spread function bleeds in) is far darker than the
    tissue ring around it, and its core is nearly black."""
    whole_ratios = []
    for phantom in random_phantoms:
        view = fan_mask(128, phantom.fan)
        for structure in phantom.structures:
            if structure["kind"] != "cyst":
                continue
            mask = phantom.label == structure["label"]
            core = ndimage.binary_erosion(mask, iterations=2)
            ring = _ring(mask, 2, 6) & view & (phantom.label == 0)
            tissue = phantom.image[ring].mean()
            whole_ratios.append(phantom.image[mask].mean() / tissue)
            assert whole_ratios[-1] < 0.5, structure
            assert core.any() and phantom.image[core].mean() < 0.25 * tissue, structure
    assert len(whole_ratios) >= 10
    assert np.median(whole_ratios) < 0.3


def test_random_hypo_and_hyper_organs_differ_from_tissue_as_labelled(random_phantoms):
    contrasts = {"hypo": [], "hyper": []}
    for phantom in random_phantoms:
        view = fan_mask(128, phantom.fan)
        for structure in phantom.structures:
            if structure["kind"] in contrasts:
                mask = phantom.label == structure["label"]
                ring = _ring(mask, 2, 6) & view & (phantom.label == 0)
                envelope = phantom.envelope.astype(np.float64) ** 2
                contrasts[structure["kind"]].append(10 * math.log10(envelope[mask].mean() / envelope[ring].mean()))
    # Most organs show their nominal contrast; a few sit in a layer's shadow.
    assert np.median(contrasts["hypo"]) < -4.0
    assert np.median(contrasts["hyper"]) > 4.0
    assert np.mean(np.array(contrasts["hypo"]) < 0) > 0.8
    assert np.mean(np.array(contrasts["hyper"]) > 0) > 0.8


def test_sector_images_are_black_outside_the_fan(random_phantoms):
    sectors = [phantom for phantom in random_phantoms if phantom.geometry == "sector"]
    assert sectors
    for phantom in sectors:
        view = fan_mask(128, phantom.fan)
        assert not view.all() and view.mean() > 0.3
        assert np.all(phantom.image[~view] == 0)
        assert np.all(phantom.label[~view] == 0)
        assert np.all(phantom.envelope[~view] == 0)
        # Inside the fan, tissue is black only in the deepest shadows below layers.
        assert np.mean(phantom.image[view & (phantom.label == 0)] == 0) < 0.15
    for phantom in random_phantoms:
        if phantom.geometry == "linear":
            assert phantom.fan is None and fan_mask(128, phantom.fan).all()


def test_fan_mask_accepts_the_sidecar_dict_and_matches_polar_definition():
    fan = Fan(apex_x=31.5, apex_y=-4.0, r_min=8.0, r_max=60.0, half_angle_deg=35.0)
    mask = fan_mask(64, fan.to_dict())
    assert np.array_equal(mask, fan_mask(64, fan))
    assert mask[30, 31] and not mask[2, 0] and not mask[63, 0]
    # Polar definition at a few points: on the axis, just inside and just outside the angle.
    assert mask[int(-4 + 40), 31] and not mask[int(-4 + 62), 31]
    inside_angle = (round(31.5 + 40 * math.sin(math.radians(33))), round(-4 + 40 * math.cos(math.radians(33))))
    outside_angle = (round(31.5 + 40 * math.sin(math.radians(38))), round(-4 + 40 * math.cos(math.radians(38))))
    assert mask[inside_angle[1], inside_angle[0]] and not mask[outside_angle[1], outside_angle[0]]


@pytest.mark.parametrize("kind", ["linear", "sector"])
def test_scan_conversion_matches_scipy_map_coordinates(kind):
    """The cached bilinear table against scipy's interpolation at each pixel's beam coordinates."""
    geometry = ScanGeometry("linear", 96) if kind == "linear" else _sector(96)
    grid = build_beam_grid(geometry)
    values = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    image = scan_convert(values, grid)
    y, x = np.mgrid[0:96, 0:96].astype(np.float64)
    lateral, depth = geometry.to_beam_coordinates(x, y)
    coordinates = [(depth - grid.depth[0]) / grid.depth_step, (lateral - grid.lateral[0]) / grid.lateral_step]
    reference = ndimage.map_coordinates(values, coordinates, order=1, mode="nearest")
    view = fan_mask(96, geometry.fan)
    assert np.allclose(image[view], reference[view], atol=1e-5)
    assert np.all(image[~view] == 0)


def test_contact_sheet_shows_images_above_coloured_labels(tmp_path):
    phantoms = [generate_phantom(size=48, seed=1, index=index) for index in range(2)]
    path = save_contact_sheet(phantoms, tmp_path / "sheet.png")
    sheet = Image.open(path)
    assert sheet.mode == "P" and sheet.size == (96, 96)
    rgb = np.asarray(sheet.convert("RGB"))
    assert np.array_equal(rgb[:48, :48, 0], np.asarray(sheet.convert("RGB"))[:48, :48, 1])  # gray row
    colours = {tuple(colour) for colour in rgb[48:].reshape(-1, 3).tolist()}
    assert {KIND_COLOURS[s["kind"]] for p in phantoms for s in p.structures} <= colours


# --- determinism ------------------------------------------------------------------------------


def test_generation_is_deterministic_per_seed_and_index():
    first = generate_phantom(size=96, seed=5, index=3)
    again = generate_phantom(size=96, seed=5, index=3)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.label, again.label)
    assert first.structures == again.structures and first.fan == again.fan
    other_seed = generate_phantom(size=96, seed=6, index=3)
    other_index = generate_phantom(size=96, seed=5, index=4)
    assert not np.array_equal(first.image, other_seed.image)
    assert not np.array_equal(first.image, other_index.image)
    linear = generate_phantom(size=96, seed=5, index=3, geometry="linear")
    assert linear.geometry == "linear" and linear.fan is None


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_corpus_bytes_are_deterministic_and_independent_of_count(tmp_path):
    ids = make_phantom_corpus(tmp_path / "a", count=3, size=64, seed=9)
    make_phantom_corpus(tmp_path / "b", count=3, size=64, seed=9)
    make_phantom_corpus(tmp_path / "c", count=2, size=64, seed=9)
    make_phantom_corpus(tmp_path / "d", count=2, size=64, seed=10)
    a, b, c, d = (_tree_bytes(tmp_path / name) for name in "abcd")
    assert ids == ["phantom_00000", "phantom_00001", "phantom_00002"]
    assert a == b
    assert c == {key: value for key, value in a.items() if "00002" not in key}
    assert all(a[key] != d[key] for key in d if key.startswith("img"))
    # The corpus image i is generate_phantom(index=i).
    phantom = generate_phantom(size=64, seed=9, index=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "img" / "phantom_00002.png")), phantom.image)


# --- the corpus on disk (conftest's shared fixture) --------------------------------------------


def test_corpus_files_and_sidecars_agree(phantom_corpus):
    ids = sorted(path.stem for path in (phantom_corpus / "img").glob("*.png"))
    assert ids == [f"phantom_{index:05d}" for index in range(12)]
    geometries = set()
    for key in ids:
        assert "." not in key
        image = Image.open(phantom_corpus / "img" / f"{key}.png")
        label = Image.open(phantom_corpus / "label" / f"{key}.png")
        assert image.mode == "L" and label.mode == "L" and image.size == label.size == (128, 128)
        sidecar = json.loads((phantom_corpus / "label" / f"{key}.json").read_text())
        assert sidecar["id"] == key and sidecar["size"] == 128 and sidecar["seed"] == 0
        assert sidecar["geometry"] in ("linear", "sector")
        geometries.add(sidecar["geometry"])
        label_array = np.asarray(label)
        assert set(np.unique(label_array).tolist()) - {0} == {s["label"] for s in sidecar["structures"]}
        assert all(s["kind"] in KINDS for s in sidecar["structures"])
        view = fan_mask(128, sidecar["fan"])
        assert (sidecar["fan"] is None) == (sidecar["geometry"] == "linear")
        assert np.all(np.asarray(image)[~view] == 0) and np.all(label_array[~view] == 0)
    assert geometries == {"linear", "sector"}


# --- CLI ------------------------------------------------------------------------------------


def test_make_phantoms_command_writes_the_corpus(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    out = tmp_path / "corpus"
    result = runner.invoke(app, ["make-phantoms", str(out), "--count", "3", "--size", "48", "--seed", "4"])
    assert result.exit_code == 0, result.output
    for key in ("phantom_00000", "phantom_00001", "phantom_00002"):
        assert (out / "img" / f"{key}.png").is_file()
        assert (out / "label" / f"{key}.png").is_file()
        assert json.loads((out / "label" / f"{key}.json").read_text())["seed"] == 4
    assert np.array_equal(np.asarray(Image.open(out / "img" / "phantom_00001.png")), generate_phantom(size=48, seed=4, index=1).image)

    help_result = runner.invoke(app, ["make-phantoms", "--help"])
    assert help_result.exit_code == 0 and "--count" in help_result.output and "B-mode" in help_result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--count", "0"], "--count"),
        (["--size", "16"], "--size"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_make_phantoms_command_rejects_bad_values(tmp_path, args, message):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["make-phantoms", str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert message in result.output and "error:" in result.output
    assert not (tmp_path / "out" / "img").exists()


def test_make_phantoms_command_rejects_a_file_as_output(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    target = tmp_path / "taken"
    target.write_text("x")
    result = CliRunner().invoke(app, ["make-phantoms", str(target), "--count", "1", "--size", "32"])
    assert result.exit_code == 2 and "not a directory" in result.output
