import pytest

from cluster.profiles import deepspeed_config, deepspeed_names, load_profile, profile_names
from pipelines.errors import ConfigError


def test_every_profile_loads_and_gpu_profiles_use_gpus():
    assert set(profile_names()) >= {"cpu-small", "gpu-1", "gpu-8"}
    cpu, g8 = load_profile("cpu-small"), load_profile("gpu-8")
    assert cpu.annotate.num_gpus_per_actor == 0
    assert g8.annotate.num_gpus_per_actor == 1 and g8.annotate.concurrency == (1, 8)


def test_cpu_profile_never_gives_the_actor_pool_every_cpu():
    cpu = load_profile("cpu-small")
    assert cpu.annotate.concurrency[1] * cpu.annotate.num_cpus_per_actor < 2


def test_unknown_profile_lists_known():
    with pytest.raises(ConfigError, match="cpu-small"):
        load_profile("tpu-9000")


def test_deepspeed_configs_fill_auto_and_refuse_unfilled():
    assert set(deepspeed_names()) == {"zero2", "zero3_offload"}
    z3 = deepspeed_config(
        "zero3_offload", train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, bf16=True
    )
    assert z3["zero_optimization"]["stage"] == 3
    assert z3["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and z3["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        deepspeed_config("zero2", train_micro_batch_size_per_gpu=4, bf16=False)
