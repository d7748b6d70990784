"""Fast text encoding: context cut to each batch's longest prompt, prompts grouped by length,
many queries per encoder call; the embeddings must equal open_clip's own ``encode_text``."""

from __future__ import annotations

import open_clip
import pytest
import torch

from dapseg.models.clip import TINY_VISION, DenseClip
from dapseg.text import ClassSet, TextEmbedder, get_templates

# A text tower of CLIP's layout, half as deep and wide as ViT-B/16's (6 layers of width 256): enough depth
# for the rounding of cut contexts to show, fast enough for the suite.
TEXT_CFG = dict(context_length=77, vocab_size=49408, width=256, heads=4, layers=6)
QUERIES = ["cat", "traffic light", "a very long class name made of many words with punctuation: even (this)",
           "sky", "chest of drawers", "x" * 400]  # the last one is cut at 77 tokens by the tokenizer


@pytest.fixture(scope="module")
def clip() -> DenseClip:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=256, vision_cfg=TINY_VISION, text_cfg=TEXT_CFG).eval()
    return DenseClip(model, open_clip.get_tokenizer("ViT-B-16"), "text-test", "random")


def reference(clip: DenseClip, texts: list[str]) -> torch.Tensor:
    """open_clip's own encode_text at the full 77-token context, one call."""
    with torch.no_grad():
        return clip.model.encode_text(clip.tokenizer(texts)).float()


def test_prompts_equal_open_clips_encode_text(clip):
    texts = [t(q) for q in QUERIES for t in get_templates("openai_imagenet")[::8]]
    ours = clip.encode_text(texts, batch_size=17)  # batches of mixed lengths, order restored
    want = reference(clip, texts)
    assert ours.shape == want.shape
    torch.testing.assert_close(ours, want, atol=1e-5 * float(want.abs().max()), rtol=0)
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1),
                               torch.nn.functional.normalize(want, dim=-1), atol=1e-5, rtol=0)


def test_cut_context_is_used(clip, monkeypatch):
    """The transformer sees each batch cut to its longest prompt, never the full 77 tokens here."""
    seen: list[int] = []
    forward = clip.model.transformer.forward

    def spy(x, *args, **kwargs):
        seen.append(x.shape[1])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(clip.model.transformer, "forward", spy)
    lengths = clip.tokenizer(["a photo of a cat.", "cat", "a photo of a traffic light."]).argmax(-1) + 1
    clip.encode_text(["a photo of a cat.", "cat", "a photo of a traffic light."], batch_size=2)
    assert seen == sorted(seen) and max(seen) == int(lengths.max()) and min(seen) < max(seen)


def test_query_embeddings_equal_the_per_query_average_of_open_clip(clip):
    """TextEmbedder (all queries in one call) against the naive per-query loop over open_clip."""
    queries = QUERIES[1:3]  # a short name and a long one
    embedder = TextEmbedder(clip.encode_text, "test", "openai_imagenet", cache_root=None)
    got = embedder(ClassSet.from_list(queries))
    for i, q in enumerate(queries):
        feats = reference(clip, [t(q) for t in get_templates("openai_imagenet")])
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.mean(0)
        torch.testing.assert_close(got[i], mean / mean.norm(), atol=1e-5, rtol=0)


def test_uncached_queries_share_encoder_calls():
    calls: list[int] = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.append(len(texts))
        return torch.stack([torch.tensor([len(t), 1.0 + t.count("a"), 2.0]) for t in texts])

    embedder = TextEmbedder(encode, "fake", "openai_imagenet", cache_root=None, queries_per_call=3)
    embedder(ClassSet.parse("cat, dog, sky; clouds, sofa"))  # 5 queries
    assert calls == [3 * 80, 2 * 80]
    embedder(ClassSet.parse("sofa, lamp, cat"))  # only "lamp" is new
    assert calls[2:] == [80]
    assert embedder.encoded_queries == 6
    with pytest.raises(ValueError, match="queries_per_call"):
        TextEmbedder(encode, "fake", "none", cache_root=None, queries_per_call=0)
