"""pyproject.toml's version ranges admit the versions installed here, which are the ones the suite tests; the
packages import without the training engine."""
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]


def test_installed_versions_are_within_the_tested_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    outside = {str(r): version(r.name) for r in requirements if not r.specifier.contains(version(r.name), True)}
    assert not outside, (f"installed outside pyproject.toml's ranges: {outside}; once the rest of the suite passes "
                         "with them, widen the ranges to admit them")


@pytest.mark.subprocess
def test_importing_the_packages_leaves_the_training_engine_unloaded():
    """A timm user's `import vit3` (and `import dit3`) loads no checkpoint, run-folder, lock or signal code, and
    no accelerate: the error classes the model and weight code raise live in vit3.errors. A fresh interpreter,
    as this one has imported the engine already."""
    code = ("import sys, vit3\n"
            "print(sorted(m for m in sys.modules if m.startswith('vit3.engine') or m == 'accelerate'))\n"
            "import dit3\nprint(sorted(m for m in sys.modules if m.startswith('vit3.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


def test_the_engine_raises_the_same_error_classes():
    from vit3 import engine, errors

    assert (engine.ConfigError, engine.DataError, engine.WriteError, engine.TrainingDiverged) == (
        errors.ConfigError, errors.DataError, errors.WriteError, errors.TrainingDiverged)


def test_no_test_only_api_in_the_packages():
    """What only the tests called lives in the tests: a DDPMScheduler factory beside dit3.sampling.make_scheduler,
    a bare Inception getter beside evaluation.feature_extractor, a DDPM shorthand of sample(sampler="ddpm")."""
    from dit3 import diffusion, evaluation, sampling

    assert not hasattr(diffusion, "ddpm_scheduler") and not hasattr(evaluation, "inception")
    assert not hasattr(sampling, "sample_ddpm")
