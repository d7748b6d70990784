"""Image loading (every common mode -> (H, W, 3) uint8), class lists, and the text-embedding cache.

Expected pixel values and embeddings are computed here from their definitions, not by the code
under test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image

from dapseg.images import load_image
from dapseg.text import ClassSet, TextEmbedder, template_texts

RNG_SEED = 0


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- images: PIL modes

def test_grayscale_png_is_repeated_to_rgb(tmp_path: Path) -> None:
    gray = _rng().integers(0, 256, (7, 9), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (7, 9, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_png_transparent_pixels_become_white(tmp_path: Path) -> None:
    rng = _rng()
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    alpha[0, :] = 0  # fully transparent row
    alpha[1, :] = 255  # fully opaque row
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    a = alpha[..., None].astype(np.float64) / 255.0
    expected = rgb * a + 255.0 * (1.0 - a)  # "over" a white background
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0  # integer compositing rounds
    np.testing.assert_array_equal(out[0], np.full((8, 3), 255, np.uint8))
    np.testing.assert_array_equal(out[1], rgb[1])


def test_la_png_is_composited_on_white(tmp_path: Path) -> None:
    gray = np.array([[10, 200], [90, 255]], dtype=np.uint8)
    alpha = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    Image.fromarray(np.dstack([gray, alpha]), mode="LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    expected = np.array([[255, 200], [90, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))


def test_palette_png_maps_indices_to_colours(tmp_path: Path) -> None:
    rng = _rng()
    pal = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    idx = rng.integers(0, 16, (5, 7), dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette(pal.flatten().tolist())
    img.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, pal[idx])


def test_palette_png_with_transparent_index_is_white(tmp_path: Path) -> None:
    pal = np.array([[0, 0, 0], [200, 10, 20], [5, 6, 7]], dtype=np.uint8)
    idx = np.array([[0, 1, 2], [2, 0, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette(pal.flatten().tolist())
    img.save(tmp_path / "pt.png", transparency=0)  # index 0 fully transparent (tRNS chunk)
    out = load_image(tmp_path / "pt.png")
    expected = pal[idx].copy()
    expected[idx == 0] = 255
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("peak", [65535, 4000, 200], ids=["full-range", "12-bit", "dark"])
def test_16bit_png_is_scaled_from_its_16bit_range(tmp_path: Path, peak: int) -> None:
    values = np.linspace(0, peak, 4 * 6).round().astype(np.uint16).reshape(4, 6)
    Image.fromarray(values).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as img:
        assert img.mode == "I;16"  # what a 16-bit grayscale PNG opens as
    out = load_image(tmp_path / "d.png")
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    # A 16-bit value v is v / 65535 of full scale, however bright the brightest pixel happens to be.
    expected = _round_half_up(values.astype(np.float64) * 255.0 / 65535.0)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_pil_image_object_is_accepted() -> None:
    rgb = _rng().integers(0, 256, (3, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb)), rgb)


# ----------------------------------------------------------------------------- images: arrays

def test_float_rgb_array_in_unit_range() -> None:
    arr = _rng().random((5, 4, 3)).astype(np.float32)
    arr[0, 0] = (0.0, 1.0, 0.5)
    out = load_image(arr)
    assert out.shape == (5, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _round_half_up(arr.astype(np.float64) * 255.0))
    np.testing.assert_array_equal(out[0, 0], [0, 255, 128])


def test_float_gray_array_in_unit_range() -> None:
    arr = _rng().random((3, 5))
    out = load_image(arr)
    expected = _round_half_up(arr * 255.0)
    assert out.shape == (3, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_uint8_arrays_pass_through_and_gray_is_repeated() -> None:
    rgb = _rng().integers(0, 256, (4, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(rgb), rgb)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(load_image(gray[..., None]), np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize("peak", [65535, 200], ids=["full-range", "dark"])
def test_uint16_arrays_rgb_and_gray(peak: int) -> None:
    values = np.linspace(0, peak, 30).round().astype(np.uint16)
    rgb = values.reshape(2, 5, 3)
    expected = _round_half_up(rgb.astype(np.float64) * 255.0 / 65535.0)
    np.testing.assert_array_equal(load_image(rgb), expected)
    # The same data as a single channel gives the same values (an array's range is its dtype's).
    gray = values.reshape(5, 6)
    expected_gray = _round_half_up(gray.astype(np.float64) * 255.0 / 65535.0)
    np.testing.assert_array_equal(load_image(gray), np.repeat(expected_gray[..., None], 3, axis=2))


def test_rgba_array_is_composited_on_white() -> None:
    arr = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(load_image(arr), [[[255, 255, 255], [40, 50, 60]]])


def test_array_of_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"shape \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))


# ----------------------------------------------------------------------------- images: bad paths

def test_missing_image_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError) as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_corrupt_image_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(_rng().integers(0, 256, 1000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_truncated_png_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "torn.png"
    Image.fromarray(_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])  # a valid header, then nothing
    with pytest.raises(ValueError) as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_directory_instead_of_image_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "photos.png"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as e:
        load_image(folder)
    assert str(folder) in str(e.value)


# ----------------------------------------------------------------------------- ClassSet

def test_parse_commas_separate_classes_semicolons_synonyms() -> None:
    cs = ClassSet.parse("horse, grass, sky; clouds")
    assert cs.names == ["horse", "grass", "sky; clouds"]
    assert cs.queries == ["horse", "grass", "sky", "clouds"]
    assert cs.query_to_class == [0, 1, 2, 2]
    assert len(cs) == 3


def test_parse_strips_whitespace() -> None:
    cs = ClassSet.parse("  horse ,grass;lawn ;  turf  ")
    assert cs.synonyms == (("horse",), ("grass", "lawn", "turf"))
    assert cs.names == ["horse", "grass; lawn; turf"]
    assert cs.query_to_class == [0, 1, 1, 1]


def test_from_list_synonyms_with_semicolon_or_comma() -> None:
    cs = ClassSet.from_list(["cat", "sofa; couch", "tv, monitor, screen"])
    assert cs.names == ["cat", "sofa; couch", "tv; monitor; screen"]
    assert cs.queries == ["cat", "sofa", "couch", "tv", "monitor", "screen"]
    assert cs.query_to_class == [0, 1, 1, 2, 2, 2]


def test_from_list_refuses_a_plain_string() -> None:
    with pytest.raises(TypeError):
        ClassSet.from_list("cat, dog")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "background\nperson; man; woman\n\nsky; clouds\n",  # ProxyCLIP style
        "background\nperson, man, woman\n\nsky,clouds\n",  # NACLIP style
    ],
    ids=["semicolons", "commas"],
)
def test_from_file_both_synonym_styles(tmp_path: Path, text: str) -> None:
    path = tmp_path / "classes.txt"
    path.write_text(text, encoding="utf-8")
    cs = ClassSet.from_file(path)
    assert cs.names == ["background", "person; man; woman", "sky; clouds"]
    assert cs.queries == ["background", "person", "man", "woman", "sky", "clouds"]
    assert cs.query_to_class == [0, 1, 1, 1, 2, 2]


def test_coerce_accepts_string_list_and_classset() -> None:
    cs = ClassSet.parse("a, b; c")
    assert ClassSet.coerce(cs) is cs
    assert ClassSet.coerce("a, b; c") == cs
    assert ClassSet.coerce(["a", "b; c"]) == cs


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ClassSet.parse(""), "empty"),
        (lambda: ClassSet.parse("   "), "empty"),
        (lambda: ClassSet.from_list([]), "empty"),
        (lambda: ClassSet.parse("cat,,dog"), "class 2 has an empty name"),
        (lambda: ClassSet.parse("cat, dog,"), "class 3 has an empty name"),
        (lambda: ClassSet.parse("cat; ;kitten"), "class 1 has an empty name"),
        (lambda: ClassSet.from_list(["cat", "  "]), "class 2 has an empty name"),
        (lambda: ClassSet.parse("cat, dog, cat"), "duplicate class name 'cat'"),
        (lambda: ClassSet.parse("Cat, dog, CAT"), "duplicate class name 'CAT'"),
        (lambda: ClassSet.parse("dog, cat; Kitty; kitty"), "duplicate class name 'kitty' (twice in one class)"),
        (lambda: ClassSet.from_list(["sofa; couch", "Couch"]), "duplicate class name 'Couch' (in classes 1 and 2)"),
    ],
)
def test_bad_class_lists_raise_clear_errors(make, message: str) -> None:
    with pytest.raises(ValueError) as e:
        make()
    assert message in str(e.value)


def test_class_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dup.txt"
    path.write_text("cat\ndog\nCat\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        ClassSet.from_file(path)
    assert str(path) in str(e.value) and "duplicate" in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        ClassSet.from_file(empty)
    assert str(empty) in str(e.value) and "empty" in str(e.value)
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError) as e:
        ClassSet.from_file(missing)
    assert str(missing) in str(e.value)


# ----------------------------------------------------------------------------- TextEmbedder

DIM = 8


class FakeEncoder:
    """A deterministic text encoder: each text's own pseudo-random, deliberately non-unit vector."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    @staticmethod
    def vector(text: str) -> torch.Tensor:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(DIM, generator=g, dtype=torch.float64) * (1.0 + len(text))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.texts += texts
        return torch.stack([self.vector(t) for t in texts]).float()


def naive_embedding(query: str) -> torch.Tensor:
    """Normalise each template's embedding, average them, normalise the average."""
    total = torch.zeros(DIM, dtype=torch.float64)
    for template in OPENAI_IMAGENET_TEMPLATES:
        v = FakeEncoder.vector(template(query))
        total += v / v.norm()
    mean = total / len(OPENAI_IMAGENET_TEMPLATES)
    return mean / mean.norm()


CLASSES = ClassSet.parse("cat, sky; clouds, sofa")


def _embedder(encoder: FakeEncoder, cache: Path | None, model_id: str = "fake:v1") -> TextEmbedder:
    return TextEmbedder(encoder, model_id=model_id, templates="openai_imagenet", cache_root=cache)


def test_templates_are_the_80_openai_prompts() -> None:
    texts = template_texts("openai_imagenet")
    assert len(texts) == 80 == len(OPENAI_IMAGENET_TEMPLATES)
    assert "a photo of a {}." in texts
    assert all("{}" in t for t in texts)


def test_embedding_equals_naive_template_average() -> None:
    enc = FakeEncoder()
    emb = _embedder(enc, None)(CLASSES)
    assert emb.shape == (4, DIM)
    expected = torch.stack([naive_embedding(q) for q in ["cat", "sky", "clouds", "sofa"]]).float()
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
    assert len(enc.texts) == 4 * 80


def test_memory_cache_encodes_each_query_once() -> None:
    enc = FakeEncoder()
    embedder = _embedder(enc, None)
    first = embedder(CLASSES)
    second = embedder(ClassSet.parse("sofa, cat"))  # queries already seen
    assert embedder.encoded_queries == 4
    assert len(enc.texts) == 4 * 80
    assert torch.equal(second, first[[3, 0]])


def test_disk_cache_second_embedder_encodes_nothing(tmp_path: Path) -> None:
    first = _embedder(FakeEncoder(), tmp_path / "text")(CLASSES)
    enc = FakeEncoder()
    again = _embedder(enc, tmp_path / "text")
    second = again(CLASSES)
    assert again.encoded_queries == 0
    assert enc.texts == []
    assert torch.equal(second, first)


def test_disk_cache_is_keyed_by_model_and_templates(tmp_path: Path) -> None:
    _embedder(FakeEncoder(), tmp_path / "text")(CLASSES)
    other_model = _embedder(FakeEncoder(), tmp_path / "text", model_id="fake:v2")
    other_model(CLASSES)
    assert other_model.encoded_queries == 4
    enc = FakeEncoder()
    other_templates = TextEmbedder(enc, model_id="fake:v1", templates="none", cache_root=tmp_path / "text")
    emb = other_templates(ClassSet.parse("cat"))
    assert other_templates.encoded_queries == 1
    assert enc.texts == ["cat"]
    v = FakeEncoder.vector("cat")
    torch.testing.assert_close(emb[0], (v / v.norm()).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_file_is_recomputed(tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "text"
    _embedder(FakeEncoder(), cache)(CLASSES)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 4
    for f in files:
        blob = f.read_bytes()
        f.write_bytes({"garbage": b"not a torch file" * 10, "truncated": blob[: len(blob) // 2], "empty": b""}[damage])
    enc = FakeEncoder()
    embedder = _embedder(enc, cache)
    emb = embedder(CLASSES)
    assert embedder.encoded_queries == 4
    expected = torch.stack([naive_embedding(q) for q in CLASSES.queries]).float()
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    # The damaged files were replaced: a third embedder reads them back.
    third = _embedder(FakeEncoder(), cache)
    assert torch.equal(third(CLASSES), emb) and third.encoded_queries == 0


def test_unwritable_cache_does_not_break_embedding(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory", encoding="utf-8")
    cache = blocker / "text"  # cannot be created, even by root
    embedder = _embedder(FakeEncoder(), cache)
    emb = embedder(CLASSES)
    expected = torch.stack([naive_embedding(q) for q in CLASSES.queries]).float()
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    assert embedder.encoded_queries == 4


def test_read_only_cache_files_are_still_read(tmp_path: Path) -> None:
    cache = tmp_path / "text"
    first = _embedder(FakeEncoder(), cache)(CLASSES)
    for f in cache.glob("*.pt"):
        f.chmod(0o444)
    cache.chmod(0o555)
    try:
        again = _embedder(FakeEncoder(), cache)
        assert torch.equal(again(CLASSES), first) and again.encoded_queries == 0
        # New queries are computed although they cannot be stored (where permissions apply).
        more = _embedder(FakeEncoder(), cache)
        emb = more(ClassSet.parse("lamp"))
        torch.testing.assert_close(emb[0], naive_embedding("lamp").float(), atol=1e-6, rtol=0)
        assert more.encoded_queries == 1
    finally:
        cache.chmod(0o755)
