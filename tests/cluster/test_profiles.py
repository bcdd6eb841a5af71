import pytest

from cluster.profiles import choose_deepspeed, deepspeed_config, deepspeed_names, load_profile, profile_names
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
    assert set(deepspeed_names()) == {"zero2", "zero3", "zero3_offload"}
    z3 = deepspeed_config(
        "zero3_offload", train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, bf16=True
    )
    assert z3["zero_optimization"]["stage"] == 3
    assert z3["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and z3["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        deepspeed_config("zero2", train_micro_batch_size_per_gpu=4, bf16=False)


GB = 10**9
A100_80, L4_24, V100_32 = 85 * GB, 24 * GB, 34 * GB  # total_memory as torch reports it (bytes)


@pytest.mark.parametrize(
    ("params", "gpu", "world", "bytes_per_param", "expected"),
    [
        (9.24e9, A100_80, 4, 2, "zero2"),  # gemma-2-9b bf16: 18.5 GB of weights on an 80 GB GPU
        (9.24e9, A100_80, 1, 2, "zero2"),
        (9.24e9, L4_24, 4, 2, "zero3"),  # 18.5 GB > 60% of 24 GB; a quarter of it fits
        (9.24e9, L4_24, 1, 2, "zero3_offload"),  # one 24 GB GPU: nothing to partition over
        (27.2e9, A100_80, 1, 2, "zero3_offload"),  # gemma-2-27b, 54 GB on one 80 GB GPU
        (27.2e9, A100_80, 2, 2, "zero3"),
        (70.6e9, A100_80, 8, 2, "zero3"),
        (70.6e9, L4_24, 2, 2, "zero3_offload"),
        (9.24e9, V100_32, 2, 4, "zero3"),  # no bf16 on a V100: fp32 weights, 37 GB
        (0.27e9, L4_24, 1, 2, "zero2"),  # the offline Gemma 3 270M
        (9.24e9, None, 2, 4, "zero2"),  # CPU workers (gloo)
    ],
)
def test_deepspeed_auto_picks_the_least_partitioning_that_fits(params, gpu, world, bytes_per_param, expected):
    name, why = choose_deepspeed(int(params), gpu, world, bytes_per_param)
    assert name == expected, why
    assert name in deepspeed_names() and f"{params / 1e9:.2f}B parameters" in why
