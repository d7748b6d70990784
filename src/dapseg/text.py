"""Class names with synonyms, prompt templates, and text embeddings with an on-disk cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from dapseg.files import atomic_write
from dapseg.postprocess import UNLABELED

TEMPLATES: dict[str, tuple[Callable[[str], str], ...]] = {
    "openai_imagenet": tuple(OPENAI_IMAGENET_TEMPLATES),  # the 80 prompts of CLIP's ImageNet eval
    "simple_imagenet": tuple(SIMPLE_IMAGENET_TEMPLATES),
    "none": (lambda c: c,),
}


def template_texts(name: str) -> list[str]:
    """The template strings with ``{}`` for the class name (used for cache keys and reports)."""
    return [t("{}") for t in get_templates(name)]


def get_templates(name: str) -> tuple[Callable[[str], str], ...]:
    if name not in TEMPLATES:
        raise ValueError(f"unknown templates {name!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


_SYNONYM_SPLIT = re.compile(r"\s*[;,]\s*")


@dataclass(frozen=True)
class ClassSet:
    """Classes, each one or more synonyms (queries); class 0 is background where a dataset has one.

    ``unsure_class``: the class a pixel takes where its top probability is below
    ``postprocess.prob_thd``; None (the default) leaves it unlabeled (``postprocess.UNLABELED``).
    The benchmarks set 0, their background class (the references' protocol).
    ``unlabeled_classes``: indices of classes whose pixels are left unlabeled (e.g. a "background"
    class added only to absorb what is none of the others); see ``leave_unlabeled``.
    """

    synonyms: tuple[tuple[str, ...], ...]
    # Benchmark class files repeat a few names across classes (COCO-Object's background lists "bed",
    # ADE-847 has "screen" twice); the references keep them, ties going to the first class. A user's
    # own list must not (a repeated name is almost always a typo), so this is off by default.
    allow_repeats: bool = field(default=False, compare=False)
    unsure_class: int | None = None
    unlabeled_classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.synonyms:
            raise ValueError("the class list is empty: give at least one class name")
        seen: dict[str, int] = {}
        for i, syns in enumerate(self.synonyms):
            if not syns or any(not s for s in syns):
                raise ValueError(f"class {i + 1} has an empty name")
            for s in syns:  # a newline, CR or NUL would break the result files and the prompts
                bad = next((ch for ch in s if unicodedata.category(ch) == "Cc"), None)
                if bad is not None:
                    raise ValueError(f"class {i + 1} ({s!r}) contains the control character {bad!r}; "
                                     "class names must be plain text on one line")
            if self.allow_repeats:
                continue
            for s in syns:
                key = s.casefold()
                if key in seen:
                    where = "twice in one class" if seen[key] == i else f"in classes {seen[key] + 1} and {i + 1}"
                    raise ValueError(f"duplicate class name {s!r} ({where})")
                seen[key] = i
        n = len(self.synonyms)
        if self.unsure_class is not None and not 0 <= self.unsure_class < n:
            raise ValueError(f"unsure_class {self.unsure_class} is not a class index (0..{n - 1})")
        if any(not 0 <= c < n for c in self.unlabeled_classes):
            raise ValueError(f"unlabeled_classes {list(self.unlabeled_classes)}: not all class indices (0..{n - 1})")

    def leave_unlabeled(self, names: Sequence[str]) -> ClassSet:
        """This class list with the pixels of the classes ``names`` left unlabeled. A name is a
        class's display name or one of its synonyms (case-insensitive); one that is not in the
        list is an error naming it."""
        if isinstance(names, str):
            raise TypeError("pass a list of class names")
        found = []
        for name in names:
            key = name.strip().casefold()
            index = next((i for i, syns in enumerate(self.synonyms)
                          if key == "; ".join(syns).casefold() or key in (s.casefold() for s in syns)), None)
            if index is None:
                raise ValueError(f"unlabeled class {name!r} is not in the class list ({', '.join(self.names)})")
            found.append(index)
        return replace(self, unlabeled_classes=tuple(sorted(set(self.unlabeled_classes) | set(found))))

    @property
    def unsure_label(self) -> int:
        """The label of a pixel below ``postprocess.prob_thd`` (see ``unsure_class``)."""
        return UNLABELED if self.unsure_class is None else self.unsure_class

    @property
    def names(self) -> list[str]:
        """Display names: synonyms joined with '; '."""
        return ["; ".join(s) for s in self.synonyms]

    @property
    def queries(self) -> list[str]:
        return [q for syns in self.synonyms for q in syns]

    @property
    def query_to_class(self) -> list[int]:
        return [i for i, syns in enumerate(self.synonyms) for _ in syns]

    def __len__(self) -> int:
        return len(self.synonyms)

    @classmethod
    def from_list(cls, classes: Sequence[str], allow_repeats: bool = False,
                  unsure_class: int | None = None) -> ClassSet:
        """Each item one class; synonyms inside an item separated by ';' or ','."""
        if isinstance(classes, str):
            raise TypeError("pass a list of class names, or use ClassSet.parse for a single string")
        return cls(tuple(_split_synonyms(str(c)) for c in classes), allow_repeats, unsure_class)

    @classmethod
    def parse(cls, text: str) -> ClassSet:
        """'horse, grass, sky; clouds' -> classes split on ',', synonyms on ';'."""
        items = [item for item in text.split(",")]
        if not text.strip():
            items = []
        return cls(tuple(tuple(s.strip() for s in item.split(";")) for item in items))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ClassSet:
        """One class per line; synonyms separated by ';' (ProxyCLIP files) or ',' (NACLIP files)."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not a name
        except OSError as e:
            raise FileNotFoundError(f"cannot read class file {path}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"class file {path} is not UTF-8 text ({e})") from e
        lines = [line for line in lines if line.strip()]
        try:
            return cls(tuple(_split_synonyms(line) for line in lines))
        except ValueError as e:
            raise ValueError(f"class file {path}: {e}") from e

    @classmethod
    def coerce(cls, classes: ClassSet | Sequence[str] | str) -> ClassSet:
        if isinstance(classes, ClassSet):
            return classes
        if isinstance(classes, str):
            return cls.parse(classes)
        return cls.from_list(classes)


def _split_synonyms(item: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in _SYNONYM_SPLIT.split(item.strip()))


PROMPTS_PER_CALL = 64 * 80  # prompts per call of the text encoder (it batches them by length inside)


class TextEmbedder:
    """Per-query text embeddings averaged over templates, as the references compute them.

    For each query: embed every template, ℓ2-normalise each, average, ℓ2-normalise the mean.
    Results are cached in memory and on disk under ``<cache>/text/<key>.pt``, the key hashing the
    model, its weights tag, the templates and the query, so a second run encodes nothing. A cache file
    is untrusted: loaded with ``weights_only=True`` and used only if it is a finite float32 unit
    vector of the model's size; anything else is recomputed and overwritten.
    The queries not cached are encoded together, ``queries_per_call`` at a time: one ``encode``
    call gets all their prompts, so the encoder can batch prompts of similar length.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], torch.Tensor],
        model_id: str,
        templates: str,
        cache_root: Path | None,
        dim: int | None = None,
        queries_per_call: int | None = None,
    ) -> None:
        """``dim``: the embedding size, if known (a cache file of another size is then never used).
        ``queries_per_call``: default ``PROMPTS_PER_CALL`` prompts' worth (64 queries of the 80
        ImageNet templates; 5120 with one template, whose calls would otherwise be 64 prompts each)."""
        if queries_per_call is None:
            queries_per_call = max(1, PROMPTS_PER_CALL // len(get_templates(templates)))
        if queries_per_call < 1:
            raise ValueError(f"queries_per_call must be >= 1, got {queries_per_call}")
        self.encode = encode
        self.model_id = model_id
        self.templates = templates
        self.cache_root = cache_root
        self.queries_per_call = queries_per_call
        self._template_texts = template_texts(templates)  # part of every cache key; computed once
        self._memory: dict[str, torch.Tensor] = {}
        self._dim = dim  # embedding size; else known from the first query embedded
        self.encoded_queries = 0  # how many queries actually went through the text encoder
        self._last: tuple[ClassSet, torch.Tensor] | None = None  # the last class set and its (Q, E) matrix

    def _key(self, query: str) -> str:
        blob = json.dumps([self.model_id, self._template_texts, query])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path | None:
        return self.cache_root / f"{key}.pt" if self.cache_root is not None else None

    def _cached(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            emb = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign cache file is recomputed, never trusted
            return None
        if not self._plausible(emb):  # e.g. NaN, a wrong size, not normalised
            return None
        return self._remember(key, emb)

    def _remember(self, key: str, emb: torch.Tensor) -> torch.Tensor:
        """Keep ``emb`` (E,) in memory; its size is the one every later embedding must have."""
        self._dim = int(emb.shape[0])
        self._memory[key] = emb
        return emb

    def _plausible(self, emb: object) -> bool:
        """What ``_compute`` returns: a finite float32 vector of unit norm, as long as the others."""
        return (isinstance(emb, torch.Tensor) and emb.dtype == torch.float32 and emb.ndim == 1
                and emb.numel() > 0 and bool(torch.isfinite(emb).all())
                and abs(float(emb.norm()) - 1.0) < 1e-3 and self._dim in (None, emb.shape[0]))

    def embed_query(self, query: str) -> torch.Tensor:
        return self.embed_queries([query])[0]

    def embed_queries(self, queries: Sequence[str]) -> list[torch.Tensor]:
        """One (E,) embedding per query; the uncached ones encoded in few large calls."""
        keys = [self._key(q) for q in queries]
        # key -> query of each query neither in memory nor on disk, first occurrence first
        missing = {k: q for q, k in zip(queries, keys, strict=True) if self._cached(k) is None}
        todo = list(missing.items())
        for start in range(0, len(todo), self.queries_per_call):
            chunk = todo[start : start + self.queries_per_call]
            for (key, _), emb in zip(chunk, self._compute([q for _, q in chunk]), strict=True):
                self._remember(key, emb)
                path = self._path(key)
                if path is not None:
                    _atomic_torch_save(emb, path)
        return [self._memory[k] for k in keys]

    def _compute(self, queries: list[str]) -> torch.Tensor:
        """(len(queries), E): every template of every query in one encoder call, then averaged."""
        templates = get_templates(self.templates)
        texts = [t(q) for q in queries for t in templates]
        with torch.no_grad():
            feats = self.encode(texts).float().cpu()  # (len(queries) · T, E)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.view(len(queries), len(templates), -1).mean(dim=1)
        self.encoded_queries += len(queries)
        return mean / mean.norm(dim=-1, keepdim=True)

    def __call__(self, classes: ClassSet) -> torch.Tensor:
        """(Q, E) normalised embeddings of every query of ``classes`` (a copy: callers may change it).

        The last class set's matrix is kept: a job segments every image with one class list, and
        looking up a large vocabulary query by query (a hash each) would cost per image what a
        small model spends on the image (2000 classes: tens of milliseconds)."""
        if self._last is None or self._last[0] != classes:
            self._last = (classes, torch.stack(self.embed_queries(classes.queries)))
        return self._last[1].clone()


def _atomic_torch_save(obj: torch.Tensor, path: Path) -> None:
    # The cache is an optimisation; a read-only cache directory must not stop segmentation.
    with contextlib.suppress(OSError):
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
