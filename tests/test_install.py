"""What `pip install` of this repository asks for, read from the metadata setuptools builds for
the wheel (offline, no build isolation: the setuptools in this environment)."""
import email
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def wheel_metadata(source: Path, out: Path) -> email.message.Message:
    """The METADATA file of the wheel that ``pip install source`` would build."""
    out.mkdir()
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=source, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    dist_info = done.stdout.strip().splitlines()[-1]
    return email.message_from_string((out / dist_info / "METADATA").read_text())


def metadata_of(pyproject: str, tmp_path: Path) -> email.message.Message:
    """Metadata for ``pyproject`` (its text) beside this repository's setup.py and README.md; the
    packages themselves do not change the metadata and are left out, so that the build is fast."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "pyproject.toml").write_text(pyproject)
    for name in ("setup.py", "README.md"):
        (source / name).write_text((ROOT / name).read_text())
    return wheel_metadata(source, tmp_path / "metadata")


def requirements(metadata: email.message.Message) -> dict[str | None, list[str]]:
    """Requires-Dist by extra (None: what a plain install pulls), each without its extra marker."""
    by_extra: dict[str | None, list[str]] = {}
    for requirement in metadata.get_all("Requires-Dist") or []:
        match = re.search(r"""extra == ['"]([^'"]+)['"]""", requirement)
        extra = match.group(1) if match else None
        plain = re.sub(r"""\s*(and\s+)?extra == ['"][^'"]+['"]""", "", requirement).rstrip(" ;")
        by_extra.setdefault(extra, []).append(plain.replace("(", "").replace(")", ""))
    return by_extra


def makefile_value(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no {name}"
    return match.group(1)


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return metadata_of((ROOT / "pyproject.toml").read_text(), tmp_path_factory.mktemp("install"))


def test_a_plain_install_does_not_pull_triton(metadata):
    # torch's CUDA wheels depend on the matching triton; on a CPU machine a plain install must not
    # pull triton (3.9.0, about 1 GB, whose interpreter rejects some of the kernels' masks).
    plain = requirements(metadata)[None]
    assert not [r for r in plain if r.lower().startswith("triton")], plain
    assert {re.split(r"[<>=!~; ]", r)[0] for r in plain} == {"torch", "numpy", "safetensors"}


def test_triton_is_an_extra_pinned_as_the_makefile_pins_it(metadata):
    by_extra = requirements(metadata)
    with_triton = {extra: [r for r in reqs if r.lower().startswith("triton")] for extra, reqs in by_extra.items()}
    with_triton = {extra: reqs for extra, reqs in with_triton.items() if reqs}
    assert list(with_triton) == ["interpret"], with_triton
    pin = makefile_value("TRITON_SPEC")
    assert pin == "triton==3.8.0"
    assert [r.split(";")[0].replace(" ", "") for r in with_triton["interpret"]] == [pin]


def test_the_license_is_an_spdx_expression(metadata):
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["License"] is None  # the deprecated free-text field of a TOML-table license


def test_extras_cover_what_the_subpackages_import(metadata):
    assert {"interpret", "data", "vlm", "train", "eval", "dev"} <= set(metadata.get_all("Provides-Extra"))
    by_extra = requirements(metadata)
    names = {extra: {re.split(r"[<>=!~;\[ ]", r)[0].lower() for r in reqs} for extra, reqs in by_extra.items()}
    assert {"tqdm", "monai"} <= names["train"]  # the segmentation trainer's progress bar
    assert {"nibabel", "pydicom"} <= names["data"]
    itself = [r for r in by_extra["dev"] if r.startswith("dcformer-kernels[")]
    assert len(itself) == 1 and set(itself[0][len("dcformer-kernels["):-1].split(",")) == {
        "data", "vlm", "train", "eval"}, by_extra["dev"]  # dev (make test) installs every extra it tests
