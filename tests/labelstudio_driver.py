"""Drives a running Label Studio through its own SDK (label-studio-sdk), for tests/test_labelstudio.py.

Run by the Python of Label Studio's separate virtual environment (the server and its SDK pin versions
the project's environment does not take); it never imports dapseg. Each step prints one JSON object.

    setup    --url U --token T --photos DIR --upload FILE --bad-url URL --config XML
             a project with CONFIG; DIR as a local-files storage, synced (one task per image); FILE
             uploaded (a task with a /data/upload/ URL); a task whose image is BAD_URL; a personal
             access token for the ML backend
    predict  --url U --token T --project P --backend B --out DIR [--times N]
             B connected as the project's ML backend; Label Studio's "retrieve predictions" action run
             N times on every task; the stored predictions read back, each brush RLE decoded with
             Label Studio's decoder (label_studio_sdk.converter.brush.decode_rle) into DIR/<task>_<label>.npy
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import requests
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle


def setup(client: LabelStudio, args: argparse.Namespace) -> dict:
    project = client.projects.create(title="dapseg pre-annotation", label_config=args.config)
    storage = client.import_storage.local.create(project=project.id, path=args.photos, use_blob_urls=True,
                                                 regex_filter=r".*\.png", title="photos")
    client.import_storage.local.sync(id=storage.id)
    with open(args.upload, "rb") as f:  # the web UI's upload: a multipart POST to the import endpoint
        r = requests.post(f"{args.url}/api/projects/{project.id}/import", files={Path(args.upload).name: f},
                          headers={"Authorization": f"Token {args.token}"}, timeout=60)
    r.raise_for_status()
    client.projects.import_tasks(id=project.id, request=[{"data": {"image": args.bad_url}}])
    tasks = _wait_for_tasks(client, project.id, 4)
    pat = client.tokens.create().token
    return {"project": project.id, "tasks": {str(t.id): t.data["image"] for t in tasks}, "pat": pat}


def _wait_for_tasks(client: LabelStudio, project: int, count: int, timeout_s: float = 60) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = list(client.tasks.list(project=project))
        if len(tasks) >= count or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def predict(client: LabelStudio, args: argparse.Namespace) -> dict:
    backend = client.ml.create(project=args.project, url=args.backend, title="dapseg", is_interactive=False)
    counts = []
    for _ in range(args.times):
        client.actions.create(id="retrieve_tasks_predictions", project=args.project,
                              selected_items={"all": True, "excluded": []})
        counts.append(len(list(client.predictions.list(project=args.project))))
    backend = client.ml.get(id=backend.id)
    # Labeling view: show this model's predictions as the pre-annotation of a task
    client.projects.update(id=args.project, model_version=backend.model_version, show_collab_predictions=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predictions = []
    for p in client.predictions.list(project=args.project):
        regions = []
        for r in p.result:
            h, w = r["original_height"], r["original_width"]
            rgba = np.asarray(decode_rle(r["value"]["rle"]), dtype=np.uint8).reshape(h, w, 4)
            (label,) = r["value"]["brushlabels"]
            path = out / f"{p.task}_{label}.npy"
            np.save(path, rgba[:, :, 3] > 0)  # the alpha channel is the mask
            regions.append({"label": label, "mask": str(path), "width": w, "height": h, "type": r["type"],
                            "from_name": r["from_name"], "to_name": r["to_name"]})
        predictions.append({"task": p.task, "score": p.score, "model_version": p.model_version,
                            "regions": regions})
    return {"counts": counts, "backend_state": backend.state, "backend_version": backend.model_version,
            "predictions": predictions}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["setup", "predict"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--photos")
    ap.add_argument("--upload")
    ap.add_argument("--bad-url")
    ap.add_argument("--config")
    ap.add_argument("--project", type=int)
    ap.add_argument("--backend")
    ap.add_argument("--out")
    ap.add_argument("--times", type=int, default=1)
    args = ap.parse_args()
    client = LabelStudio(base_url=args.url, api_key=args.token)
    result = setup(client, args) if args.step == "setup" else predict(client, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
