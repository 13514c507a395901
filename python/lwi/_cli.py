"""The `lwi` console command of the wheel: runs the native `lwi` (lwi/bin/lwi) with this package's liblwi.so, the
same flags and exit codes as a built `lwi`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def main() -> None:
    exe = PACKAGE_DIR / "bin" / "lwi"
    if not exe.is_file():
        sys.exit(f"lwi: {exe} is missing (is the wheel installed whole?)")
    os.environ.setdefault("LWI_PLUGIN", str(PACKAGE_DIR / "lib" / "liblwi.so"))
    os.execv(str(exe), [str(exe), *sys.argv[1:]])


if __name__ == "__main__":
    main()
