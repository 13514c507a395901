"""Adds the staged native files (LWI_STAGE: bin/, lib/, include/ of a `cmake --install` prefix plus the
`lwi` command) under lwi/ and tags the wheel as platform-specific but Python-independent: the Python side
is ctypes only, so py3-none-<platform> (auditwheel then names the glibc it needs)."""
import os
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        stage = os.environ.get("LWI_STAGE")
        if not stage or not (Path(stage) / "lib" / "liblwi.so").is_file():
            raise RuntimeError("LWI_STAGE must name a staged prefix holding lib/liblwi.so: build with `make wheel`")
        for part in ("bin", "lib", "include"):
            build_data["force_include"][str(Path(stage) / part)] = f"lwi/{part}"
        build_data["pure_python"] = False
        build_data["tag"] = "py3-none-linux_x86_64"
