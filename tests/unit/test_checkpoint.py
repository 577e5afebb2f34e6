"""Checkpoint integrity: a manifest written last, partial and damaged checkpoints refused, resume
falling back to the newest complete checkpoint, and no arbitrary pickle, locally. On moto's S3:
tests/integration/test_checkpoint.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import pickle
import warnings

import pytest
import torch
from ray.train import Checkpoint

from wrn_cluster.models import build_model
from wrn_cluster.train import checkpoint
from wrn_cluster.train.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointMismatchError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)

ARCH, CLASSES = "wrn-10-2", 4


def training_state(epoch: int, **extra) -> dict:
    return {
        "arch": ARCH,
        "num_classes": CLASSES,
        "model": {"weight": torch.full((64, 64), float(epoch))},
        "epoch": epoch,
        "rng": [checkpoint.rng_state()],
        **extra,
    }


def test_save_writes_the_state_then_a_manifest_of_sizes_and_checksums(tmp_path):
    path = checkpoint.save(tmp_path, training_state(3))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert path == tmp_path / STATE_FILE
    assert manifest["files"] == {
        STATE_FILE: {
            "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    }
    assert (tmp_path / MANIFEST_FILE).stat().st_mtime_ns >= path.stat().st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE, STATE_FILE]
    state = checkpoint.load(tmp_path, ARCH, CLASSES)
    assert state["epoch"] == 3 and torch.equal(state["model"]["weight"], torch.full((64, 64), 3.0))


def _damage(directory: pathlib.Path, how: str) -> str:
    """Damage a saved checkpoint; return what the error must say."""
    state = directory / STATE_FILE
    if how == "no manifest":  # cut short before its last file
        (directory / MANIFEST_FILE).unlink()
        return f"no {MANIFEST_FILE}"
    if how == "truncated state":
        state.write_bytes(state.read_bytes()[:1000])
        return "cut short"
    if how == "one byte flipped":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
        return "SHA-256"
    if how == "state missing":
        state.unlink()
        return f"{STATE_FILE} is missing"
    if how == "manifest garbage":
        (directory / MANIFEST_FILE).write_text('{"files": [1, 2')
        return "damaged"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["no manifest", "truncated state", "one byte flipped", "state missing", "manifest garbage"],
)
def test_a_partial_or_damaged_checkpoint_is_refused_with_the_reason(tmp_path, how):
    checkpoint.save(tmp_path, training_state(1))
    expected = _damage(tmp_path, how)
    with pytest.raises(CorruptCheckpointError) as caught:
        checkpoint.load(tmp_path, ARCH, CLASSES)
    assert str(tmp_path) in str(caught.value) and expected in str(caught.value)


class Custom:
    """A class of this test module: loading it would need arbitrary pickle."""


def test_a_checkpoint_that_needs_arbitrary_pickle_is_refused_and_runs_no_code(tmp_path):
    tripwire = tmp_path / "code-ran"

    class Tripwire:
        def __reduce__(self):  # unpickling this would create the file
            return (pathlib.Path.touch, (tripwire,))

    folder = tmp_path / "ckpt"
    folder.mkdir()
    checkpoint.save(folder, training_state(1, extra=Custom()))
    with pytest.raises(UnsafeCheckpointError) as caught:
        checkpoint.load(folder, ARCH, CLASSES)
    message = str(caught.value)
    assert "tests.unit.test_checkpoint.Custom" in message and "weights_only=True" in message
    assert "start fresh" in message

    checkpoint.save(folder, training_state(1, extra=Tripwire()))
    with pytest.raises(UnsafeCheckpointError):
        checkpoint.load(folder, ARCH, CLASSES)
    assert not tripwire.exists()
    pickle.loads(pickle.dumps(Tripwire()))  # the tripwire works: plain pickle runs it
    assert tripwire.exists()


def test_a_checkpoint_of_another_network_is_refused(tmp_path):
    checkpoint.save(tmp_path, training_state(1))
    with pytest.raises(CheckpointMismatchError, match="holds wrn-10-2 with 4 classes"):
        checkpoint.load(tmp_path, "wrn-16-2", CLASSES)


# ---------------------------------------------------------------------------------------------
# Resume: the newest complete checkpoint no newer than Ray's latest


NAMES = [f"checkpoint_2026-01-01_00-00-0{i}.000000" for i in range(1, 5)]


def local_run(tmp_path) -> list[Checkpoint]:
    """A run folder as Ray Train leaves it: checkpoint_<time> folders, epochs 1..4."""
    found = []
    for epoch, name in enumerate(NAMES, start=1):
        folder = tmp_path / "job" / name
        folder.mkdir(parents=True)
        checkpoint.save(folder, training_state(epoch))
        found.append(Checkpoint(str(folder)))
    (tmp_path / "job" / "checkpoint_manager_snapshot.json").write_text("{}")
    return found


def test_resume_uses_the_latest_checkpoint_when_it_is_complete(tmp_path):
    run = local_run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.load_latest(run[2], ARCH, CLASSES)["epoch"] == 3


def test_resume_falls_back_to_the_newest_complete_checkpoint_before_a_broken_latest(tmp_path):
    run = local_run(tmp_path)
    _damage(pathlib.Path(run[2].path), "truncated state")
    with pytest.warns(UserWarning) as warned:
        state = checkpoint.load_latest(run[2], ARCH, CLASSES)
    assert state["epoch"] == 2  # not epoch 4: that one is newer than Ray's latest
    message = str(warned[0].message)
    assert run[2].path in message and run[1].path in message and "cut short" in message

    _damage(pathlib.Path(run[1].path), "no manifest")
    with pytest.warns(UserWarning, match=NAMES[0]):
        assert checkpoint.load_latest(run[2], ARCH, CLASSES)["epoch"] == 1

    _damage(pathlib.Path(run[0].path), "one byte flipped")
    with pytest.raises(CorruptCheckpointError) as caught:
        checkpoint.load_latest(run[2], ARCH, CLASSES)
    assert "no complete checkpoint precedes it" in str(caught.value)
    assert str(tmp_path / "job") in str(caught.value)


# ---------------------------------------------------------------------------------------------
# The state's keys: a checkpoint written before the loop was reshaped (issue 14) still resumes

# The keys train/worker.py's WorkerRun.report wrote for a classifier, before train.loop and
# checkpoint.training_state replaced it (commit 0b9d6c6).
KEYS_BEFORE_ISSUE_14 = {
    "arch", "num_classes", "model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng",
    "data_order", "resumes", "mlflow_run_id", "metrics", "class_names",
}  # fmt: skip


def _training(seed: int) -> checkpoint.Training:
    torch.manual_seed(seed)
    net = build_model(ARCH, CLASSES)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    return checkpoint.Training(net, optimizer, scheduler, torch.amp.GradScaler("cpu"))


def test_a_checkpoint_written_before_the_loop_was_reshaped_resumes_exactly(tmp_path):
    trained = _training(seed=1)
    loss = trained.model(torch.rand(2, 3, 32, 32)).sum()
    loss.backward()
    trained.optimizer.step()
    trained.scheduler.step()
    old_layout = {  # as the pre-issue-14 worker built it, literally
        "arch": ARCH,
        "num_classes": CLASSES,
        "model": trained.model.state_dict(),
        "optimizer": trained.optimizer.state_dict(),
        "scheduler": trained.scheduler.state_dict(),
        "scaler": trained.scaler.state_dict(),
        "epoch": 3,
        "step": trained.scheduler.last_epoch,
        "rng": [checkpoint.rng_state()],
        "data_order": {"seed": 0, "next_epoch": 3},
        "resumes": [1],
        "mlflow_run_id": "0123abcd",
        "metrics": {"epoch": 3, "val_top1": 0.5},
        "class_names": ["a", "b", "c", "d"],
    }
    assert set(old_layout) == KEYS_BEFORE_ISSUE_14
    folder = tmp_path / "checkpoint_2026-01-01_00-00-01.000000"
    folder.mkdir()
    checkpoint.save(folder, old_layout)

    fresh = _training(seed=2)
    resumed = checkpoint.restore(Checkpoint(str(folder)), fresh, ARCH, CLASSES, rank=0)
    assert (resumed.epoch, resumed.resumes, resumed.mlflow_run_id) == (3, [1, 3], "0123abcd")
    for name, value in trained.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], value), name
    assert fresh.scheduler.last_epoch == trained.scheduler.last_epoch
    momentum = fresh.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, trained.optimizer.state_dict()["state"][0]["momentum_buffer"])

    written = checkpoint.training_state(
        fresh,
        arch=ARCH,
        num_classes=CLASSES,
        epoch=3,
        seed=0,
        rng=[checkpoint.rng_state()],
        resumed=resumed,
        metrics={"epoch": 4},
        extra={"class_names": ["a", "b", "c", "d"]},
    )
    assert set(written) == KEYS_BEFORE_ISSUE_14  # what this version writes, an older one reads
    assert written["epoch"] == 4 and written["resumes"] == [1, 3]


def test_a_step_checkpoint_resumes_inside_its_epoch_and_reads_as_the_epoch_start_elsewhere(
    tmp_path,
):
    trained = _training(seed=1)
    state = checkpoint.training_state(
        trained,
        arch=ARCH,
        num_classes=CLASSES,
        epoch=2,  # 0-based: the third epoch, 40 samples into it
        samples_in_epoch=40,
        seed=0,
        rng=[checkpoint.rng_state()],
        resumed=checkpoint.Resumed(),
        metrics={"epoch": 3, "step": 25},
        extra={"class_names": ["a", "b", "c", "d"]},
    )
    assert set(state) == KEYS_BEFORE_ISSUE_14  # an older version resumes at epoch 3's start
    assert state["epoch"] == 2 and state["data_order"]["samples_in_epoch"] == 40
    folder = tmp_path / "checkpoint_2026-01-01_00-00-01.000000"
    folder.mkdir()
    checkpoint.save(folder, state)
    resumed = checkpoint.restore(Checkpoint(str(folder)), _training(seed=2), ARCH, CLASSES, 0)
    assert (resumed.epoch, resumed.samples_in_epoch, resumed.resumes) == (2, 40, [2])

    at_end = checkpoint.training_state(
        trained,
        arch=ARCH,
        num_classes=CLASSES,
        epoch=2,
        seed=0,
        rng=[checkpoint.rng_state()],
        resumed=resumed,
        metrics={"epoch": 3},
        extra={},
    )
    assert at_end["epoch"] == 3 and "samples_in_epoch" not in at_end["data_order"]


def test_a_rank_the_writing_run_did_not_have_keeps_its_own_random_streams(tmp_path):
    torch.manual_seed(11)
    written = checkpoint.rng_state()  # the one rank of the run that wrote the checkpoint
    state = checkpoint.training_state(
        _training(seed=1),
        arch=ARCH,
        num_classes=CLASSES,
        epoch=0,
        seed=0,
        rng=[written],
        resumed=checkpoint.Resumed(),
        metrics={},
        extra={},
    )
    folder = tmp_path / "checkpoint_2026-01-01_00-00-01.000000"
    folder.mkdir()
    checkpoint.save(folder, state)
    for rank, expected in [(0, written["torch"]), (1, None)]:
        fresh = _training(seed=4)
        torch.manual_seed(12 + rank)
        own = torch.get_rng_state().numpy().tobytes()
        checkpoint.restore(Checkpoint(str(folder)), fresh, ARCH, CLASSES, rank=rank)
        assert torch.get_rng_state().numpy().tobytes() == (expected or own), rank


def test_an_upload_counts_as_in_flight_until_it_ends_whether_it_stores_or_fails():
    import threading

    uploading = checkpoint.UploadsInFlight()
    release, started = threading.Event(), threading.Event()

    def slow_upload(local, name):
        started.set()
        release.wait(10)
        if name == "bad":
            raise OSError("store down")
        return name

    assert not uploading.busy()
    for name in ("good", "bad"):
        started.clear()
        release.clear()
        upload = uploading.track(slow_upload)  # handed to Ray's upload thread: in flight
        assert uploading.busy()
        worker = threading.Thread(target=lambda u=upload, n=name: _swallow(u, n))
        worker.start()
        assert started.wait(10) and uploading.busy()
        release.set()
        worker.join(10)
        assert not uploading.busy(), name


def _swallow(upload, name):
    with contextlib.suppress(OSError):
        upload(None, name)


def test_a_preemption_checkpoint_says_which_node_how_fast_and_how_long_before_the_deadline():
    import time

    from ray.train import PreemptionInfo

    from wrn_cluster.train.loop import Preemption

    notice = PreemptionInfo(
        deadline_ms=int((time.time() + 15.4) * 1000), preempted_node_to_ranks={"ab12cd34ef": [1]}
    )
    line = Preemption.line("big", notice, 4200, time.perf_counter() - 2.5)
    assert line.startswith("[big] node ab12cd34 is being preempted: checkpointed at step 4200 in ")
    assert line.endswith("s, 15s before its deadline") and " in 2.5s" in line
    no_deadline = PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"ab12cd34ef": [1]})
    assert Preemption.line("big", no_deadline, 1, time.perf_counter()).endswith("in 0.0s")


def test_retention_keeps_the_newest_the_best_and_the_registered():
    def at(*rows):
        return {name: checkpoint.Stored(step, score) for name, step, score in rows}

    stored = at(
        ("c1", 10, 0.50), ("c2", 20, 0.90), ("c3", 25, None), ("c4", 30, 0.70),
        ("c5", 40, 0.90), ("c6", 50, 0.60),
    )  # fmt: skip
    assert checkpoint.retained(stored, 2, 0, False, set()) == {"c5", "c6"}
    assert checkpoint.retained(stored, 1, 1, False, set()) == {"c6", "c5"}  # c5: newer of 0.9s
    assert checkpoint.retained(stored, 1, 2, False, set()) == {"c6", "c5", "c2"}
    assert checkpoint.retained(stored, 1, 1, True, set()) == {"c6", "c1"}  # a loss: lowest
    assert checkpoint.retained(stored, 1, 0, False, {"c3", "elsewhere"}) == {"c6", "c3"}
    assert checkpoint.retained(at(("c1", 5, None)), 1, 3, False, set()) == {"c1"}
    # Newest means most steps, whatever the folder names (a node's clock) say.
    skewed = at(("checkpoint_b", 90, None), ("checkpoint_a", 120, None))
    assert checkpoint.retained(skewed, 1, 0, False, set()) == {"checkpoint_a"}


def test_pruning_retires_only_complete_unkept_checkpoints_and_asks_the_registry_last(tmp_path):
    import pyarrow.fs

    run = tmp_path / "job"
    names = [f"checkpoint_2026-12-03_10-0{epoch}-00.000000" for epoch in range(1, 6)]
    for epoch, top1 in enumerate([0.4, 0.9, 0.5, 0.6, float("nan")], start=1):
        folder = run / names[epoch - 1]
        folder.mkdir(parents=True)
        state = {"epoch": epoch, "step": 10 * epoch, "metrics": {"epoch": epoch, "val_top1": top1}}
        checkpoint.save(folder, state)
    uploading = run / "checkpoint_2026-12-03_10-09-00.000000"  # no manifest yet
    uploading.mkdir()
    registry_asked = []

    def protected():
        registry_asked.append(True)
        return {str(run / names[0])}

    fs, policy, known = pyarrow.fs.LocalFileSystem(), (1, 1, "val_top1"), {}
    newest = str(run / names[4])  # diverged (NaN): never the best, but the one just reported
    deleted = checkpoint.prune(str(run), fs, policy, newest, protected, known)
    assert [pathlib.Path(p).name for p in deleted] == [names[2], names[3]]
    left = sorted(p.parent.name for p in run.glob(f"*/{MANIFEST_FILE}"))
    assert left == [names[0], names[1], names[4]]  # registered, best val_top1, newest
    # Ray Train's record still names the retired folders: they stay, with a note only.
    for name in (names[2], names[3]):
        assert [p.name for p in (run / name).iterdir()] == [checkpoint.RETIRED_FILE]
    assert uploading.is_dir() and not list(uploading.iterdir())  # under way: never touched
    assert registry_asked == [True] and set(known) == {str(run / n) for n in left}
    # Only the registration holds names[0]: each pass asks again, and keeps it.
    assert checkpoint.prune(str(run), fs, policy, newest, protected, known) == []
    assert checkpoint.prune(str(run), fs, (3, 0, "val_top1"), newest, protected, known) == []
    assert registry_asked == [True, True]  # the last: nothing would go, the registry not asked

    def unreachable():
        raise ConnectionError("connection refused")

    with pytest.warns(UserWarning, match="not retiring old checkpoints .*connection refused"):
        assert checkpoint.prune(str(run), fs, (1, 0, "val_top1"), newest, unreachable) == []
    with pytest.warns(UserWarning, match="not retiring old checkpoints .*FileNotFoundError"):
        assert checkpoint.prune(str(tmp_path / "gone"), fs, policy, newest, protected) == []
    assert len(list(run.glob(f"*/{MANIFEST_FILE}"))) == 3
