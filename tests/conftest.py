"""Shared fixtures: one embedded Ray for the whole session, tiny synthetic data, a tiny random causal LM."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports ray: keep every test cluster on loopback, and send nothing anywhere.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("AUGREL_SHARED_DIR", REPO.parent / "shared"))
SHARED_DATA = Path(os.environ.get("AUGREL_DATA_DIR", SHARED / "data"))


def pytest_configure(config: pytest.Config) -> None:
    # augrel's state (logs, local cluster records) goes to a throwaway home, not the user's ~/.augrel
    home = Path(config.rootpath) / ".pytest_cache" / "augrel-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["AUGREL_HOME"] = str(home)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """The one embedded Ray of the test session, started at an explicit local address, 2 CPUs."""
    import ray

    from cluster.embedded import init_ray

    info = init_ray("local", num_cpus=2, object_store_memory=512 * 2**20)
    yield info
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "trec-dl-2019").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory) -> Path:
    """A small synthetic corpus in the BEIR layout (24 entities, 48 queries)."""
    from pipelines.synth import SynthConfig, synth

    out = tmp_path_factory.mktemp("synth") / "raw"
    synth(SynthConfig(out=str(out), entities=24, distractors=3, random_negatives=2, seed=3))
    return out


@pytest.fixture(scope="session")
def synth_dataset(synth_raw, tmp_path_factory) -> Path:
    """The small synthetic corpus prepared into augrel's tables."""
    from pipelines.data import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("synth") / "data"
    prepare(PrepareConfig(format="beir", src=str(synth_raw), out=str(out)))
    return out


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    """A tiny random Llama-style causal LM with a word-level tokenizer, saved like a hub checkpoint."""
    from tests.helpers import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny random BERT sentence encoder, for pipelines that need an encoder's shape, not its quality."""
    from tests.helpers import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))
