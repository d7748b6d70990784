"""`dapseg serve`: a Label Studio ML backend that pre-annotates images with brush masks."""

from __future__ import annotations

import argparse
import logging
import os

from dapseg.commands.common import add_model_args, add_threads_arg, apply_threads, build_segmenter, config_from_args
from dapseg.config import default_preset

MB = 1 << 20


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a Label Studio ML backend (brush pre-annotation)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=9090, help="port (default: 9090)")
    p.add_argument("--classes-file", help="prompts per label: one class per line, synonyms after ';' (e.g. "
                   "'Sky; clouds'); a line whose first name is a label's value gives that label's queries")
    p.add_argument("--local-files-root", metavar="DIR", help="read /data/local-files/?d=PATH images from DIR/PATH "
                   "(Label Studio's LOCAL_FILES_DOCUMENT_ROOT) instead of downloading them")
    p.add_argument("--unlabeled-classes", metavar="NAMES", default="",
                   help="classes added after the project's labels whose pixels are left unlabeled, e.g. "
                   "'background; wall' (classes separated by ',', synonyms by ';'); pixels below "
                   "postprocess.prob_thd are always left unlabeled")
    add_threads_arg(p)
    g = p.add_argument_group("limits")
    g.add_argument("--max-tasks", type=int, default=32, help="tasks predicted per request; the rest get an error "
                   "and are predicted when Label Studio asks again (default: 32)")
    g.add_argument("--max-classes", type=int, default=255, help="labels per BrushLabels control (default: 255)")
    g.add_argument("--max-body-mb", type=float, default=16, help="largest request body (default: 16)")
    g.add_argument("--max-image-mb", type=float, default=64, help="largest image file (default: 64)")
    g.add_argument("--max-pending", type=int, default=256,
                   help="tasks in progress over all requests; beyond, HTTP 503 (default: 256)")
    g.add_argument("--prefetch", type=int, default=2,
                   help="images read and decoded ahead of the model (default: 2)")
    g.add_argument("--fetch-timeout", type=float, default=60, help="seconds per image download (default: 60)")
    add_model_args(p, default_preset=None, preset_note="default: dap, or naclip where dap is absent")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:  # starlette, uvicorn, httpx, defusedxml: the serve extra
        import uvicorn

        from dapseg.serve.app import create_app
        from dapseg.serve.label_config import Prompts
        from dapseg.serve.media import MediaLimits, MediaReader
        from dapseg.serve.prediction import BrushPredictor
        from dapseg.serve.service import BackendService, ServiceLimits
    except ImportError as e:
        raise RuntimeError(f"dapseg serve needs the serve extra: pip install 'dapseg[serve]' ({e})") from e
    from dapseg.images import pixel_limit

    if not args.preset and not args.config:
        args.preset = default_preset()
    config_from_args(args)  # settings errors before the models load
    limits = ServiceLimits(max_tasks=args.max_tasks, max_classes=args.max_classes,
                           max_body_bytes=int(args.max_body_mb * MB), max_pending=args.max_pending,
                           prefetch=args.prefetch)
    if args.max_image_mb <= 0 or args.fetch_timeout <= 0:
        raise ValueError("--max-image-mb and --fetch-timeout must be > 0")
    # --max-pixels is the machine option every command has (the CLI set the process's limit from it)
    max_pixels = pixel_limit()
    prompts = Prompts.from_args(args.classes_file, args.unlabeled_classes)
    reader = MediaReader(
        MediaLimits(max_pixels=max_pixels, max_bytes=int(args.max_image_mb * MB), timeout_s=args.fetch_timeout),
        local_files_root=args.local_files_root,
        label_studio_url=os.environ.get("LABEL_STUDIO_URL"),
        api_key=os.environ.get("LABEL_STUDIO_API_KEY"),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("dapseg.serve")
    if reader.base_url and reader.auth is None:
        log.warning("LABEL_STUDIO_URL is set but LABEL_STUDIO_API_KEY is not: Label Studio will refuse the "
                    "downloads (HTTP 401)")
    apply_threads(args.threads)
    segmenter = build_segmenter(args)  # the models load once, before the first request
    predictor = BrushPredictor(segmenter, prompts)
    service = BackendService(predictor, reader, limits)
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    info = {"preset": segmenter.config.name, "device": str(segmenter.device)}
    app = create_app(service, info, basic_auth=(user, password) if user and password else None)
    log.info("model %s on %s; images from %s%s", predictor.model_version, segmenter.device,
             reader.base_url or "(LABEL_STUDIO_URL not set)",
             f" and {reader.local_root}" if reader.local_root else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)
    return 0
