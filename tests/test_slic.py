"""The torch SLIC against scikit-image's: colour space, grid, and superpixel quality on photos.

Quality is measured against a known segmentation: mosaics of ``skimage.data`` photos cut along a
random Voronoi partition (each cell a different photo), where the true region of every pixel is
known. Both SLICs run on the same mosaics; the torch one must be as good as scikit-image's on
achievable segmentation accuracy (ASA) and boundary recall, with a similar number of regions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import color, data
from skimage.segmentation import slic
from skimage.util import regular_grid

from dapseg.heads.slic import connected_pieces, grid_steps, merge_small_pieces, rgb_to_lab, slic_labels, slic_skimage

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "retina")


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def mosaic(seed: int, size: int = 224, cells: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 image and its true regions (size, size): Voronoi cells of photo crops."""
    rng = np.random.default_rng(seed)
    sites = rng.uniform(0, size, (cells, 2))
    yy, xx = np.mgrid[:size, :size]
    truth = np.argmin((yy[..., None] - sites[:, 0]) ** 2 + (xx[..., None] - sites[:, 1]) ** 2, axis=-1)
    image = np.zeros((size, size, 3), np.uint8)
    for r in range(cells):
        photo = getattr(data, PHOTOS[r % len(PHOTOS)])()
        y0, x0 = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        image[truth == r] = photo[y0 : y0 + size, x0 : x0 + size][truth == r]
    return image, truth


def achievable_accuracy(superpixels: np.ndarray, truth: np.ndarray) -> float:
    """ASA: share of pixels labelled right when every superpixel takes its majority true region."""
    total = 0
    for s in np.unique(superpixels):
        total += np.bincount(truth[superpixels == s]).max()
    return total / truth.size


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (both sides of every boundary)."""
    edge = np.zeros(labels.shape, bool)
    dy = labels[1:] != labels[:-1]
    dx = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def boundary_recall(superpixels: np.ndarray, truth: np.ndarray, tolerance: int = 2) -> float:
    """Share of true boundary pixels with a superpixel boundary within ``tolerance`` pixels (chessboard)."""
    near = ndimage.binary_dilation(boundaries(superpixels), np.ones((2 * tolerance + 1,) * 2, bool))
    edge = boundaries(truth)
    return float((near & edge).sum() / edge.sum())


@pytest.fixture(scope="module")
def mosaics() -> tuple[list[np.ndarray], list[np.ndarray]]:
    pairs = [mosaic(seed) for seed in range(4)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_lab_matches_skimage():
    img = data.astronaut()[::4, ::4]
    ours = rgb_to_lab(to_tensor([img]))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, color.rgb2lab(img), atol=2e-3)


@pytest.mark.parametrize("shape,n", [((336, 336), 64), ((300, 451), 64), ((96, 96), 8), ((20, 500), 10), ((7, 9), 100)])
def test_initial_grid_matches_skimage(shape, n):
    (y0, x0), (sy, sx) = grid_steps(*shape, n)
    sl = regular_grid(shape, n)
    assert (sl[0].start or 0, sl[1].start or 0) == (y0, x0)
    assert (sl[0].step or 1, sl[1].step or 1) == (sy, sx)


def test_quality_matches_skimage_on_photo_mosaics(mosaics):
    images, truths = mosaics
    ours = slic_labels(to_tensor(images), 64, 10.0).numpy()
    asa_t, asa_s, br_t, br_s = [], [], [], []
    for img, truth, sp in zip(images, truths, ours, strict=True):
        ref = slic(img, n_segments=64, compactness=10.0, start_label=0, channel_axis=-1)
        asa_t.append(achievable_accuracy(sp, truth))
        asa_s.append(achievable_accuracy(ref, truth))
        br_t.append(boundary_recall(sp, truth))
        br_s.append(boundary_recall(ref, truth))
        n_t, n_s = len(np.unique(sp)), len(np.unique(ref))
        assert 0.6 * n_s <= n_t <= 1.6 * n_s, f"{n_t} superpixels where scikit-image has {n_s}"
    assert np.mean(asa_t) >= np.mean(asa_s) - 0.02, (asa_t, asa_s)
    assert np.mean(br_t) >= np.mean(br_s) - 0.05, (br_t, br_s)
    assert min(asa_t) > 0.85  # the superpixels follow the photos' cuts, not only each other


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut"])
def test_photo_regions_are_connected_and_sized_like_skimage(name):
    img = getattr(data, name)()[:300, :336]
    labels = slic_labels(to_tensor([img]), 64, 10.0)[0].numpy()
    ref = slic(img, n_segments=64, compactness=10.0, start_label=0, channel_axis=-1)
    ids = np.unique(labels)
    assert ids.tolist() == list(range(len(ids)))  # consecutive from 0
    assert 0.6 * len(np.unique(ref)) <= len(ids) <= 1.6 * len(np.unique(ref))
    segment = img.shape[0] * img.shape[1] / 64
    for r in ids:
        _, pieces = ndimage.label(labels == r)  # 4-connectivity
        assert pieces == 1, f"superpixel {r} is in {pieces} pieces"
    sizes = np.bincount(labels.ravel())
    assert sizes.min() >= 0.5 * segment / 2  # small pieces were merged (half a superpixel, less rounding)


def test_windows_are_independent_and_deterministic():
    imgs = [getattr(data, n)()[:120, :160] for n in ("chelsea", "coffee", "rocket")]
    batch = slic_labels(to_tensor(imgs), 16, 10.0)
    for i, img in enumerate(imgs):
        assert torch.equal(batch[i], slic_labels(to_tensor([img]), 16, 10.0)[0])
    assert torch.equal(batch, slic_labels(to_tensor(imgs), 16, 10.0))
    assert batch.dtype == torch.int64 and batch.shape == (3, 120, 160)


@pytest.mark.parametrize("shape,n", [((5, 7), 100), ((12, 300), 16), ((64, 64), 1), ((33, 47), 6)])
def test_odd_sizes(shape, n):
    img = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    labels = slic_labels(img, n, 10.0)
    assert labels.shape == (2, *shape)
    for lab in labels:
        ids = lab.unique()
        assert torch.equal(ids, torch.arange(len(ids)))


def test_connected_pieces_match_scipy():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 17, 23), generator=g)
    pieces = connected_pieces(labels)
    for lab, piece in zip(labels.numpy(), pieces.numpy(), strict=True):
        for v in range(3):
            comp, n = ndimage.label(lab == v)
            for c in range(1, n + 1):
                ids = np.unique(piece[comp == c])
                assert len(ids) == 1  # one id per true component
                assert ids[0] == np.flatnonzero((comp == c).ravel()).min()  # the smallest flat index
        assert len(np.unique(piece)) == sum(ndimage.label(lab == v)[1] for v in range(3))


def test_small_pieces_join_their_largest_neighbour():
    piece = torch.tensor([[0, 0, 0, 3, 3, 3],
                          [0, 0, 0, 3, 3, 3],
                          [0, 0, 14, 3, 3, 3]])[None]
    # piece 14 (one pixel) borders 0 (8 pixels) and 3 (9 pixels): it joins 3, the larger
    merged = merge_small_pieces(piece, min_size=2)
    expected = piece.clone()
    expected[0, 2, 2] = 3
    assert torch.equal(merged, expected)


def test_skimage_variant_is_skimage():
    img = data.coffee()[:96, :128]
    want = slic(img.astype(np.float64) / 255, n_segments=12, compactness=10.0, start_label=0, channel_axis=-1)
    got = slic_skimage(to_tensor([img]), 12, 10.0)[0].numpy()
    np.testing.assert_array_equal(got, want)


def test_dap_default_regions_call_no_cpu_library(monkeypatch):
    """DAP's default preset runs its per-window regions in torch: scikit-image's SLIC is never called."""
    import skimage.segmentation

    from dapseg.api import Segmenter

    def refuse(*args, **kwargs):
        raise AssertionError("scikit-image SLIC called in DAP's default per-window path")

    monkeypatch.setattr(skimage.segmentation, "slic", refuse)
    seg = Segmenter.from_preset("dap", random_weights=True, tiny=True, device="cpu",
                                overrides={"inference.short_side": 112, "inference.crop": 96, "inference.stride": 64})
    assert seg.config.head.params["regions"] == "slic"
    seg.predict(data.coffee()[::8, ::8], ["cup", "table"])
