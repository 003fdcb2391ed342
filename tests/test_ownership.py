"""OUT belongs to one run, and only our own names are ours: foreign files survive a run, a
resume and --overwrite; a foreign run.json is refused; validate catches a unit of another
run; train refuses an unfinished output unless told to take a fixed set of its units."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import GenerateConfig
from pipeline.run import generate
from stages.errors import UserError
from stages.output.lease import Lease
from stages.readers.validate import validate_output
from stages.storage import LocalStore
from tests.conftest import local_ray, sample_demo

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    yield from local_ray()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return sample_demo(tmp_path_factory, n=9, seed=4)


def cfg(tiny_model_config, demo, out, **kw) -> GenerateConfig:
    return GenerateConfig.build(dict(input=str(demo / "llava.json"), output=str(out), model=str(tiny_model_config),
                                     pretrained="none", merge=16, samples_per_shard=4, batch_size=4,
                                     image_format="png", progress=False, seed=3) | kw)


FOREIGN = {
    "shards/999999.tar": b"somebody's tar",
    "shards/notes.parquet": b"somebody's parquet",
    "shards/000001.txt": b"a note",
    "shards/.hidden": b"x",
    "shards/sub/000000.tar": b"in a subfolder",
    "notes.txt": b"keep me",
    "README.md": b"# my notes, not a dataset card",
    "other/000000_stats.json": b"{}",
}


def plant(out: Path) -> None:
    for name, data in FOREIGN.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)


def assert_planted(out: Path) -> None:
    for name, data in FOREIGN.items():
        assert (out / name).read_bytes() == data, name


def test_foreign_files_survive_run_resume_and_overwrite(tiny_model_config, demo, tmp_path, capsys):
    out = tmp_path / "out"
    plant(out)
    first = generate(cfg(tiny_model_config, demo, out))
    assert first.ok and first.units_written == 3
    assert_planted(out)
    assert "README.md is not a card of ours: left as it is, no dataset card written" in capsys.readouterr().err
    assert validate_output(out) == []  # foreign names are not problems of ours
    (out / "shards" / "000001_stats.json").unlink()  # an interrupted unit: its files are leftovers
    again = generate(cfg(tiny_model_config, demo, out))
    assert again.units_written == 1 and again.units_skipped == 2
    assert_planted(out)
    redone = generate(cfg(tiny_model_config, demo, out, seed=4, overwrite=True))
    assert redone.ok and redone.units_written == 3
    assert_planted(out)
    assert validate_output(out) == []


@pytest.mark.parametrize("name", ["run.json", "index.json"])
def test_a_foreign_run_file_is_refused_even_with_overwrite(tiny_model_config, demo, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text('{"experiment": "mine"}')
    for overwrite in (False, True):
        with pytest.raises(UserError, match=f"{name} was not written by mergemix-pipeline"):
            generate(cfg(tiny_model_config, demo, out, overwrite=overwrite))
    assert (out / name).read_text() == '{"experiment": "mine"}'
    assert not list((out / "shards").glob("*.tar"))


def test_validate_catches_a_unit_of_another_run(tiny_model_config, demo, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(cfg(tiny_model_config, demo, a))
    generate(cfg(tiny_model_config, demo, b, seed=9))
    for suffix in (".tar", ".parquet", "_stats.json"):
        shutil.copy(b / "shards" / f"000001{suffix}", a / "shards" / f"000001{suffix}")
    problems = validate_output(a)
    assert any(p.startswith("shards/000001_stats.json: fingerprint") and "another run" in p for p in problems), problems


def test_the_lease_is_taken_before_anything_is_written(tiny_model_config, demo, tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    lease = Lease(LocalStore(out), "generate").acquire()
    try:
        with pytest.raises(UserError, match="being written by another generate"):
            generate(cfg(tiny_model_config, demo, out))
        assert sorted(p.name for p in (out / "shards").iterdir()) == []
    finally:
        lease.release()


def test_train_refuses_an_unfinished_output_or_takes_a_fixed_set(tiny_model_config, demo, tmp_path):
    out = tmp_path / "out"
    generate(cfg(tiny_model_config, demo, out))
    (out / "run.json").unlink()
    (out / "shards" / "000002_stats.json").unlink()
    runner = CliRunner()
    base = ["train", str(out), "--steps", "2", "--batch-size", "2", "--log-every", "1", "--output"]
    refused = runner.invoke(app, base + [str(tmp_path / "run1")])
    assert refused.exit_code == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert "not a finished generate run" in last and "run.json" in last and "--allow-partial" in last
    partial = runner.invoke(app, base + [str(tmp_path / "run2"), "--allow-partial"])
    assert partial.exit_code == 0, partial.output[-3000:]
    assert "training on 2 committed units (000000, 000001) of an unfinished output" in partial.output
    lease = Lease(LocalStore(out), "generate").acquire()  # a generate still running
    try:
        busy = runner.invoke(app, base + [str(tmp_path / "run3")])
        assert busy.exit_code == 2 and "a generate run is writing it" in busy.stderr
    finally:
        lease.release()
