"""Compile on a machine without a GPU the Triton kernels that a GPU session compiles, into a Triton cache it carries.

A cold GPU machine spends most of a short session compiling: the CUDA tests took 181–198 s of 15 minutes, nearly all
of it Triton compiling their kernel variants (docs/triton.md, "The next GPU session"). Triton keys its on-disk cache
by its own build (a hash of its sources and of libtriton.so), the kernel's source and specialisation, ptxas's
version, the target and the options; a cubin compiled here for sm_90 by the same Triton is the cubin the GPU would
compile. ``build`` runs the work under a faked sm_90 GPU (tests/triton_fake_driver.py) with Triton's real compiler,
each kernel launch run a second time in Triton's interpreter (a second copy of the kernels' module) so that the tests
compute what they check and go on to their next launches, and keys the cache as the GPU machines' Triton does: their
Python is 3.12 and their triton 3.6.0 the PyPI wheel (``--wheel``), whose libtriton.so is another build than this
machine's (the same sources: the same cubins). ``install`` on the GPU machine says whether its Triton is that
identity and puts the cache in place; ``misses`` counts afterwards what Triton compiled there all the same.

    bash benchmarks/triton_prime.sh        # the whole build as a GPU session needs it: side folders, wheel, snapshot
    env -u TRITON_INTERPRET PYTHONPATH=<numpy 2.3, pytest-xdist>:src:<triton 3.6.0> python3 benchmarks/triton_prime.py \
        build --wheel triton-3.6.0-cp312-....whl --out CACHE --archive .prime/cache.tar.xz \
        --tests tests/test_backend_triton.py tests/test_triton_kernels.py --fuzz 0 60 --warm -- <triton_warm.py's>
    # on the GPU machine, before the runs (gpu_check.sh does both when given PRIMED=.prime/cache.tar.xz):
    python3 benchmarks/triton_prime.py install .prime/cache.tar.xz --to ~/.triton/cache
    python3 benchmarks/triton_prime.py misses --to ~/.triton/cache

Under the fake GPU the tests' tensors stay on the CPU and their kernels run in the interpreter (bfloat16 tensors
as float32 copies: its bfloat16 arithmetic is wrong). Tests that check what only a GPU has fail here, their outcome
is not the point; a test that stops at a failed check leaves its later kernels to the GPU. Nothing here runs on or
measures a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "prime-manifest.json"
IDENTITY_ENV = "SASOFTMAX_PRIME_IDENTITY"
"""Set by ``build`` for the processes it starts (pytest and its workers): the Triton identity to key the cache by."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_identity() -> dict:
    """This process's Triton: its version, cache key of the build (``triton_key``), libtriton.so's hash, ptxas's
    version for sm_90 and the environment variables that change compiled code."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.cache import triton_key

    lib = Path(triton.__file__).parent / "_C" / "libtriton.so"
    return {
        "triton": triton.__version__,
        "triton_key": _sha256(triton_key().encode()),
        "libtriton": _sha256(lib.read_bytes()),
        "ptxas": get_ptxas_version(90).strip().splitlines()[-1],
        "env": get_cache_invalidating_env_vars(),
    }


def wheel_key(wheel: Path) -> tuple[str, str]:
    """(``triton_key()`` as the Triton installed from ``wheel`` computes it, that wheel's libtriton.so hash).

    ``triton_key`` hashes Triton's Python sources and libtriton.so: the sources must be this installation's byte for
    byte (checked), the library's hash is the wheel's."""
    import triton
    from triton.runtime.cache import triton_key

    here = Path(triton.__file__).parent
    with zipfile.ZipFile(wheel) as archive:
        theirs = _sha256(archive.read("triton/_C/libtriton.so"))
        for name in archive.namelist():
            if name.startswith("triton/") and name.endswith(".py"):
                local = here / name.removeprefix("triton/")
                if not local.is_file() or local.read_bytes() != archive.read(name):
                    raise SystemExit(f"{wheel.name}: {name} differs from this triton's ({here}): another version")
    ours = _sha256((here / "_C" / "libtriton.so").read_bytes())
    key = triton_key()
    if ours not in key:
        raise SystemExit("triton_key() does not hold libtriton.so's hash: another Triton than this script knows")
    return key.replace(ours, theirs), theirs


class InterpretedTwin:
    """The kernels' module loaded a second time with Triton's interpreter on: its kernels run on CPU tensors."""

    def __init__(self) -> None:
        import triton

        from sasoftmax.backends import triton_kernels

        triton.knobs.runtime.interpret = True
        try:
            path = triton_kernels.__file__
            spec = importlib.util.spec_from_file_location("sasoftmax_prime_interpreted_kernels", path)
            self.module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self.module)
        finally:
            os.environ.pop("TRITON_INTERPRET", None)  # (where the knob keeps its value: unset is off)
        # triton.language's own jitted functions (tl.zeros, tl.sum, its combine functions...) were made JIT
        # functions when it was imported; the interpreter calls them as Python, so they are swapped for interpreted
        # ones while a twin runs.
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        modules = {m for m in vars(triton.language).values() if isinstance(m, type(triton))} | {triton.language}
        self.swaps = [(module, name, value, InterpretedFunction(value.fn))
                      for module in modules if module.__name__.startswith("triton.language")
                      for name, value in vars(module).items() if isinstance(value, JITFunction)]  # fmt: skip

    @staticmethod
    def _language_state() -> list[tuple[object, dict]]:
        """triton.language's modules and classes with their attributes: the interpreter patches them (its nested
        calls without undoing it), and the compiler must find them as they were."""
        owners = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m is not None]
        owners += [c for m in owners[:] for c in vars(m).values() if isinstance(c, type)
                   and c.__module__.startswith("triton.language")]  # fmt: skip
        return [(owner, dict(vars(owner))) for owner in dict.fromkeys(owners)]

    def launch(self, name: str, grid, cfg, args: tuple, kwargs: dict) -> None:
        import torch

        # The interpreter's bfloat16 arithmetic is wrong: bfloat16 tensors go in as float32 ones with their strides
        # (the kernel then rounds nothing until the copy back), so that bfloat16 tests check a result near theirs
        # and go on to their backward.
        wide = {i: torch.empty_strided(a.shape, a.stride(), dtype=torch.float32).copy_(a)
                for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16}  # fmt: skip
        saved = self._language_state()
        for module, attr, _, interpreted in self.swaps:
            setattr(module, attr, interpreted)
        try:
            getattr(self.module, name)[grid](*(wide.get(i, a) for i, a in enumerate(args)), **kwargs, **cfg.launch())
            for i, a in wide.items():  # (only what the kernel wrote: an input's copy would bump its version)
                if not torch.allclose(args[i].float(), a, rtol=0, atol=0, equal_nan=True):
                    args[i].copy_(a)
        finally:
            for owner, attrs in saved:  # (names it added stay: its rewritten functions' globals hold them)
                now = vars(owner)
                for attr, value in attrs.items():
                    if now.get(attr, attrs) is not value:
                        setattr(owner, attr, value)


def activate(identity_key: str, interpret: bool = True) -> None:
    """From here on in this process: Triton keys its cache by ``identity_key``, drives a faked sm_90 GPU and compiles
    for it for real (the compiled kernels are never loaded); ``torch.cuda.is_available()`` says True (so that the
    tests take their CUDA cases) while tensors stay on the CPU; the Triton backend takes its GPU paths and, with
    ``interpret``, runs each launch in the interpreter after compiling it (without, the kernels' outputs are left
    as allocated: for benchmarks, whose numbers mean nothing here)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("triton_prime.py: unset TRITON_INTERPRET (the kernels must be JIT functions)")
    import torch
    import triton.runtime.cache as cache
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    sys.path.insert(0, str(ROOT / "tests"))
    from sasoftmax.backends import triton as backend
    from triton_fake_driver import FakeDriver, FakeKernel

    cache.triton_key = lambda: identity_key
    torch.cuda.is_available = lambda: True
    driver.set_active(FakeDriver())
    compile_for_real = JITFunction._do_compile

    def compile_then_fake(self, key, signature, device, constexprs, options, attrs, warmup):
        compile_for_real(self, key, signature, device, constexprs, options, attrs, warmup)  # into the cache
        kernel = FakeKernel(key, None)
        self.device_caches[device][0][key] = kernel
        return kernel

    JITFunction._do_compile = compile_then_fake
    backend.INTERPRET, backend.unsupported = False, lambda call: None
    if not interpret:
        return
    twin, launch = InterpretedTwin(), backend._launch

    def launch_then_interpret(name, grid, cfg, *args, **kwargs):
        launch(name, grid, cfg, *args, **kwargs)
        twin.launch(name, grid, cfg, args, kwargs)

    backend._launch = launch_then_interpret


def devices_on_cpu() -> None:
    """The DEVICE of every loaded module under tests/ that says "cuda" (test modules, the fuzz): "cuda" to them and
    the CPU to torch (``CudaOnCpu``), so that they take their CUDA cases with tensors on the CPU."""
    tests = str(ROOT / "tests")
    for module in list(sys.modules.values()):
        if str(getattr(module, "__file__", None) or "").startswith(tests) and getattr(module, "DEVICE", None) == "cuda":
            module.DEVICE = CudaOnCpu("cpu")


def pytest_collection_modifyitems(session, config, items) -> None:
    """(As a pytest plugin, activated:) ``devices_on_cpu`` once the test modules are imported."""
    if os.environ.get(IDENTITY_ENV):
        devices_on_cpu()


if os.environ.get(IDENTITY_ENV) and __name__ != "__main__":
    # Imported as a pytest plugin (``-p triton_prime``, by ``build``) in pytest and in each of its workers: before
    # tests/conftest.py, which would switch the interpreter on where torch sees no GPU.
    activate(os.environ[IDENTITY_ENV])


def entries(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.iterdir() if p.is_dir()} if cache_dir.is_dir() else set()


def build(args: argparse.Namespace) -> int:
    import subprocess

    sys.path.insert(0, str(ROOT / "tests"))
    from triton_compile_cuda import unavailable

    reason = unavailable()  # (TRITON_INTERPRET set, no NVIDIA backend in this triton, no ptxas)
    if reason:
        raise SystemExit(f"triton_prime.py: cannot fake a GPU here: {reason}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    key, libtriton = wheel_key(Path(args.wheel)) if args.wheel else (None, None)
    identity = local_identity()
    if key:
        identity.update(triton_key=_sha256(key.encode()), libtriton=libtriton)
    env = {**os.environ, "TRITON_CACHE_DIR": str(out), IDENTITY_ENV: key or local_triton_key()}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)
    start, before = time.time(), entries(out)
    if args.tests:
        workers = ["-n", str(args.workers)] if args.workers > 1 and importlib.util.find_spec("xdist") else []
        workers += ["-k", args.select] if args.select else []
        command = [sys.executable, "-m", "pytest", "-p", "triton_prime", "-p", "no:cacheprovider", "--tb=no",
                   "-W", "ignore", *workers, *args.tests]  # fmt: skip
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, env=env, check=False)
    if args.fuzz:  # the seeds shared between the workers' processes
        import gpu_common

        first, count = args.fuzz
        shares = [(first + i * count // args.workers, (i + 1) * count // args.workers - i * count // args.workers)
                  for i in range(args.workers)]  # fmt: skip
        fuzz = [[sys.executable, str(Path(__file__).resolve()), "exec", "--interpret",
                 str(ROOT / "tests" / "fuzz_backends.py"), "--backend", "triton", "--seeds", str(start), str(n),
                 "--extended", "--bfloat16"] for start, n in shares if n]  # fmt: skip
        print(f"the fuzz's seeds {first}–{first + count - 1} in {len(fuzz)} processes", flush=True)
        gpu_common.run_processes(fuzz, args.workers, env=env)
    if args.warm:
        warm(args.warm, env, args.workers)
    made = entries(out) - before
    manifest = {"identity": identity, "entries": sorted(entries(out)), "built": time.strftime("%Y-%m-%d %H:%M UTC",
                time.gmtime()), "commit": os.environ.get("SASOFTMAX_COMMIT")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"{len(made)} kernels compiled into {out} in {time.time() - start:.0f} s ({len(manifest['entries'])} in all)")
    if args.archive:
        pack(out, Path(args.archive))
    return 0


def warm(argv: list[str], env: dict, workers: int) -> None:
    """benchmarks/triton_warm.py's kernel-benchmark runs (``argv`` as gpu_check.sh gives it) on CPU tensors under
    the faked GPU, each in a process of its own (``exec``), the kernels compiled and not run."""
    import tempfile

    import gpu_common
    import triton_warm

    with tempfile.TemporaryDirectory(prefix="triton-prime-") as out:
        _, todo = triton_warm.plan(list(argv), out)
        commands = []
        for command in todo:
            if Path(command[1]).name != "triton_attention.py":  # (training and host rows need a GPU's tensors)
                print(f"not primed: {' '.join(command[1:3])} …", flush=True)
                continue
            words = list(command[1:])
            words[words.index("--device") + 1] = "cpu"
            commands.append([sys.executable, str(Path(__file__).resolve()), "exec", *words])
        print(f"{len(commands)} benchmark runs under the faked GPU, {workers} at a time", flush=True)
        codes = gpu_common.run_processes(commands, workers, env=env)
        print(f"{sum(map(bool, codes))} of them failed", flush=True)


class CudaOnCpu(str):
    """"cpu" to torch, equal to "cuda" to a script that asks: its CUDA cases with tensors on the CPU."""

    def __eq__(self, other: object) -> bool:
        return other == "cuda" or str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = str.__hash__


def execute(args: argparse.Namespace) -> int:
    """Run a script's ``main`` under the faked GPU (``activate``), its DEVICE, if one of tests/, ``devices_on_cpu``."""
    activate(os.environ.get(IDENTITY_ENV) or local_triton_key(), interpret=args.interpret)
    path = Path(args.script).resolve()
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    devices_on_cpu()
    return module.main(args.args)


def local_triton_key() -> str:
    from triton.runtime.cache import triton_key

    return triton_key()


KEPT = (".json", ".cubin")
"""What a cache entry needs to be found and loaded (its metadata, group file and binary; not its IR)."""


def pack(cache_dir: Path, archive: Path) -> None:
    """The cache's entries, each its metadata and cubin only, as an xz tarball (paths relative to the cache)."""
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(cache_dir / MANIFEST, arcname=MANIFEST)
        for entry in sorted(entries(cache_dir)):
            for path in sorted((cache_dir / entry).iterdir()):
                if path.suffix in KEPT:
                    tar.add(path, arcname=f"{entry}/{path.name}")
    print(f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB")


def install(args: argparse.Namespace) -> int:
    """Unpack the archive into the cache folder, pointing each group file at where its files now are."""
    target = Path(args.to).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.archive, "r:xz") as tar:
        manifest = json.load(tar.extractfile(MANIFEST))
        theirs, ours = manifest["identity"], local_identity()
        same = {name: theirs.get(name) == ours.get(name) for name in ("triton", "triton_key", "ptxas", "env")}
        print(json.dumps({"primed": manifest.get("commit"), "entries": len(manifest["entries"]), "same": same,
                          "here": ours, "primed_for": theirs}))
        if not all(same.values()):  # (not an error: Triton compiles as it would without)
            print("triton_prime.py: this Triton is not the one the cache was built for: nothing installed")
            return 0
        for member in tar.getmembers():
            if member.name == MANIFEST or not member.isfile():
                continue
            data = tar.extractfile(member).read()
            entry, name = member.name.split("/")
            if name.startswith("__grp__"):
                group = json.loads(data)
                group["child_paths"] = {child: str(target / entry / child) for child in group["child_paths"]
                                        if Path(child).suffix in KEPT}
                data = json.dumps(group).encode()
            (target / entry).mkdir(exist_ok=True)
            (target / entry / name).write_bytes(data)
    (target / MANIFEST).write_text(json.dumps(manifest))
    print(f"installed {len(manifest['entries'])} compiled kernels into {target}")
    return 0


def misses(args: argparse.Namespace) -> int:
    """How many kernels Triton compiled into the cache folder besides those installed (entries with a cubin; the
    others are the C launchers and driver utilities it builds with the host's compiler, which are not primed)."""
    target = Path(args.to).expanduser().resolve()
    manifest = json.loads((target / MANIFEST).read_text()) if (target / MANIFEST).is_file() else {"entries": []}
    new = entries(target) - set(manifest["entries"])
    kernels = {entry for entry in new if any((target / entry).glob("*.cubin"))}
    print(json.dumps({"installed": len(manifest["entries"]), "compiled_here": len(kernels),
                      "built_here": len(new - kernels)}))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="compile into a cache folder (no GPU)")
    b.add_argument("--out", required=True, help="the cache folder")
    b.add_argument("--wheel", help="the GPU machines' triton wheel, whose identity keys the cache (default this one)")
    b.add_argument("--tests", nargs="*", help="test files run under the fake GPU")
    b.add_argument("--select", help="only the tests pytest's -k selects")
    b.add_argument("--fuzz", type=int, nargs=2, metavar=("FIRST", "COUNT"),
                   help="tests/fuzz_backends.py's seeds as gpu_check.sh runs them (--extended --bfloat16)")
    b.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (if installed)")
    b.add_argument("--archive", help="also pack the cache into this .tar.xz")
    b.add_argument("--warm", action="store_true",
                   help="(last: the rest are triton_warm.py's arguments as gpu_check.sh gives them) its kernel-"
                   "benchmark runs")  # fmt: skip
    e = commands.add_parser("exec", help="run a script's main under the faked GPU (used by build)")
    e.add_argument("--interpret", action="store_true", help="run each kernel launch in the interpreter too")
    e.add_argument("script")
    e.add_argument("args", nargs=argparse.REMAINDER)
    i = commands.add_parser("install", help="on the GPU machine: unpack into Triton's cache folder")
    i.add_argument("archive")
    i.add_argument("--to", default=os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"))
    m = commands.add_parser("misses", help="on the GPU machine, after the runs: kernels compiled there")
    m.add_argument("--to", default=os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"))
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--warm") + 1 :] if "--warm" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(rest)])
    args.warm = rest if getattr(args, "warm", False) else []
    return {"build": build, "exec": execute, "install": install, "misses": misses}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
