"""Runner: matrix equals a direct computation; resume after interruption; settings fingerprint; skip-bad;
2-process gloo sharding equals one process."""

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from dapseg.data import DataError, SegDataset
from dapseg.eval.checkpoint import SettingsChangedError
from dapseg.eval.runner import RunOptions, evaluate
from eval_synth import FakePredictor, expected_classes, make_dataset
from servers import free_port

SETTINGS = {"preset": "fake", "x": 1}
QUIET = RunOptions(num_workers=0, progress=False, checkpoint_every=1)


def direct_matrix(ds: SegDataset, predictor) -> torch.Tensor:
    """Independent reference: loop over images, count (gt, pred) pairs with numpy."""
    C = ds.spec.num_classes
    cm = np.zeros((C, C), np.int64)
    for i in range(len(ds)):
        s = ds[i]
        p = predictor(s.image).numpy()
        valid = s.label != ds.spec.ignore_index
        np.add.at(cm, (s.label[valid], p[valid]), 1)
    return torch.from_numpy(cm)


@pytest.fixture
def voc(tmp_path):
    stored = make_dataset(tmp_path / "data", "voc21", n=6, seed=3)
    return SegDataset("voc21", tmp_path / "data"), stored


def test_matrix_equals_direct_count(voc, tmp_path):
    ds, _ = voc
    res = evaluate(ds, FakePredictor(21), tmp_path / "w", SETTINGS, RunOptions(num_workers=2, progress=False))
    assert torch.equal(res.cm, direct_matrix(ds, FakePredictor(21)))
    assert res.n_images == 6 and res.bad == {}
    saved = json.loads((tmp_path / "w" / "result.json").read_text())
    assert saved["mIoU"] == pytest.approx(100 * res.metrics.miou, abs=0.006)
    assert len(saved["per_class"]) == 21 and saved["settings"] == SETTINGS


def test_interrupted_then_resumed_equals_uninterrupted(voc, tmp_path):
    ds, _ = voc
    full = evaluate(ds, FakePredictor(21), tmp_path / "full", SETTINGS, QUIET)
    with pytest.raises(KeyboardInterrupt):
        evaluate(ds, FakePredictor(21, fail_after=4), tmp_path / "w", SETTINGS, QUIET)
    again = FakePredictor(21)
    resumed = evaluate(ds, again, tmp_path / "w", SETTINGS, QUIET)
    assert again.calls == 2  # only the images not finished before the interruption
    assert torch.equal(resumed.cm, full.cm)
    # a third run has nothing left to do and gives the same numbers
    idle = FakePredictor(21)
    assert torch.equal(evaluate(ds, idle, tmp_path / "w", SETTINGS, QUIET).cm, full.cm) and idle.calls == 0


def test_interrupted_twice_with_checkpoint_interval(voc, tmp_path):
    ds, _ = voc
    full = evaluate(ds, FakePredictor(21), tmp_path / "full", SETTINGS, QUIET)
    opts = RunOptions(num_workers=0, progress=False, checkpoint_every=3)
    for k in (2, 1):  # the final save on interruption keeps finished images even between checkpoints
        with pytest.raises(KeyboardInterrupt):
            evaluate(ds, FakePredictor(21, fail_after=k), tmp_path / "w", SETTINGS, opts)
    last = FakePredictor(21)
    assert torch.equal(evaluate(ds, last, tmp_path / "w", SETTINGS, opts).cm, full.cm)
    assert last.calls == 3


def test_changed_settings_with_old_work_dir_is_an_error(voc, tmp_path):
    ds, _ = voc
    evaluate(ds, FakePredictor(21), tmp_path / "w", SETTINGS, QUIET)
    with pytest.raises(SettingsChangedError, match=r"x: 1 -> 2"):
        evaluate(ds, FakePredictor(21), tmp_path / "w", {**SETTINGS, "x": 2}, QUIET)


def test_unwritable_work_dir_is_named_before_compute(voc, tmp_path):
    ds, _ = voc
    blocker = tmp_path / "file"
    blocker.write_text("x")
    pred = FakePredictor(21)
    with pytest.raises(PermissionError, match=r"work dir .*file/w is not writable"):
        evaluate(ds, pred, blocker / "w", SETTINGS, QUIET)
    assert pred.calls == 0


def test_skip_bad_counts_and_lists(tmp_path):
    make_dataset(tmp_path / "d", "ade20k", n=3)
    (tmp_path / "d/ade/ADEChallengeData2016/images/validation/img_001.jpg").write_bytes(b"garbage")
    pred = FakePredictor(150)
    with pytest.raises(DataError, match=r"img_001\.jpg"):
        evaluate(SegDataset("ade20k", tmp_path / "d"), pred, tmp_path / "w0", SETTINGS, QUIET)
    ds = SegDataset("ade20k", tmp_path / "d", skip_bad=True)
    res = evaluate(ds, FakePredictor(150), tmp_path / "w", SETTINGS, QUIET)
    assert list(res.bad) == ["img_001"] and "img_001.jpg" in res.bad["img_001"]
    good = [ds[0], ds[2]]
    expect = np.zeros((150, 150), np.int64)
    for s in good:
        p = FakePredictor(150)(s.image).numpy()
        v = s.label != 255
        np.add.at(expect, (s.label[v], p[v]), 1)
    assert np.array_equal(res.cm.numpy(), expect)


def test_save_pred_and_show(voc, tmp_path):
    ds, stored = voc
    opts = RunOptions(num_workers=0, progress=False, save_pred=True, show=2)
    evaluate(ds, FakePredictor(21), tmp_path / "w", SETTINGS, opts)
    for i, name in enumerate(ds.names):
        png = np.array(Image.open(tmp_path / "w" / "pred" / f"{name}.png"))
        assert np.array_equal(png, FakePredictor(21)(ds[i].image).numpy())
    shows = sorted(p.name for p in (tmp_path / "w" / "show").iterdir())
    assert shows == [f"{n}.jpg" for n in ds.names[:2]]
    h, w = stored[ds.names[0]].shape
    assert Image.open(tmp_path / "w" / "show" / shows[0]).size == (3 * w, h)


def test_predictor_with_wrong_shape_is_named(voc, tmp_path):
    ds, _ = voc
    with pytest.raises(ValueError, match=r"shape \(2, 2\) for img_000"):
        evaluate(ds, lambda im: torch.zeros(2, 2, dtype=torch.long), tmp_path / "w", SETTINGS, QUIET)


def test_labels_decoded_as_written(voc):
    ds, stored = voc
    for i, n in enumerate(ds.names):
        assert np.array_equal(ds[i].label, expected_classes(stored[n], ds.spec))


# ------------------------------------------------------------------ distributed (2 CPU processes, gloo)

def _worker(rank: int, world: int, port: int, data: str, work: str, out: str, fail_after) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = SegDataset("voc21", data)
        seen = []

        class Recording(FakePredictor):
            def __call__(self, image):
                out = super().__call__(image)
                seen.append(1)
                return out

        res = evaluate(ds, Recording(21, fail_after), work, SETTINGS, QUIET)
        torch.save({"cm": res.cm, "calls": len(seen)}, f"{out}.{rank}")
    except KeyboardInterrupt:
        torch.save({"cm": None, "calls": len(seen)}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_equals_single_process(voc, tmp_path):
    ds, _ = voc
    single = evaluate(ds, FakePredictor(21), tmp_path / "single", SETTINGS, QUIET)
    data = str(tmp_path / "data")
    # fork: the children need not re-import torch (keeps this test quick)
    mp.start_processes(_worker, args=(2, free_port(), data, str(tmp_path / "dist"), str(tmp_path / "out"), None),
                       nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    assert torch.equal(r0["cm"], single.cm) and torch.equal(r1["cm"], single.cm)
    assert r0["calls"] + r1["calls"] == 6 and r0["calls"] == 3  # sharded, no duplicates
    # one process resumes what two processes left: no image is counted twice
    idle = FakePredictor(21)
    assert torch.equal(evaluate(ds, idle, tmp_path / "dist", SETTINGS, QUIET).cm, single.cm) and idle.calls == 0


def test_two_processes_interrupted_then_one_process_resumes(voc, tmp_path):
    ds, _ = voc
    single = evaluate(ds, FakePredictor(21), tmp_path / "single", SETTINGS, QUIET)
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path / "data"), str(tmp_path / "w"),
                                      str(tmp_path / "out"), 2), nprocs=2, join=True, start_method="fork")
    assert [torch.load(tmp_path / f"out.{r}")["calls"] for r in (0, 1)] == [2, 2]
    rest = FakePredictor(21)
    assert torch.equal(evaluate(ds, rest, tmp_path / "w", SETTINGS, QUIET).cm, single.cm)
    assert rest.calls == 2
