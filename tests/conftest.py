# SPDX-License-Identifier: Apache-2.0
import os
import random
import sys
from pathlib import Path

import pytest

# vLLM on this CPU machine; never reach a model hub; UCX on loopback only.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
# torch's CPU tensors on huge pages, as `make test` and `kvbridge up` run engines
# (tests/test_hugepages.py covers the memory of a process without it)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

HELPERS = Path(__file__).parent / "helpers"
SHUFFLE_ENV = "KVBRIDGE_TEST_SHUFFLE"


# -- order shuffle (what pytest-randomly does, without the dependency) ---------------

def pytest_addoption(parser):
    parser.addoption("--shuffle", metavar="SEED", type=int, default=None,
                     help="run the test modules, and the tests within each module, in an "
                          f"order shuffled from SEED (or ${SHUFFLE_ENV}); a module's tests "
                          "stay together, so module-scoped fixtures start once")


def _shuffle_seed(config) -> int | None:
    seed = config.getoption("--shuffle")
    if seed is None and os.environ.get(SHUFFLE_ENV, "").strip():
        seed = int(os.environ[SHUFFLE_ENV])
    return seed


def pytest_report_header(config):
    seed = _shuffle_seed(config)
    if seed is None:
        return f"test order: as collected (shuffle with --shuffle SEED or {SHUFFLE_ENV}=SEED)"
    return f"test order: shuffled, seed {seed} (repeat with --shuffle {seed})"


def shuffled(items: list, seed: int) -> list:
    """``items`` with modules in a seeded order and each module's tests in a
    seeded order of their own, a module's tests kept together. Deterministic:
    each module's order depends only on the seed and the module's path, not
    on which other modules were collected."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    names = sorted(modules)
    random.Random(f"{seed}:modules").shuffle(names)
    out = []
    for name in names:
        tests = list(modules[name])
        # Parametrized module-scoped fixtures (e.g. one producer per backend)
        # group tests by parameter: keep each group together so the fixture
        # starts once per parameter, as in collection order.
        groups: dict[tuple, list] = {}
        for item in tests:
            groups.setdefault(_module_params(item), []).append(item)
        keys = list(groups)
        rng = random.Random(f"{seed}:{name}")
        rng.shuffle(keys)
        for key in keys:
            group = groups[key]
            rng.shuffle(group)
            out.extend(group)
    return out


def _module_params(item) -> tuple:
    """The parameters of ``item``'s module-scoped (and wider) fixtures."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return ()
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    defs = fixtureinfo.name2fixturedefs if fixtureinfo else {}
    out = []
    for argname in sorted(callspec.params):
        fdefs = defs.get(argname)
        if fdefs and fdefs[-1].scope in ("module", "package", "session"):
            out.append((argname, callspec.indices.get(argname)))
    return tuple(out)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    seed = _shuffle_seed(config)
    if seed is not None:
        items[:] = shuffled(items, seed)


# -- shared fixtures -------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama, built once into the cache (keyed by the recipe's hash)."""
    from kvbridge.demo import tiny_model

    return tiny_model.ensure(tiny_model.default_path())


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


TRANSPORT_BACKENDS = ["auto", "tcp", "cma", "nixl"]


@pytest.fixture(params=TRANSPORT_BACKENDS)
def backend(request):
    """Each transport backend; failing (not skipping) where one is unavailable."""
    from helpers.procs import ENV
    from kvbridge.transport import available

    if request.param not in available():
        pytest.fail(f"backend {request.param} is not available here "
                    "(its dependency failed to import)")
    os.environ.update(ENV)
    return request.param


@pytest.fixture
def producers():
    """``producers(backend, cache_kw=..., config_kw=..., env=...)`` starts a
    producer process (``helpers.procs.Producer``); all are stopped at teardown."""
    from helpers.procs import Producer

    started: list = []

    def start(*a, **kw):
        p = Producer(*a, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def consumers():
    """``consumers(backend, config_kw=None, **cache_kw)``: a transport on a
    zeroed cache in this process; all are closed at teardown."""
    from helpers.procs import NUM_BLOCKS
    from helpers.transport_peer import make_cache
    from kvbridge.transport import TransportConfig, create_transport

    made = []

    def make(backend, config_kw=None, **cache_kw):
        kw = dict(num_blocks=NUM_BLOCKS, seed=None)
        kw.update(cache_kw)
        t = create_transport(backend, make_cache(**kw), TransportConfig(**(config_kw or {})))
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def engines():
    """``engines(role, model, **opts)`` starts a vLLM engine process
    (``helpers.procs.Engine``) without waiting for it: the engines a test
    starts before it first calls one come up together. All are stopped at
    teardown."""
    from helpers.procs import Engine, stop_engines

    started: list = []

    def start(role, model, **opts):
        e = Engine(role, model, wait=False, **opts)
        started.append(e)
        return e

    yield start
    stop_engines(started)
