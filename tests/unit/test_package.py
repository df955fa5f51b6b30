"""One installed package, ``imageq``: nothing else at the top of site-packages (a
``tasks`` package would shadow, or be shadowed by, the tasks.py of most Celery projects),
and every module of every part inside it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("api_client", "workers", "tasks", "gateway")


def test_the_wheel_installs_only_imageq(tmp_path: Path) -> None:
    # setuptools builds in ROOT/build/lib: a module deleted since an earlier build
    # must not linger in the wheel.
    shutil.rmtree(ROOT / "build" / "lib", ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run(
        [*pip, "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("imageq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"imageq"}
    # Every module of every part, and the files they read at run time.
    for part in PARTS:
        for source in (ROOT / part).rglob("*.py"):
            assert f"imageq/{source.relative_to(ROOT).as_posix()}" in names, source
    for lua in (ROOT / "api_client" / "lua").glob("*.lua"):
        assert f"imageq/api_client/lua/{lua.name}" in names
    assert any(n.startswith("imageq/workers/testing/assets/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "imageq = imageq.api_client.cli:main" in text


def test_every_part_is_linked_into_the_package_folder() -> None:
    for part in PARTS:
        link = ROOT / "imageq" / part
        assert link.is_symlink() and link.resolve() == (ROOT / part).resolve(), part


def test_no_module_is_imported_by_its_folder_name() -> None:
    """``import workers...`` would load a second copy of a module next to
    ``imageq.workers...``, with its own globals: always the package's name."""
    bare = re.compile(r"^\s*(?:from|import)\s+(?:api_client|workers|tasks|gateway)\b", re.M)
    found = [
        str(path.relative_to(ROOT))
        for folder in (*PARTS, "imageq", "tests", "bench", "scripts")
        for path in (ROOT / folder).rglob("*.py")
        if "node_modules" not in path.parts and bare.search(path.read_text())
    ]
    assert found == []
