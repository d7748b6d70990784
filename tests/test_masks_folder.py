"""The `folder` generator: CorrCLIP's released .npz masks and 16-bit PNGs, read back as untrusted files."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from dapseg.masks.base import MaskBuild, build_mask_generator

IMAGE = np.zeros((30, 40, 3), np.uint8)


def _map(dtype=np.int64, h=30, w=40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 600, (h, w)).astype(dtype)


def folder(root, **params):
    return build_mask_generator("folder", {"root": str(root), **params}, MaskBuild())


def test_reads_corrclip_npz_as_released(tmp_path):
    want = _map(np.int16) - 1  # EoMT's released masks: int16, -1 = no mask
    np.savez_compressed(tmp_path / "2008_000123.npz", instance_mask=want)
    got = folder(tmp_path)(IMAGE, name="2008_000123")
    assert got.dtype.is_floating_point is False and got.numpy().dtype == np.int64
    np.testing.assert_array_equal(got.numpy(), want.astype(np.int64))


def test_reads_16_bit_png_with_values_above_255(tmp_path):
    want = _map(np.uint16)
    assert want.max() > 255
    Image.fromarray(want).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:  # a real 16-bit PNG, as PIL writes it
        assert im.mode.startswith("I")
    np.testing.assert_array_equal(folder(tmp_path)(IMAGE, name="a").numpy(), want.astype(np.int64))


def test_npz_wins_over_png_and_nested_names_fall_back_to_the_flat_layout(tmp_path):
    np.savez(tmp_path / "x.npz", instance_mask=np.ones((30, 40), np.int32))
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "x.png")
    gen = folder(tmp_path)
    assert int(gen(IMAGE, name="x").max()) == 1
    # cityscapes names are city/<stem>; CorrCLIP's released masks are flat
    assert int(gen(IMAGE, name="frankfurt/x").max()) == 1
    (tmp_path / "frankfurt").mkdir()
    np.savez(tmp_path / "frankfurt" / "x.npz", instance_mask=np.full((30, 40), 7, np.int32))
    assert int(gen(IMAGE, name="frankfurt/x").max()) == 7  # the mirrored path first


def test_custom_array_key(tmp_path):
    np.savez(tmp_path / "x.npz", regions=np.full((30, 40), 2, np.int64))
    assert int(folder(tmp_path, key="regions")(IMAGE, name="x").max()) == 2
    with pytest.raises(ValueError, match=r"x.npz: no array 'instance_mask' \(it holds regions\)"):
        folder(tmp_path)(IMAGE, name="x")


def test_refuses_pickled_objects_without_unpickling(tmp_path):
    marker = tmp_path / "ran"
    obj = np.empty(1, dtype=object)
    obj[0] = _Boom(str(marker))
    np.savez(tmp_path / "evil.npz", instance_mask=obj)
    with pytest.raises(ValueError, match=r"cannot read region mask .*evil.npz: it holds Python objects"):
        folder(tmp_path)(IMAGE, name="evil")
    assert not marker.exists()


class _Boom:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "a/../../outside"])
def test_refuses_names_leading_outside_the_folder(tmp_path, name):
    root = tmp_path / "masks"
    root.mkdir()
    np.savez(tmp_path / "outside.npz", instance_mask=np.zeros((30, 40), np.int64))
    with pytest.raises(ValueError, match=r"region mask of image .*(leads outside|absolute path)"):
        folder(root)(IMAGE, name=name)


def test_refuses_a_symlink_leading_outside(tmp_path):
    root = tmp_path / "masks"
    root.mkdir()
    np.savez(tmp_path / "secret.npz", instance_mask=np.zeros((30, 40), np.int64))
    (root / "x.npz").symlink_to(tmp_path / "secret.npz")
    with pytest.raises(ValueError, match="leads outside"):
        folder(root)(IMAGE, name="x")


@pytest.mark.parametrize(("arr", "why"), [
    (np.zeros((20, 40), np.int64), r"region map is 20x40 \(HxW\) but the image is 30x40"),
    (np.zeros((30, 40), np.float32), "must hold integers, got dtype float32"),
    (np.zeros((30, 40), bool), "must hold integers, got dtype bool"),
    (np.zeros((2, 30, 40), np.int64), r"must be 2-D \(H, W\), got shape \(2, 30, 40\)"),
    (np.full((30, 40), 10000, np.int64), "region values must be < 10000"),
])
def test_refuses_maps_that_do_not_fit(tmp_path, arr, why):
    np.savez(tmp_path / "x.npz", instance_mask=arr)
    with pytest.raises(ValueError, match=rf"region mask .*x.npz: (a region map )?{why}"):
        folder(tmp_path)(IMAGE, name="x")


def test_refuses_broken_and_colour_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"cannot read region mask .*junk.npz"):
        folder(tmp_path)(IMAGE, name="junk")
    np.save(tmp_path / "plain.npy", np.zeros((30, 40)))
    os.replace(tmp_path / "plain.npy", tmp_path / "plain.npz")
    with pytest.raises(ValueError, match=r"plain.npz: not an .npz archive"):
        folder(tmp_path)(IMAGE, name="plain")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="single-channel 8- or 16-bit, got mode RGB"):
        folder(tmp_path)(IMAGE, name="rgb")


def test_missing_file_and_missing_name_are_named(tmp_path):
    gen = folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no region mask for image 'cat_01' in .* \(looked for cat_01.npz, "
                                                r"cat_01.png\)"):
        gen(IMAGE, name="cat_01")
    with pytest.raises(ValueError, match="finds an image's mask by the image's name, and this image has none"):
        gen(IMAGE)


def test_root_is_required_and_must_be_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"set masks.params.root \(or --masks-dir DIR\)"):
        build_mask_generator("folder", {}, MaskBuild())
    with pytest.raises(FileNotFoundError, match=r"masks.params.root: .*nowhere is not a folder"):
        folder(tmp_path / "nowhere")
