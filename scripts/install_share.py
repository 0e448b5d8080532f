"""Make a Python environment look like a colcon install space for this package.

`pip install -e .` (the PyPI venv) does not install setup.py's ``data_files``, so
``share/ros2_posenet/{launch,config}``, ``package.xml`` and the ament index marker were
missing there and ``get_package_share_directory("ros2_posenet")`` failed. This links each
data file into ``PREFIX`` (symlinks: edits in the checkout show through) and adds a ``.pth``
hook that appends ``sys.prefix`` to ``AMENT_PREFIX_PATH``, as sourcing an install space does.

    python scripts/install_share.py .venv
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PTH_NAME = "ros2_posenet_ament_prefix.pth"
# One line: .pth files run lines that start with "import" at interpreter start-up.
PTH_LINE = (
    "import os, sys; _p = [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]; "
    "sys.prefix in _p or os.environ.__setitem__('AMENT_PREFIX_PATH', os.pathsep.join(_p + [sys.prefix]))\n"
)


def data_files() -> list[tuple[str, list[str]]]:
    """setup.py's data_files, read by setuptools itself (no copy of the list here)."""
    from distutils.core import run_setup  # setuptools' distutils: the same reading colcon does

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run_setup("setup.py", stop_after="init").data_files
    finally:
        os.chdir(cwd)


def link_data_files(prefix: Path) -> list[Path]:
    """Symlink every data file under ``prefix``; returns the links (stale links of this package are replaced)."""
    links = []
    for destination, sources in data_files():
        directory = prefix / destination
        directory.mkdir(parents=True, exist_ok=True)
        for source in sources:
            link = directory / Path(source).name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(ROOT / source)
            links.append(link)
    return links


def install_ament_prefix_hook(site_packages: Path) -> Path:
    path = site_packages / PTH_NAME
    path.write_text(PTH_LINE)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", type=Path, help="the environment (e.g. .venv)")
    args = parser.parse_args(argv)
    prefix = args.prefix.resolve()
    links = link_data_files(prefix)
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    install_ament_prefix_hook(site_packages)
    print(f"[setup] {len(links)} data files linked under {prefix}/share; AMENT_PREFIX_PATH includes it in this environment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
