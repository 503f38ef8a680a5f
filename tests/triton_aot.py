"""Compile every Triton kernel variant that the Triton tests launch, as a GPU would, for sm_90 - no GPU needed.

The Triton tests run under TRITON_INTERPRET=1 on CPU tensors, which never runs Triton's GPU code
generation. And the launchers plan differently there (bigger tiles, other radix widths: BLOCK=65536
where a GPU takes 1024), so the interpreted launches are not the variants a GPU compiles. Hence:

1. Record, in the interpreter run: with ``UDAFAST_TRITON_AOT=<file>`` set in the environment of
   ``TRITON_INTERPRET=1 python -m pytest -q -m triton``, tests/conftest.py registers a `Recorder`. It
   records every call of a ``udafast_triton::`` custom op (the Triton launchers) that returns
   normally - the op and its arguments (tensors as shape, stride, offset and dtype) - and counts the
   interpreted launches of each kernel (``InterpretedFunction.run``). <file> is written at the end.

2. Replay and compile: ``python tests/triton_aot.py <file>...`` (no TRITON_INTERPRET, so the
   launchers plan for a GPU) calls each recorded op's launcher on fake CUDA tensors (FakeTensorMode;
   nothing runs, no data) with ``JITFunction.run`` replaced: each launch is specialised exactly as
   Triton's launcher would on a CUDA device (its generated binder and ``_pack_args``: pointer element
   types, i32/i64/fp32/u1 scalars, ints equal to 1 and None as constexprs, tt.divisibility=16 from
   16-byte alignment, the constexprs and num_warps/num_stages). Each unique variant is compiled with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` through PTX to a cubin by
   Triton's bundled ptxas, in a fresh cache. It prints OK/FAIL per variant with registers, spills and
   shared memory, and exits 1 if a variant fails, needs more than sm_90's 227 KiB of shared memory,
   a replay raises, a kernel launched under the interpreter is never launched by the replay, or
   nothing was recorded.
"""
import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
import traceback

NAMESPACE = "udafast_triton"  # the custom ops of the Triton launchers (kernels/*.py)
PACKAGE = "udafast.kernels"   # importing it registers them
ARCH = 90
SM90_MAX_SHARED = 232448      # bytes of shared memory one block may use on sm_90 (227 KiB)


def _launchers():
    """{qualname: CustomOpDef} of the Triton launchers."""
    importlib.import_module(PACKAGE)
    from torch._library.custom_ops import OPDEFS
    return {name: op for name, op in list(OPDEFS.items()) if name.startswith(NAMESPACE + "::")}


def _kernel_name(fn):
    return f"{fn.__module__}:{fn.__qualname__}"


# ---------------------------------------------------------------------------------------------
# step 1: record (a pytest plugin in the TRITON_INTERPRET=1 run)

def _encode_arg(value):
    import torch
    if isinstance(value, torch.Tensor):
        return {"tensor": [list(value.shape), list(value.stride()), value.storage_offset(), str(value.dtype)]}
    if isinstance(value, (list, tuple)):
        return [_encode_arg(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record argument {value!r} of type {type(value).__name__}")


class Recorder:
    """Records the launcher calls and counts the interpreted kernel launches."""

    def __init__(self, path):
        from triton.runtime.interpreter import InterpretedFunction
        self.path = path
        self.calls = {}    # json key -> {"op", "args", "kwargs", "first_test"}
        self.kernels = {}  # kernel name -> interpreted launches
        self._undo = []
        for name, op in _launchers().items():
            for device, fn in list(op._backend_fns.items()):
                op._backend_fns[device] = self._recording(name, fn)
                self._undo.append(lambda fns=op._backend_fns, device=device, fn=fn: fns.__setitem__(device, fn))
        original = InterpretedFunction.run
        kernels = self.kernels

        def run(kernel, *args, **kwargs):
            name = _kernel_name(kernel.fn)
            kernels[name] = kernels.get(name, 0) + 1
            return original(kernel, *args, **kwargs)

        InterpretedFunction.run = run
        self._undo.append(lambda: setattr(InterpretedFunction, "run", original))

    def _recording(self, name, fn):
        def launcher(*args, **kwargs):
            call = {"op": name, "args": _encode_arg(list(args)),
                    "kwargs": {k: _encode_arg(v) for k, v in kwargs.items()}}
            result = fn(*args, **kwargs)  # calls that raise (argument validation tests) are not recorded
            key = json.dumps(call, sort_keys=True)
            if key not in self.calls:
                call["first_test"] = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
                self.calls[key] = call
            return result
        return launcher

    def pytest_sessionfinish(self, session):
        for undo in self._undo:
            undo()
        with open(self.path, "w") as f:
            json.dump({"kernels": self.kernels, "calls": list(self.calls.values())}, f, indent=1)

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(f"triton-aot: {len(self.calls)} launcher calls, {len(self.kernels)} kernels "
                                    f"recorded in {self.path}")


# ---------------------------------------------------------------------------------------------
# step 2a: replay the calls as on a GPU, collecting the variants Triton's launcher would compile

class _Pointer:
    """What Triton's specialisation reads of a tensor: its dtype and address (16-byte alignment)."""

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self._address = (1 << 20) + tensor.storage_offset() * tensor.element_size()  # allocations are aligned

    def data_ptr(self):
        return self._address


def _basic_index(tensor, index):
    """tensor[index] through dispatched ops, for ints, slices, None, Ellipsis and one index tensor."""
    import torch
    if isinstance(index, torch.Tensor):  # one index tensor: a gather, as aten.index
        return torch.ops.aten.index(tensor, [index])
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or (isinstance(i, (int, slice)) and not isinstance(i, bool))
               for i in index):
        return None
    dim, out = 0, tensor
    for i in index:
        if i is Ellipsis:
            dim += tensor.dim() - sum(j is not None and j is not Ellipsis for j in index)
        elif i is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif isinstance(i, int):
            out = out.select(dim, i)
        else:
            out, dim = torch.ops.aten.slice(out, dim, i.start, i.stop, i.step or 1), dim + 1
    return out


def _device_guard_mode():
    """A few Python bindings of Tensor (indexing, copy_, contiguous of a strided tensor...) take a CUDA
    device guard, which a CPU build of torch lacks even for fake tensors: those calls go through the
    dispatcher instead (torch.ops.aten.<method>, or views for basic indexing)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class DeviceGuardMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            try:
                return func(*args, **kwargs)
            except RuntimeError as error:
                if "support for cuda" not in str(error):
                    raise
                name = getattr(func, "__name__", "")
                if name == "__setitem__" and isinstance(args[1], torch.Tensor):
                    value = args[2] if isinstance(args[2], torch.Tensor) else torch.tensor(args[2])
                    torch.ops.aten.index_put_(args[0], [args[1]], value)
                    return None
                if name in ("__getitem__", "__setitem__"):
                    view = _basic_index(args[0], args[1])
                    if view is None:
                        raise
                    if name == "__getitem__":
                        return view
                    (torch.ops.aten.copy_ if isinstance(args[2], torch.Tensor) else torch.ops.aten.fill_)(view, args[2])
                    return None
                if not hasattr(torch.ops.aten, name):
                    raise
                return getattr(torch.ops.aten, name)(*args, **kwargs)

    return DeviceGuardMode()


def replay(calls):
    """({variant key: variant}, [failure lines]) for the recorded launcher calls."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    backend = make_backend(GPUTarget("cuda", ARCH, 32))
    launchers = _launchers()
    variants, failures, binders = {}, [], {}
    current = {}

    def launch(kernel, *args, grid, warmup, **kwargs):  # JITFunction.run: specialise, record, no launch
        if kernel not in binders:
            binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, backend)
        args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: _Pointer(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        bound, specialization, _ = binders[kernel](*args, **kwargs)
        _, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs), bound, specialization, {})
        variant = {
            "kernel": _kernel_name(kernel.fn),
            "signature": signature,
            "constexprs": [[list(path), _encode_constexpr(v)] for path, v in sorted(constexprs.items())],
            "attrs": [[list(path), attr] for path, attr in sorted(attrs.items())],
            "options": {k: v for k, v in sorted(kwargs.items()) if k not in kernel.arg_names},
        }
        variants.setdefault(json.dumps(variant, sort_keys=True), dict(variant, first_test=current["test"]))

    def build(value):
        if isinstance(value, dict):
            shape, stride, offset, dtype = value["tensor"]
            size = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else offset
            base = torch.empty(size, dtype=getattr(torch, dtype.split(".")[1]), device="cuda")
            return base.as_strided(shape, stride, offset)
        return [build(v) for v in value] if isinstance(value, list) else value

    saved = JITFunction.run, torch.cuda.device
    JITFunction.run, torch.cuda.device = launch, lambda device: contextlib.nullcontext()
    try:
        for call in calls:
            current["test"] = call.get("first_test")
            try:
                with FakeTensorMode(), _device_guard_mode(), _quiet():
                    launchers[call["op"]]._init_fn(*build(call["args"]),
                                                   **{k: build(v) for k, v in call["kwargs"].items()})
            except Exception as error:
                failures.append(f"replay of {call['op']} from {call.get('first_test')}: "
                                + "".join(traceback.format_exception_only(error)).strip())
    finally:
        JITFunction.run, torch.cuda.device = saved
    return variants, failures


@contextlib.contextmanager
def _quiet():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _encode_constexpr(value):
    import triton.language as tl
    if isinstance(value, tl.constexpr):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tl.dtype):
        return {"dtype": str(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode_constexpr(v) for v in value]}
    if hasattr(value, "fn") and hasattr(value.fn, "__qualname__"):  # a jit function passed as constexpr
        return {"jit_function": _kernel_name(value.fn)}
    raise TypeError(f"cannot record constexpr value {value!r} of type {type(value).__name__}")


def _features(variant):
    """What one compile of `variant` checks: its structure (the kernel, pointer and scalar types,
    bool/dtype constexprs, launch options), each integer constexpr's value (incl. ints specialised
    to 1) and each argument's alignment attribute."""
    kernel, constexprs = variant["kernel"], {tuple(p): v for p, v in variant["constexprs"]}
    names = list(variant["signature"])
    structure, features = [], set()
    for i, (name, ty) in enumerate(variant["signature"].items()):
        value = constexprs.get((i,))
        if ty == "constexpr" and type(value) is int:
            features.add((kernel, name, "=", value))
            structure.append(name)
        else:
            structure.append([name, ty, value])
    features.update((kernel, names[p[0]], json.dumps(attr)) for p, attr in variant["attrs"])
    features.add((kernel, json.dumps([structure, variant["options"]])))
    return features


def cover(variants):
    """A small subset of `variants` (greedy set cover) with every feature of every variant: each
    structure, each value of each integer constexpr and each alignment, though not every combination."""
    features = [_features(v) for v in variants]
    left, chosen = set().union(*features), []
    while left:
        best = max(range(len(variants)), key=lambda i: len(features[i] & left))
        chosen.append(best)
        left -= features[best]
    return [variants[i] for i in sorted(chosen)]


# ---------------------------------------------------------------------------------------------
# step 2b: compile each variant for sm_90

def _resolve(name):
    module, qualname = name.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode_constexpr(value):
    import triton.language as tl
    if isinstance(value, dict):
        if "dtype" in value:
            return tl.dtype(value["dtype"])
        if "tuple" in value:
            return tuple(_decode_constexpr(v) for v in value["tuple"])
        if "jit_function" in value:
            return _resolve(value["jit_function"])
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def describe(variant):
    """The variant in one line: kernel(arg:type or CONSTEXPR=value, ...) and launch options."""
    constexprs = {path[0]: value for path, value in variant["constexprs"] if len(path) == 1}
    args = []
    for i, (name, ty) in enumerate(variant["signature"].items()):
        value = constexprs.get(i)
        value = value["dtype"] if isinstance(value, dict) and "dtype" in value else value
        args.append(f"{name}={value}" if ty == "constexpr" else f"{name}:{ty}")
    options = "".join(f" {k}={v}" for k, v in variant["options"].items())
    return f"{variant['kernel'].split(':')[1]}({', '.join(args)}){options}"


def compile_variant(variant):
    """(ok, registers/spills/shared memory or the error, seconds) for one variant."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    start = time.perf_counter()
    log = io.StringIO()
    try:
        source = ASTSource(fn=_resolve(variant["kernel"]),
                           signature={name: _tuples(ty) for name, ty in variant["signature"].items()},
                           constexprs={tuple(p): _decode_constexpr(v) for p, v in variant["constexprs"]},
                           attrs={tuple(p): attr for p, attr in variant["attrs"]})
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
        with contextlib.redirect_stdout(log), _quiet():
            compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32), options=dict(variant["options"]))
        assert compiled.asm.get("cubin"), "no cubin"
    except Exception as error:
        return False, "".join(traceback.format_exception_only(error)).strip(), time.perf_counter() - start
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    shared = compiled.metadata.shared
    summary = (f"regs={regs.group(1) if regs else '?'} spills={'/'.join(spills.groups()) if spills else '?'} "
               f"smem={shared} warps={compiled.metadata.num_warps}")
    if shared > SM90_MAX_SHARED:
        return False, f"{summary}: more shared memory than sm_90 has ({SM90_MAX_SHARED})", time.perf_counter() - start
    return True, summary, time.perf_counter() - start


def _isolate(cache_dir):
    os.environ["TRITON_INTERPRET"] = "0"    # the launchers plan for a GPU, triton.jit compiles
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # fresh: every variant really goes through ptxas


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="files written by the recorder (UDAFAST_TRITON_AOT)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--all", action="store_true",
                        help="compile every variant (default: a covering subset, see cover())")
    parser.add_argument("--variants", help="also write the variants found by the replay to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as cache_dir:
        _isolate(cache_dir)
        return _run(args, cache_dir)


def _run(args, cache_dir):
    import triton
    start = time.perf_counter()
    kernels, calls = {}, {}
    for path in args.files:
        with open(path) as f:
            recorded = json.load(f)
        for name, launches in recorded["kernels"].items():
            kernels[name] = kernels.get(name, 0) + launches
        for call in recorded["calls"]:
            calls.setdefault(json.dumps({k: call[k] for k in ("op", "args", "kwargs")}, sort_keys=True), call)
    if not calls:
        print("triton-aot: nothing recorded (UDAFAST_TRITON_AOT set in the TRITON_INTERPRET=1 pytest run?)")
        return 1
    variants, failures = replay(calls.values())
    variants = sorted(variants.values(), key=lambda v: json.dumps(v, sort_keys=True))
    if args.variants:
        with open(args.variants, "w") as f:
            json.dump(variants, f, indent=1)
    replayed = {v["kernel"] for v in variants}
    failures += [f"{name} was launched {n} times under the interpreter but never by the replay"
                 for name, n in sorted(kernels.items()) if name not in replayed]
    for line in failures:
        print("FAIL", line)
    found = len(variants)
    variants = variants if args.all else cover(variants)
    print(f"triton-aot: {len(calls)} launcher calls replayed in {time.perf_counter() - start:.0f}s: "
          f"{found} variants of {len(replayed)} kernels, compiling {len(variants)}"
          + ("" if args.all else " that cover them (--all: every one)"))
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(args.jobs, initializer=_isolate, initargs=(cache_dir,)) as pool:
        for variant, (ok, info, seconds) in zip(variants, pool.map(compile_variant, variants)):
            failed += not ok
            print(f"{'OK  ' if ok else 'FAIL'} {seconds:5.1f}s {describe(variant)}\n      "
                  + (info if ok else info.replace("\n", "\n      ") + f"\n      (from {variant['first_test']})"))
    print(f"triton-aot: {len(variants) - failed}/{len(variants)} variants compiled for sm_{ARCH} with Triton "
          f"{triton.__version__} in {time.perf_counter() - start:.0f}s in all"
          + (f"; FAILED: {failed} variants, {len(failures)} replay problems" if failed or failures else ""))
    return 1 if failed or failures else 0


if __name__ == "__main__":
    sys.exit(main())
