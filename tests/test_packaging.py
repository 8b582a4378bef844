"""What the installation says about itself: its version, and why the native module is missing."""
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import pyrnn


def installed_version():
    try:
        return importlib.metadata.version("pyrnn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyrnn runs from a source tree that was never installed")


def test_version_agrees_with_the_package_metadata():
    version = installed_version()
    out = subprocess.run([sys.executable, "-m", "pyrnn", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == f"pyrnn {version}" == f"pyrnn {pyrnn.__version__}"


def test_the_tests_import_the_installed_package():
    """What the suite checks is the installation (CI: the released wheel), never a source tree."""
    installed_version()
    installed = pathlib.Path(importlib.metadata.distribution("pyrnn").locate_file("pyrnn")).resolve()
    assert pathlib.Path(pyrnn.__file__).resolve().parent == installed


def test_an_installation_without_the_native_module_says_why_and_how_to_get_it(tmp_path):
    """What CMakeLists.txt leaves when it builds no native module: pyrnn/_native_missing.txt."""
    installed_version()
    shutil.copytree(os.path.dirname(pyrnn.__file__), tmp_path / "pyrnn",
                    ignore=shutil.ignore_patterns("_cpp*", "__pycache__"))
    (tmp_path / "pyrnn" / "_native_missing.txt").write_text("it was installed with PYRNN_NATIVE=OFF\n")
    environment = dict(os.environ)
    environment.pop("PYRNN_BACKEND", None)
    out = subprocess.run([sys.executable, "-m", "pyrnn", "backends"], capture_output=True, text=True,
                         cwd=tmp_path, env=environment, check=True).stdout
    cpp = next(line for line in out.splitlines() if line.startswith("cpp"))
    assert "unavailable: pyrnn was built without the native module pyrnn._cpp" in cpp
    assert "(it was installed with PYRNN_NATIVE=OFF)" in cpp
    assert "install a C++17 compiler" in cpp and "pip install" in cpp
    assert out.splitlines()[0].split() == ["numba", "available"]
