"""`dapseg demo`: a local Gradio page to try a preset on an image in the browser.

The page takes an image (upload or a bundled example), class names ("cat, sofa; couch, floor"),
a preset and its main knobs, and shows the overlay with a legend, the label map, a per-class
confidence heatmap and the pixel share per class, with the label PNG and JSON to download.
Requests run one at a time through Gradio's queue; an error in one (no image, bad image, empty
class list, missing weights) is shown in the page and the server keeps serving. The request
logic lives in ``dapseg.demo.backend``; this module is only the page.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapseg.config import SegmenterConfig
from dapseg.demo.backend import (
    DemoSession,
    HeatmapState,
    Knobs,
    Outputs,
    error_html,
    knobs_from_ui,
    plugin_choices,
    refiner_choices,
    render_heatmap,
)
from dapseg.pool import SegmenterPool

EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
GENERIC_CLASSES = "person, sky, tree, grass, building, road"

CSS = """
.dapseg-legend td, .dapseg-legend th { padding: 2px 8px; }
"""


@dataclass
class Catalog:
    """The methods the page offers, by name, and how to get each one's config."""

    names: list[str]
    resolve: Callable[[str], SegmenterConfig]
    initial: str

    def __post_init__(self) -> None:
        if self.initial not in self.names:
            raise ValueError(f"unknown preset {self.initial!r}; valid presets: {', '.join(self.names)}")


def example_images() -> list[Path]:
    """Bundled example photos: the repository's examples/ folder or the package's assets."""
    here = Path(__file__).resolve().parent
    found: list[Path] = []
    for folder in (here.parents[1] / "examples", here / "assets" / "examples"):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)
    return found


# Class lists that suit the bundled photos (skimage.data's astronaut and chelsea).
EXAMPLE_CLASSES = {
    "astronaut": "person, rocket, flag, sky; background",
    "chelsea": "cat, wall, floor",
}


def example_classes(path: Path) -> str:
    """The class list for an example: <stem>.txt beside it (one class per line) if present."""
    txt = path.with_suffix(".txt")
    if txt.is_file():
        lines = [ln.strip() for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return ", ".join(lines)
    return EXAMPLE_CLASSES.get(path.stem, GENERIC_CLASSES)


def build_app(session: DemoSession, catalog: Catalog, examples: Sequence[Path] = ()) -> Any:
    """The Gradio Blocks of the demo page (not launched)."""
    import gradio as gr

    k0 = Knobs.from_config(catalog.resolve(catalog.initial))
    with gr.Blocks(title="dapseg demo", analytics_enabled=False) as app:  # no calls home
        gr.Markdown("# dapseg — open-vocabulary segmentation\nUpload an image, type class names "
                    "(comma-separated, synonyms with `;`), choose a preset and press **Segment**.")
        with gr.Row():
            with gr.Column(scale=1):
                # image_mode=None: Gradio hands the upload on undecoded (dapseg checks its size first)
                image_in = gr.Image(type="filepath", image_mode=None, label="Image",
                                    sources=["upload", "clipboard"], buttons=["fullscreen"], elem_id="input-image",
                                    height=360)
                classes_in = gr.Textbox(label="Classes", elem_id="classes", lines=1,
                                        placeholder="person, sky; clouds, grass, building")
                preset_in = gr.Dropdown(catalog.names, value=catalog.initial, label="Preset",
                                        elem_id="preset")
                with gr.Accordion("Settings", open=False):
                    short_side = gr.Slider(0, 1024, value=k0.short_side or 0, step=8,
                                           label="Short side (px, 0 = keep the size)", elem_id="short-side")
                    crop = gr.Slider(32, 1024, value=k0.crop, step=8, label="Window (px)", elem_id="crop")
                    stride = gr.Slider(8, 1024, value=k0.stride, step=8, label="Stride (px)",
                                       elem_id="stride")
                    prob_thd = gr.Slider(0.0, 1.0, value=k0.prob_thd, step=0.01,
                                         label="Background threshold (prob_thd)", elem_id="prob-thd")
                    plugin = gr.Radio(plugin_choices(), value=k0.plugin, label="Plug-in", elem_id="plugin")
                    refine = gr.Radio(refiner_choices(), value=k0.refine, label="Refiner", elem_id="refine")
                run_btn = gr.Button("Segment", variant="primary", elem_id="run")
                if examples:
                    gr.Examples([[str(p), example_classes(p)] for p in examples],
                                inputs=[image_in, classes_in], label="Examples")
            with gr.Column(scale=2):
                error_box = gr.HTML("", elem_id="error-box")
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    overlay = gr.Image(label="Overlay", format="png", interactive=False, scale=3,
                                       buttons=["download", "fullscreen"], elem_id="overlay")
                    with gr.Column(scale=2):
                        legend = gr.HTML("", elem_id="legend")
                        files = gr.File(label="Download: label PNG, overlay, JSON", file_count="multiple",
                                        interactive=False, elem_id="downloads")
                with gr.Row():
                    label_map = gr.Image(label="Label map", format="png", interactive=False,
                                         buttons=["download", "fullscreen"], elem_id="label-map")
                    with gr.Column():
                        heat_class = gr.Dropdown([], label="Confidence heatmap of class",
                                                 elem_id="heatmap-class", interactive=True)
                        heatmap = gr.Image(label="Confidence (blue 0 → red 1)", format="png",
                                           interactive=False, buttons=["download", "fullscreen"],
                                           elem_id="heatmap")
        state = gr.State(None)

        def on_preset(name: str):
            k = Knobs.from_config(catalog.resolve(name))
            return k.short_side or 0, k.crop, k.stride, k.prob_thd, k.plugin, k.refine

        def on_run(img, text, name, side, crop_v, stride_v, thd, plugin_v, refine_v):
            try:
                knobs = knobs_from_ui(side, crop_v, stride_v, thd, plugin_v, refine_v)
            except ValueError as e:
                out = Outputs(error=str(e))
            else:
                out = session.run(img, text, name, knobs)
            return (
                error_html(out.error) if out.error else "",
                out.status,
                out.overlay,
                out.label_map,
                out.legend,
                gr.Dropdown(choices=out.classes, value=out.classes[0] if out.classes else None),
                out.heatmap,
                out.files,
                out.state,
            )

        def on_heat_class(name: str | None, st: HeatmapState | None):
            if st is None or not name or name not in st.classes:
                return None
            return render_heatmap(st, name)

        preset_in.change(on_preset, preset_in, [short_side, crop, stride, prob_thd, plugin, refine])
        run_btn.click(
            on_run,
            [image_in, classes_in, preset_in, short_side, crop, stride, prob_thd, plugin, refine],
            [error_box, status, overlay, label_map, legend, heat_class, heatmap, files, state],
            concurrency_limit=1,  # one inference at a time; other users wait in the queue
        )
        # .input, not .change: a run sets the dropdown and already returns the heatmap of its first class;
        # .change would render it a second time and swap the image while the page is still loading it.
        heat_class.input(on_heat_class, [heat_class, state], heatmap)
    return app


def serve(catalog: Catalog, build: Callable[[str], Any], *, host: str = "127.0.0.1", port: int = 7860,
          description: str = "", preload: bool = True) -> None:
    """Serve the page until interrupted (blocking). ``build(name)`` builds the model of a preset;
    with ``preload`` the initial one is built first, so missing weights fail before serving."""
    pool = SegmenterPool(build)
    if preload:
        pool.base(catalog.initial)
    with tempfile.TemporaryDirectory(prefix="dapseg-demo-") as tmp:
        session = DemoSession(pool, Path(tmp), description=description)
        examples = example_images()
        app = build_app(session, catalog, examples)
        app.queue(max_size=32)
        print(f"dapseg demo: serving {catalog.initial!r} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        folders = [tmp, *sorted({str(p.parent) for p in examples})]  # files the page may serve
        app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, allowed_paths=folders, css=CSS,
                   footer_links=[], quiet=True)
