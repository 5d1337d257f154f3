"""engine.files: nothing outside the folder: planted links, temporary names, file modes, permissions."""
import json

import pytest
import torch

from tests.trainer_helpers import make_unwritable
from tests.vit3.engine.fakes import OneProcess, save_step
from vit3 import engine as T
from vit3.engine import ConfigError


def _plant(link, victim):
    """A link at `link` to the file `victim` (outside the folder), which must stay as it is."""
    victim.write_text("victim")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)


def test_no_write_follows_a_planted_link(tmp_path):
    """The predictable temporary names of earlier versions, and the final names, hold links to a file outside
    the run folder: rewrites replace the links, appends refuse them in one line naming the link."""
    class Acc(OneProcess):
        distributed_type, mixed_precision, device = "NO", "no", torch.device("cpu")

    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    for name in (".config.yaml.tmp", ".run.json.tmp", "eval.json"):
        _plant(run / name, victim)
    T.write_run_info(run, {"a": 1}, Acc(), seed=0)
    T.write_json(run / "eval.json", {"top1": 1.0}, Acc())
    assert victim.read_text() == "victim" and json.loads((run / "eval.json").read_text()) == {"top1": 1.0}
    assert not (run / "eval.json").is_symlink()
    assert sorted(p.name for p in run.iterdir() if not p.is_symlink()) == ["config.yaml", "eval.json", "run.json"]

    _plant(run / "metrics.jsonl", victim)
    with pytest.raises(ConfigError, match=rf"{run / 'metrics.jsonl'} is a symbolic link \(to {victim}\): a run "
                                          r"writes only inside its folder.*remove the link"):
        T.MetricsFile(run / "metrics.jsonl", True).write(1, {"loss": 1.0})
    _plant(run / "log.txt", victim)
    with pytest.raises(ConfigError, match=rf"{run / 'log.txt'} is a symbolic link"):
        T.run.setup_logging(run, True)
    T.run.close_logging()
    (run / "run.json").unlink()
    (run / "run.json").symlink_to(victim)
    with pytest.raises(ConfigError, match=r"run.json is a symbolic link"):  # it would be read into the new one
        T.write_run_info(run, {"a": 1}, Acc(), seed=0)
    assert victim.read_text() == "victim"

    # the checkpoint's temporary folder and its swap folder
    root = run / "checkpoints"
    (tmp_path / "elsewhere").mkdir()
    (root / ".tmp-step-00000001").parent.mkdir()
    (root / ".tmp-step-00000001").symlink_to(tmp_path / "elsewhere")
    save_step(root, 1)
    (root / ".trash-step-00000001").symlink_to(tmp_path / "elsewhere")
    save_step(root, 1)
    assert list((tmp_path / "elsewhere").iterdir()) == [] and T.verify_checkpoint(root / "step-00000001") is None


def test_temporary_names_are_fresh_and_files_follow_the_umask(tmp_path):
    """Checkpoint files (safetensors writes 0600) and atomically written files get the mode a plain open
    gives: a teammate can read them where the umask lets them."""
    mode = 0o666 & ~T.files.UMASK
    ckpt = save_step(tmp_path / "checkpoints", 1)
    assert {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == {p.name: mode for p in ckpt.iterdir()}
    names = []
    for _ in range(2):
        with T.atomic_path(tmp_path / "a.png", suffix=".png") as tmp:
            names.append(tmp.name)
            assert tmp.is_file() and tmp.name.startswith(".a.png.") and tmp.name.endswith(".tmp.png")
            tmp.write_bytes(b"x")
    assert names[0] != names[1] and (tmp_path / "a.png").stat().st_mode & 0o777 == mode
    with pytest.raises(RuntimeError), T.atomic_path(tmp_path / "b") as tmp:
        raise RuntimeError("the writer failed")
    assert not (tmp_path / "b").exists() and not tmp.exists()  # nothing partial, no temporary file
    with T.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "d" / "f").read_text() == "1"
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~T.files.UMASK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "checkpoints", "d"]


def test_an_unwritable_folder_is_a_permission_error_not_a_full_disk(tmp_path, monkeypatch):
    """As a normal user (simulated under root: see make_unwritable): a checkpoint, and a new run folder,
    stop with exit code 5 and say the folder cannot be written, not that space is short."""
    root = tmp_path / "run" / "checkpoints"
    save_step(root, 1)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(T.checkpoint.torch, "save", denied)
        with pytest.raises(T.WriteError, match=r"into .*checkpoints: permission denied.*intact: make .* writable") as e:
            save_step(root, 2)
    assert "free" not in str(e.value) and sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    out = make_unwritable(tmp_path / "ro", monkeypatch)
    with pytest.raises(T.WriteError, match=rf"cannot write a run folder in {out}: permission denied.*output_dir"):
        T.resolve_run(str(out), "exp")


def test_check_writable_probes_each_folder_with_a_real_write(tmp_path, monkeypatch):
    """A folder, or (not made yet) its nearest existing parent, must take a new file. We run as root, which writes
    through any mode bits, so the refusal a normal user gets is reproduced where the probe writes: make_unwritable
    refuses os.open / os.mkdir under its folder (tempfile creates its file with os.open), so a probe that only read
    mode bits (os.access) would pass here and the test would fail. A path under a regular file fails for real."""
    ok = tmp_path / "ok"
    ok.mkdir()
    T.check_writable({ok: "output_dir", tmp_path / "new" / "deeper": "output_dir"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"] and not any(ok.iterdir())  # nothing left behind

    (tmp_path / "file").write_text("x")
    with pytest.raises(T.WriteError, match=rf"cannot write {tmp_path / 'file' / 'ckpt'}: {tmp_path / 'file'} is not "
                                           "a folder; remove it or choose another output_dir"):
        T.check_writable({ok: "output_dir", tmp_path / "file" / "ckpt": "output_dir"})
    ro = make_unwritable(tmp_path / "ro", monkeypatch)
    with pytest.raises(T.WriteError, match=rf"cannot write {ro}: Permission denied; make {ro} writable for this "
                                           r"user or choose another data\.latents$") as e:
        T.check_writable({ok: "output_dir", ro: "data.latents"})
    assert e.value.errno == 13
    with pytest.raises(T.WriteError, match=rf"cannot write {ro / 'samples'} \(it will be made in {ro}\)"):
        T.check_writable({ro / "samples": "output_dir"})
