"""The package as users get it: the sdist and the wheel built from this checkout hold every module
and data file of the three import packages (and nothing of tests/ or bench/); the installed
wheel, imported from outside the checkout, runs the command; and an environment where another
distribution claims one of our import names is refused in one line. The whole installed-package
smoke (generate, validate, train, export, ...) runs in .ci/run."""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.distribution import DISTRIBUTION, IMPORT_NAMES

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def source_files() -> set[str]:
    """The files of the import packages in this checkout (in a git checkout: those git does not ignore)."""
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *IMPORT_NAMES],
                             cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout.strip():
        return set(tracked.stdout.split())
    return {str(p.relative_to(REPO)) for name in IMPORT_NAMES for p in (REPO / name).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """An sdist and the wheel built from it (python -m build), with the build backend installed here."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                   check=True, capture_output=True)
    return {"wheel": next(out.glob("*.whl")), "sdist": next(out.glob("*.tar.gz"))}


def test_wheel_holds_every_module_and_data_file(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    packaged = {n for n in names if n.split("/")[0] in IMPORT_NAMES}
    expected = source_files()
    assert expected - packaged == set(), "missing from the wheel"
    assert packaged - expected == set(), "in the wheel but not in the source tree"
    assert any(n.endswith(".json") for n in packaged)  # schemas/sample.schema.json: data, not only modules
    assert not {n.split("/")[0] for n in names} & {"tests", "bench", "cluster", "docs"}
    assert "mergemix-pipeline = pipeline.__main__:main" in entry_points


def test_sdist_holds_every_module_and_data_file(built):
    with tarfile.open(built["sdist"]) as sdist:
        names = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert source_files() - names == set()
    assert {"pyproject.toml", "README.md"} <= names


def _installed(built, tmp_path) -> tuple[Path, dict]:
    """The wheel unpacked as pip installs it (--target), and an environment whose path puts it
    first; the working directory (tmp_path) is outside the checkout."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(built["wheel"])], check=True, capture_output=True)
    return target, {"PYTHONPATH": str(target), "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}


def test_installed_wheel_runs_from_outside_the_checkout(built, tmp_path):
    target, env = _installed(built, tmp_path)
    where = subprocess.run([sys.executable, "-c", "import pipeline, stages, schemas, stages.training.train; "
                            "print(pipeline.__file__, stages.__file__, schemas.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where
    version = subprocess.run([sys.executable, "-m", "pipeline", "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"{DISTRIBUTION} {built['wheel'].name.split('-')[1]}"
    help_ = subprocess.run([sys.executable, "-m", "pipeline", "train", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "--two-sided" in help_.stdout, help_.stderr


def test_another_distribution_with_one_of_our_import_names_is_refused_in_one_line(tmp_path):
    """A distribution that also installs `stages` (its metadata, as pip writes it) is named at start-up."""
    site = tmp_path / "site"
    info = site / "stages_toolkit-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stages-toolkit\nVersion: 2.0\n")
    (info / "top_level.txt").write_text("stages\n")
    (info / "RECORD").write_text("stages/__init__.py,,\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=tmp_path,
                          env={"PYTHONPATH": f"{site}:{REPO}", "PATH": str(Path(sys.executable).parent)},
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "stages-toolkit" in lines[0] and DISTRIBUTION in lines[0] and "'stages'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_the_cluster_image_installs_what_ci_tests():
    """cluster/Dockerfile starts from the Ray GPU image of the Ray this project runs, and installs the
    project with cluster/install.sh, the script .ci/smoke-installed runs; both cluster manifests run it."""
    import ray
    import yaml

    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    base = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "cluster/install.sh" in next(line for line in dockerfile.splitlines() if line.startswith("RUN "))
    assert 'sh "$repo/cluster/install.sh"' in (REPO / ".ci" / "smoke-installed").read_text()
    launcher = yaml.safe_load((REPO / "cluster" / "cluster.yaml").read_text())
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    images = {launcher["docker"]["image"]}
    images |= {c["image"] for c in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert images == {"your-registry/mergemix-pipeline:latest"}
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
