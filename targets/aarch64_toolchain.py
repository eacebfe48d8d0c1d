"""What the ``arm-neon`` target needs outside Python: the aarch64 cross toolchain, qemu-user,
and the aarch64 TVM runtime libraries (from the registry's aarch64 wheels, cached).

Cache folder: ``$QCOMPILER_CACHE`` or ``~/.cache/qcompiler``. ``qcompile --setup arm-neon``
(:func:`setup`) installs the system packages and fills it; :func:`runtime_libraries`
fetches the runtime with pip on first use otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from qcompiler.errors import TargetError

CXX = "aarch64-linux-gnu-g++"
OBJDUMP = "aarch64-linux-gnu-objdump"
QEMU = "qemu-aarch64"
#: Sysroot of Debian's libc6-arm64-cross (the guest's dynamic loader and libc).
SYSROOT = "/usr/aarch64-linux-gnu"
PLATFORM = "manylinux_2_28_aarch64"
_WHEEL_LIBS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}
#: Debian packages of the cross toolchain, the emulator and the guest's libc.
PACKAGES = ("qemu-user", "gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "binutils-aarch64-linux-gnu", "libc6-arm64-cross")
SETUP_HINT = "install them with: qcompile --setup arm-neon (apt-get install " + " ".join(PACKAGES) + ")"


def cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILER_CACHE") or Path.home() / ".cache" / "qcompiler")


def missing_tools(run: bool = True) -> list[str]:
    """Executables (and the sysroot) not present; ``run`` adds what running needs."""
    missing = [tool for tool in (CXX, OBJDUMP) if shutil.which(tool) is None]
    if run:
        if shutil.which(QEMU) is None:
            missing.append(QEMU)
        if not Path(SYSROOT, "lib").is_dir():
            missing.append(f"{SYSROOT} (libc6-arm64-cross)")
    return missing


def require_tools(run: bool = False) -> None:
    missing = missing_tools(run)
    if missing:
        raise TargetError(f"arm-neon needs {', '.join(missing)}; {SETUP_HINT}")


def _versions() -> dict[str, str]:
    return {dist: metadata.version(dist) for dist in _WHEEL_LIBS}


def runtime_dir() -> Path:
    tag = "-".join(f"{d}{v}" for d, v in sorted(_versions().items()))
    return cache_dir() / "aarch64-runtime" / tag


def runtime_libraries(fetch: bool = True) -> Path:
    """Folder holding the aarch64 ``libtvm_runtime.so`` and ``libtvm_ffi.so`` matching the installed TVM."""
    folder = runtime_dir() / "lib"
    wanted = [folder / Path(member).name for member in _WHEEL_LIBS.values()]
    if all(p.is_file() for p in wanted):
        return folder
    if not fetch:
        raise TargetError(f"the aarch64 TVM runtime libraries are not in {folder}; run qcompile --setup arm-neon")
    _fetch(folder)
    return folder


def _fetch(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pins = [f"{d}=={v}" for d, v in sorted(_versions().items())]
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--platform", PLATFORM, "--python-version", "3.11", "--dest", tmp, *pins,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise TargetError(f"could not fetch the aarch64 TVM runtime wheels ({' '.join(pins)}): {done.stderr.strip()[-300:]}")
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for member in _WHEEL_LIBS.values():
                    if member in archive.namelist():
                        part = folder / (Path(member).name + ".part")
                        part.write_bytes(archive.read(member))
                        part.replace(folder / Path(member).name)


def setup(log=print) -> None:
    """Install what arm-neon needs: the Debian packages (apt-get, through sudo when not
    root) and the aarch64 TVM runtime libraries; checks the result."""
    if missing_tools(run=True):
        apt = shutil.which("apt-get")
        if apt is None:
            raise TargetError(f"arm-neon needs {', '.join(missing_tools(run=True))}; this system has no apt-get: "
                              f"install the equivalents of {' '.join(PACKAGES)}")
        prefix = [] if os.geteuid() == 0 else (["sudo"] if shutil.which("sudo") else None)
        if prefix is None:
            raise TargetError(f"installing {' '.join(PACKAGES)} needs root (no sudo here)")
        log(f"arm-neon: installing {' '.join(PACKAGES)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in ([*prefix, apt, "update", "-qq"], [*prefix, apt, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise TargetError(f"{' '.join(cmd[:3])} failed: {done.stderr.strip()[-300:]}")
    folder = runtime_libraries(fetch=True)
    require_tools(run=True)
    log(f"arm-neon: ready (cross toolchain, qemu-aarch64, aarch64 TVM runtime in {folder})")


def ffi_include_dir() -> Path:
    """C++ headers of tvm-ffi (architecture independent), from the installed Python package."""
    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or spec.origin is None:
        raise TargetError("the tvm_ffi package is not installed")
    return Path(spec.origin).parent / "include"


RUNNER_SOURCE = Path(__file__).with_name("native") / "vm_runner.cc"


def native_runner() -> Path:
    """The aarch64 runner binary, compiled once per source/TVM version and cached."""
    libs = runtime_libraries()
    source = RUNNER_SOURCE.read_bytes()
    key = hashlib.sha256(source + repr(sorted(_versions().items())).encode()).hexdigest()[:16]
    binary = runtime_dir() / f"vm_runner-{key}"
    if binary.is_file():
        return binary
    include = ffi_include_dir()
    tmp = binary.with_suffix(".part")
    cmd = [
        CXX, "-std=c++17", "-O2", "-o", str(tmp), str(RUNNER_SOURCE), f"-I{include}", f"-I{include / 'dlpack'}",
        f"-L{libs}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise TargetError(f"compiling the aarch64 runner failed: {done.stderr.strip()[-500:]}")
    tmp.replace(binary)
    return binary


def count_instructions(library: Path, mnemonics: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Per-function counts of ``mnemonics`` in the disassembly of an aarch64 shared library."""
    done = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True)
    counts: dict[str, dict[str, int]] = {}
    function = None
    for line in done.stdout.splitlines():
        if line.endswith(">:") and "<" in line:
            function = line[line.index("<") + 1 : -2]
            continue
        parts = line.split("\t")
        if function and len(parts) >= 2:
            mnemonic = parts[1].strip().split(" ")[0]
            if mnemonic in mnemonics:
                per = counts.setdefault(function, {})
                per[mnemonic] = per.get(mnemonic, 0) + 1
    return counts


def kernel_functions(library: Path) -> list[str]:
    """Names of the compute kernels TVM generated (``<name>_compute_``)."""
    done = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True)
    names = []
    for line in done.stdout.splitlines():
        if line.endswith("_compute_>:"):
            names.append(line[line.index("<") + 1 : -2])
    return names
