import os
import sys

# The repo root must not be on sys.path: kernels/ there would shadow the PyPI package "kernels" (bitsandbytes
# imports it). `python -P -m pytest` keeps it off; pytest-xdist's workers start with the working directory on it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]

# OpenMP threads that finish a parallel region spin for their next one by default. Two xdist workers (and the
# subprocesses of their tests), each with a thread per core, then burn the cores the other needs: a third of
# the CPU time of the in-process tests went to spinning (tests/test_options.py and five other files on 2 cores:
# 90-98 s of CPU and 51-55 s against 64 s and 38 s passive). Read when torch loads OpenMP, so set before it
# (every pytest process, the reruns' included, loads this file first; the tests' subprocesses inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# The Triton kernels run on CPU tensors under the interpreter; it must be set before triton compiles
# anything. On a CUDA machine the GPU tests use the real compiler instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tests whose result depends on how the CPU computes (ATen's and inductor's code paths for AVX-512,
# AVX2 and the baseline, and the C++ step built for each): scripts/test.sh runs them again under each
# ATEN_CPU_CAPABILITY. Not test_kernel_interpret.py: the interpreter computes with numpy whatever the path,
# and the eager step it is held to gives the same bits under every path (test_cpu_code_paths.py).
NUMERICS = ("test_compiled_cpu.py", "test_nonfinite.py", "test_options.py", "test_format.py", "test_4bit.py",
            "test_cpu_kernel.py")
# Of those, the tests of how the C++ step's library is built and cached compute nothing that depends on the code
# path; each builds the library anew (about 5 s), so the reruns leave them out.
NOT_NUMERICS = ("test_cpu_kernel.py::test_a_failed_build", "test_cpu_kernel.py::test_the_library_is_cached",
                "test_cpu_kernel.py::test_a_truncated_library", "test_cpu_kernel.py::test_a_compiler_that_stalls")
# Tests of several seconds each (subprocesses, real training runs): `bash scripts/test.sh --quick` leaves them out.
SLOW = ("test_distributed.py", "test_deepspeed.py", "test_accelerate_fsdp2.py", "test_cpu_code_paths.py::test_every_backend", "test_memory.py::test_estimate_matches_measured", "test_memory.py::test_cli_memory_subcommand",
        "test_integrations.py::test_trainer_resume", "test_integrations.py::test_recipes_run",
        "test_integrations.py::test_unmodified", "test_integrations.py::test_trainer_grad_accumulation",
        "test_benchmarks.py::test_codec_quality", "test_benchmarks.py::test_step_speed",
        "test_benchmarks.py::test_first_step",
        "test_cli.py::test_gpu_kernel_check_script", "test_cli.py::test_gpu_offload_check_script", "test_integrations.py::test_trainer_step_in_backward")


def _module_fixture(item):
    """The module-scoped fixture a test uses (an FSDP2 run, a Trainer run, a compile of every kernel variant), if
    any: under pytest-xdist (scripts/test.sh runs `-n auto --dist loadgroup`) its tests share one worker, so it
    is built once; every other test goes wherever a worker is free."""
    info = getattr(item, "_fixtureinfo", None)
    names = sorted(n for n, defs in (info.name2fixturedefs.items() if info else ()) if defs and defs[-1].scope == "module")
    return names[0] if names else None


# Tests that start several ranks (torchrun, spawn) share one xdist group, so one runs at a time: two of them at
# once put four ranks on two cores, and each collective then waits for a rank to be scheduled (a ZeRO run went from
# 8 s alone to 69 s beside other tests). Their module-scoped fixtures stay on that one worker too.
MULTI_RANK = ("test_distributed.py", "test_deepspeed.py", "test_accelerate_fsdp2.py")


def pytest_ignore_collect(collection_path, config):
    # The reruns under other ATen code paths (scripts/test.sh) select the numerics tests; the other files are
    # not even imported (their imports of transformers, Lightning, ... cost each worker seconds).
    if os.environ.get("LOWBIT_ADAMW_NUMERICS_ONLY") and collection_path.suffix == ".py":
        return collection_path.name.startswith("test_") and collection_path.name not in NUMERICS
    return None


# tryfirst: the marks must be on the items before pytest-xdist's worker hook reads them into the node ids
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid.split("tests/", 1)[-1]
        fixture = _module_fixture(item)
        if nodeid.startswith(MULTI_RANK):
            item.add_marker(pytest.mark.xdist_group("multi-rank"))
        elif fixture:
            item.add_marker(pytest.mark.xdist_group(f"{nodeid.split('::')[0]}::{fixture}"))
        if nodeid.split("::")[0] in NUMERICS and not nodeid.startswith(NOT_NUMERICS):
            item.add_marker(pytest.mark.numerics)
        if nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
    # The slow tests first: a worker that meets one of them last would leave the other idle at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


class _GroupsHold:
    """Under `--dist loadgroup` an xdist worker names each grouped test `nodeid@group`, and the controller sends
    a group to one worker by that name. pytest 9.2 keeps a node's id where pytest-xdist 3.8 no longer writes it:
    every group then splits, and each worker builds the expensive fixture again (the suite ran about a minute
    longer with nothing failing). This check makes that loud instead."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not getattr(config.option, "loadgroup", False):  # set in xdist workers only
            return
        lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            why = (f"pytest-xdist did not group {len(lost)} test(s) (e.g. {lost[0]}): this pytest "
                   f"({pytest.__version__}) and pytest-xdist do not work together under --dist loadgroup; "
                   "install the versions pyproject.toml's test extra pins")
            os.write(2, f"\n{why}\n".encode())  # a worker's exception reaches the controller without its text
            pytest.exit(why, returncode=4)


def pytest_configure(config):
    config.pluginmanager.register(_GroupsHold(), "lowbit_adamw_groups_hold")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
